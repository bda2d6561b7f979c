"""Speed and memory of the training step, the denoiser and a sampler, for a config.

Run:  python experiments/benchmark.py --config configs/cifar10.py --batch 16
      python experiments/benchmark.py --config configs/sprites.py:peer --batch 64
      python experiments/benchmark.py --config configs/cifar10.py --batch 128 \
        --config_overrides model.dtype=bfloat16 --peak_tflops 989   # one H100, bf16 dense
      python experiments/benchmark.py --config configs/sprites.py:peer --what train --trace /tmp/t
Prints one JSON object per measurement and a markdown table: compile time, training images/s
(the real `train` step: loss over random t, backward, pmean, Adam, EMA), denoiser forward
images/s, sampler network evaluations/s, peak memory, XLA's FLOPs per image and the resulting
utilisation of `--peak_tflops`. Medians of `--repeats` timed windows after a warm-up. The
program's default XLA flags (diffusion/perf.py) are applied unless --no_default_flags, and its
malloc mode ($DIFFUSION_MALLOC: hugepages by default, or off; see diffusion/perf.py).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from diffusion import perf  # noqa: E402  (standard library only; JAX comes after the flags)


def timed(fn, repeats: int, min_seconds: float, warmup_seconds: float) -> list[float]:
  """Seconds per call, one median-able figure per repeat; each repeat runs >= min_seconds, after
  calls for >= warmup_seconds (one call is not enough: the first seconds after compiling run
  slower while the allocator's memory settles; the peer step's first 5 s window ran 17% slower)."""
  start = time.perf_counter()
  while time.perf_counter() - start < warmup_seconds:
    fn()
  out = []
  for _ in range(repeats):
    n, start = 0, time.perf_counter()
    while True:
      fn()
      n += 1
      elapsed = time.perf_counter() - start
      if elapsed >= min_seconds:
        break
    out.append(elapsed / n)
  return out


def peak_memory_bytes(jax) -> int:
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"])
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # host RSS on the CPU


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--config", default="configs/sprites.py:peer")
  p.add_argument("--config_overrides", nargs="*", default=[], help="a.b=value ...")
  p.add_argument("--batch", type=int, default=64, help="global batch (all devices)")
  p.add_argument("--what", default="train,fwd,sample")
  p.add_argument("--sampler", default="ddim")
  p.add_argument("--sample_steps", type=int, default=10)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--min_seconds", type=float, default=5.0)
  p.add_argument("--warmup_seconds", type=float, default=5.0)
  p.add_argument("--peak_tflops", type=float, default=0.0, help="for utilisation (0: skip)")
  p.add_argument("--no_default_flags", action="store_true")
  p.add_argument(
    "--trace",
    default="",
    help="write a jax.profiler trace of 3 more training "
    "calls here (TensorBoard's profile plugin or Perfetto reads it)",
  )
  args = p.parse_args()

  if not args.no_default_flags:
    perf.configure_xla()
  import jax
  import jax.numpy as jnp
  import numpy as np

  from configs.common import load
  from diffusion import parallel, train, unet
  from diffusion.model import Diffusion, SampleSettings, sample_labels

  config = load(args.config, args.config_overrides)
  config.train.batch_size = args.batch
  diffusion, opt = Diffusion.from_config(config), train.optimizer(config.train)
  mesh = parallel.make_mesh()
  state = parallel.replicate(train.initial_state(diffusion, opt, config.seed), mesh)
  s, c = config.data.image_size, config.data.channels
  n_params = unet.count_params(state.params)
  rng = np.random.default_rng(0)
  per_device = (jax.local_device_count(), args.batch // jax.device_count())
  local = [
    {
      "image": rng.integers(0, 256, (*per_device, s, s, c), np.uint8),
      "label": np.zeros(per_device, np.int32),
    }
  ]
  rows = []

  def report(what: str, per_call: list[float], images: int, compile_s: float, flops: float):
    med = statistics.median(per_call)
    row = {
      "config": args.config,
      "what": what,
      "batch": args.batch,
      "params": n_params,
      "dtype": config.model.dtype,
      "backend": jax.default_backend(),
      "devices": jax.device_count(),
      "malloc": perf.malloc_mode(),
      "compile_s": round(compile_s, 2),
      "images_per_s": round(images / med, 2),
      "runs_images_per_s": [round(images / x, 2) for x in per_call],
      "gflops_per_image": round(flops / images / 1e9, 3) if flops else None,
      "peak_memory_mb": round(peak_memory_bytes(jax) / 2**20, 1),
    }
    if args.peak_tflops and flops:
      row["utilisation"] = round(flops / med / (args.peak_tflops * 1e12), 4)
    rows.append(row)
    print(json.dumps(row), flush=True)

  def cost(compiled) -> float:
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    return float(analysis.get("flops", 0.0)) if analysis else 0.0

  if "train" in args.what:
    step = parallel.compile_step(
      train.make_per_device_step(diffusion, opt, grad_accum=config.train.grad_accum), mesh
    )
    batch = parallel.global_batches(local, mesh)
    t0 = time.perf_counter()
    compiled = step.executable(state, batch)
    compile_s = time.perf_counter() - t0
    holder = {"state": state, "loss": None}

    def run_train():  # like the training loop: wait for the previous call while this one runs
      holder["state"], m = step(holder["state"], batch)
      jax.block_until_ready(holder["loss"])
      holder["loss"] = m["loss"]

    per_call = timed(run_train, args.repeats, args.min_seconds, args.warmup_seconds)
    # cost_analysis counts one device's share of the sharded program
    report("train", per_call, args.batch, compile_s, cost(compiled) * jax.device_count())
    if args.trace:
      with jax.profiler.trace(args.trace):
        for _ in range(3):
          run_train()
        jax.block_until_ready(holder["loss"])
      print(f"trace of 3 training calls written under {args.trace}", flush=True)
    jax.block_until_ready(holder["state"])
    state = holder["state"]

  # One device's copy of the parameters, on that device: the calls below pass device arrays, not
  # host NumPy (which would be copied to the accelerator on every call).
  params = jax.tree.map(lambda a: a.addressable_data(0), state.params)
  if "fwd" in args.what:
    x = jnp.asarray(rng.standard_normal((args.batch, s, s, c)), jnp.float32)
    t = jnp.asarray(rng.integers(0, 1000, args.batch), jnp.float32)
    y = jnp.zeros((args.batch,), jnp.int32) if diffusion.conditional else None
    fwd = jax.jit(lambda p, x, t, y: diffusion.net.apply(p, x, t, y, train=False))
    t0 = time.perf_counter()
    compiled = fwd.lower(params, x, t, y).compile()
    compile_s = time.perf_counter() - t0
    run_fwd = lambda: jax.block_until_ready(compiled(params, x, t, y))
    per_call = timed(run_fwd, args.repeats, args.min_seconds, args.warmup_seconds)
    report("forward", per_call, args.batch, compile_s, cost(compiled))

  if "sample" in args.what:
    settings = SampleSettings.from_config(
      config.sample, sampler=args.sampler, num_steps=args.sample_steps
    )
    fn = diffusion.sample_fn(settings)
    labels = jnp.asarray(sample_labels(diffusion.num_classes, args.batch))
    key = jax.random.PRNGKey(0)
    t0 = time.perf_counter()
    jax.block_until_ready(fn(params, key, labels, args.batch))
    compile_s = time.perf_counter() - t0
    run_sample = lambda: jax.block_until_ready(fn(params, key, labels, args.batch))
    per_call = timed(run_sample, args.repeats, args.min_seconds, args.warmup_seconds)
    # "images" per second here: network evaluations per second
    report(f"sample:{args.sampler}", per_call, settings.nfe * args.batch, compile_s, 0.0)

  print(
    "\n| config | what | batch | params | dtype | backend | compile s | img/s (median) | "
    "GFLOP/img | peak MB |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(
      f"| {r['config']} | {r['what']} | {r['batch']} | {r['params'] / 1e6:.2f}M | {r['dtype']} "
      f"| {r['backend']} | {r['compile_s']} | {r['images_per_s']} | {r['gflops_per_image']} | "
      f"{r['peak_memory_mb']} |"
    )


if __name__ == "__main__":
  perf.relaunch_with_malloc_tunables()
  main()
