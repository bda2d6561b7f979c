"""Speed and memory of the training step, the denoiser, a sampler and the fid50k eval pipeline.

Run:  python experiments/benchmark.py --config configs/cifar10.py --batch 16
      python experiments/benchmark.py --config configs/sprites.py:peer --batch 64
      python experiments/benchmark.py --config configs/cifar10.py --batch 128 \
        --config_overrides model.dtype=bfloat16 --peak_tflops 989   # one H100, bf16 dense
      python experiments/benchmark.py --config configs/cifar10.py --what eval --batch 500 \
        --eval_sampler dpm_solver++ --eval_steps 20   # fid50k samples/s and FID-50k time
      python experiments/benchmark.py --config configs/sprites.py --steps_per_call 8
      python experiments/benchmark.py --config configs/sprites.py:peer --what train --trace /tmp/t
      python experiments/benchmark.py --config configs/sprites.py --what meanflow --batch 64
      XLA_FLAGS=--xla_force_host_platform_device_count=8 python experiments/benchmark.py \
        --config configs/cifar10.py --what memory --fsdp 1,2,4,8 --batch 64  # compiled only
Prints one JSON object per measurement and a markdown table: compile time, training images/s
(the real `train` step: loss over random t, backward, pmean, Adam, EMA; `--steps_per_call` steps
per compiled call), denoiser forward images/s, sampler network evaluations/s, fid50k pipeline
samples/s (sampling + Inception or feature-net features, one global batch per call, with the
time FID-50k would take), peak memory, and the analytic FLOPs per image (diffusion/flops.py:
convolutions, dense layers and attention products, a multiply-add = 2 FLOPs, training = 3x the
forward pass) with the utilisation of `--peak_tflops`. XLA's `cost_analysis` FLOPs are kept as
`xla_gflops_per_image` only: on GPUs they leave out cuDNN convolutions. `--what meanflow` times a
MeanFlow training step (with its JVP target) beside a plain flow-matching step of the same network
on the flow process, in the same run, and prints their ratio. Medians of `--repeats`
timed windows after a warm-up. `--fsdp` (default config.parallel.fsdp) splits the state over a
(data, fsdp) mesh; `--what memory` compiles the training step for each `--fsdp` value without
running it or allocating the state and reports the bytes of parameters + Adam moments + EMA one
device holds and the compiled step's peak per device (XLA's memory analysis; also on CPUs).
Peak memory is the process's peak so far (run one row per process
for per-row figures, as experiments/gpu_check.sh does). The program's default XLA flags
(diffusion/runtime.py) are applied unless --no_default_flags, and its malloc mode
($DIFFUSION_MALLOC: hugepages by default, or off; see diffusion/runtime.py).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from diffusion import runtime  # noqa: E402  (standard library only; JAX comes after the flags)


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
  p.add_argument(
    "--what",
    default="train,fwd,sample",
    help="comma list: train,fwd,sample,eval,meanflow,memory",
  )
  p.add_argument(
    "--fsdp", default="", help="config.parallel.fsdp; memory: a comma list (e.g. 1,2,4,8)"
  )
  p.add_argument("--sampler", default="ddim")
  p.add_argument("--sample_steps", type=int, default=10)
  p.add_argument(
    "--steps_per_call",
    type=int,
    default=0,
    help="training steps per compiled call (0: config.train.steps_per_call); more steps per "
    "call take small networks off the dispatch bound on a GPU",
  )
  p.add_argument("--eval_sampler", default="dpm_solver++", help="eval pipeline's sampler")
  p.add_argument("--eval_steps", type=int, default=20)
  p.add_argument(
    "--features",
    default="inception",
    choices=("inception", "feature_net"),
    help="eval pipeline's feature network, random weights (the speed is the same)",
  )
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
  known = {"train", "fwd", "sample", "eval", "meanflow", "memory"}
  unknown = set(args.what.split(",")) - known
  if unknown:
    p.error(f"--what: unknown {sorted(unknown)}; use a comma list of {','.join(sorted(known))}")

  if not args.no_default_flags:
    runtime.configure_xla()
  import jax
  import jax.numpy as jnp
  import numpy as np

  from configs.common import load
  from diffusion import flops, parallel, train
  from diffusion.evaluation import fid50k
  from diffusion.model import Diffusion, SampleSettings, sample_labels
  from diffusion.nets import unet

  config = load(args.config, args.config_overrides)
  config.train.batch_size = args.batch
  k = args.steps_per_call or config.train.steps_per_call
  diffusion, opt = Diffusion.from_config(config), train.optimizer(config.train)
  fsdps = [int(f) for f in (args.fsdp or str(config.parallel.fsdp)).split(",")]
  s, c = config.data.image_size, config.data.channels
  n_params = unet.count_params(diffusion.param_shapes())
  if "memory" in args.what:
    memory_rows(args, config, diffusion, opt, fsdps, n_params)
    if args.what == "memory":
      return
  mesh = parallel.make_mesh(fsdps[0])
  lay = parallel.layout(mesh, config.parallel.fsdp_min_size)
  state = train.initial_state(
    diffusion, opt, config.seed, shardings=lambda t: parallel.shardings(t, mesh, lay)
  )
  fwd_flops = flops.net_forward(diffusion.net, (s, s, c))  # one image, analytic
  rng = np.random.default_rng(0)
  per_device = (jax.local_device_count(), args.batch // jax.device_count())
  local = {
    "image": rng.integers(0, 256, (*per_device, s, s, c), np.uint8),
    "label": np.zeros(per_device, np.int32),
  }
  rows = []

  def report(
    what: str,
    per_call: list[float],
    images: int,
    compile_s: float,
    *,
    per_image: int = 0,
    xla: float = 0.0,
    **extra: Any,
  ) -> None:
    """`images` per call; `per_image`: analytic FLOPs per image; `xla`: XLA's FLOPs per call;
    `extra`: more fields of the row."""
    med = statistics.median(per_call)
    row = {
      "config": args.config,
      "what": what,
      "batch": args.batch,
      "params": n_params,
      "dtype": config.model.dtype,
      "backend": jax.default_backend(),
      "device": jax.devices()[0].device_kind,
      "devices": jax.device_count(),
      "fsdp": lay.fsdp,
      "malloc": runtime.malloc_mode(),
      "compile_s": round(compile_s, 2),
      "images_per_s": round(images / med, 2),
      "runs_images_per_s": [round(images / x, 2) for x in per_call],
      "gflops_per_image": float(f"{per_image / 1e9:.4g}") if per_image else None,
      "xla_gflops_per_image": float(f"{xla / images / 1e9:.4g}") if xla else None,
      "peak_memory_mb": round(peak_memory_bytes(jax) / 2**20, 1),
      **extra,
    }
    if args.peak_tflops and per_image:
      row["utilisation"] = round(per_image * images / med / (args.peak_tflops * 1e12), 4)
    rows.append(row)
    print(json.dumps(row), flush=True)

  def cost(compiled) -> float:
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    return float(analysis.get("flops", 0.0)) if analysis else 0.0

  def train_row(what: str, diffusion: Diffusion, state: Any, per_image: int) -> tuple[Any, float]:
    """Times `diffusion`'s training step from `state`; (the state after, seconds per call)."""
    step = parallel.compile_step(
      train.make_per_device_step(diffusion, opt, grad_accum=config.train.grad_accum, layout=lay),
      mesh,
    )
    batch = parallel.global_batches([local] * k, mesh)  # k steps per call
    t0 = time.perf_counter()
    compiled = step.executable(state, batch)
    compile_s = time.perf_counter() - t0
    holder = {"state": state, "loss": None}

    def run_train():  # like the training loop: wait for the previous call while this one runs
      holder["state"], m = step(holder["state"], batch)
      jax.block_until_ready(holder["loss"])
      holder["loss"] = m["loss"]

    per_call = timed(run_train, args.repeats, args.min_seconds, args.warmup_seconds)
    report(
      what,
      per_call,
      k * args.batch,
      compile_s,
      per_image=per_image,
      # cost_analysis counts one device's share of the sharded program
      xla=cost(compiled) * jax.device_count(),
      steps_per_call=k,
      steps_per_s=round(k / statistics.median(per_call), 2),
      params=unet.count_params(state.params),
    )
    if args.trace:
      with jax.profiler.trace(args.trace):
        for _ in range(3):
          run_train()
        jax.block_until_ready(holder["loss"])
      print(f"trace of 3 training calls written under {args.trace}", flush=True)
    jax.block_until_ready(holder["state"])
    return holder["state"], statistics.median(per_call)

  if "train" in args.what:
    state, _ = train_row("train", diffusion, state, flops.TRAIN_FACTOR * fwd_flops)
  if "meanflow" in args.what:  # the same network (plus MeanFlow's second time MLP) on flow
    seconds = {}
    for objective in ("denoising", "meanflow"):
      overrides = ["diffusion.process=flow", "diffusion.prediction=flow"]
      cfg = load(
        args.config, [*args.config_overrides, *overrides, f"diffusion.objective={objective}"]
      )
      cfg.train.batch_size = args.batch
      d = Diffusion.from_config(cfg)
      st = parallel.place(train.initial_state(d, opt, cfg.seed), mesh, lay)
      what = "train_flow_matching" if objective == "denoising" else "train_meanflow"
      analytic = 0 if objective == "meanflow" else flops.TRAIN_FACTOR * fwd_flops  # JVP: none
      _, seconds[objective] = train_row(what, d, st, analytic)
    ratio = seconds["meanflow"] / seconds["denoising"]
    print(json.dumps({"meanflow_step_over_flow_matching_step": round(ratio, 3)}), flush=True)

  # The whole parameters on one device (gathered when split): the calls below pass device arrays,
  # not host NumPy (which would be copied to the accelerator on every call).
  params = jax.device_put(jax.device_get(state.params), jax.devices()[0])
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
    report(
      "forward",
      per_call,
      args.batch,
      compile_s,
      per_image=fwd_flops,
      xla=cost(compiled),
    )

  def passes(settings: SampleSettings) -> int:
    """Network passes per image (guidance runs the network twice per evaluation)."""
    guided = diffusion.conditional and settings.guidance_scale != 1.0
    return settings.nfe * (2 if guided else 1)

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
    n = passes(settings)
    report(
      f"sample:{args.sampler}",
      per_call,
      n * args.batch,
      compile_s,
      per_image=fwd_flops,
      nfe=settings.nfe,
    )

  if "eval" in args.what:
    settings = SampleSettings.from_config(
      config.sample, sampler=args.eval_sampler, num_steps=args.eval_steps
    )
    ext, ext_flops = extractor(args.features, diffusion.num_classes, (s, s, c))
    call = fid50k.pipeline_fn(diffusion, params, settings, ext, batch_size=args.batch, mesh=mesh)
    t0 = time.perf_counter()
    call(0)
    compile_s = time.perf_counter() - t0
    first = iter(range(args.batch, 2**30, args.batch))  # fresh images each call
    per_call = timed(lambda: call(next(first)), args.repeats, args.min_seconds, args.warmup_seconds)
    rate = args.batch / statistics.median(per_call)
    report(
      f"eval:{args.eval_sampler}:{args.eval_steps}+{args.features}",
      per_call,
      args.batch,
      compile_s,
      per_image=passes(settings) * fwd_flops + ext_flops,
      nfe=settings.nfe,
      fid50k_minutes=round(50_000 / rate / 60, 2),
    )
    print(
      f"FID-50k ({args.eval_sampler}, {settings.nfe} network evaluations, {args.features}): "
      f"{50_000 / rate / 60:.1f} min on {jax.device_count()} {jax.devices()[0].device_kind} "
      f"device(s) at {rate:.1f} samples/s",
      flush=True,
    )

  print(
    "\n| config | what | batch | params | dtype | device | compile s | img/s (median) | "
    "GFLOP/img | util | peak MB |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(
      f"| {r['config']} | {r['what']} | {r['batch']} | {r['params'] / 1e6:.2f}M | {r['dtype']} "
      f"| {r['device']} x{r['devices']} | {r['compile_s']} | {r['images_per_s']} | "
      f"{r['gflops_per_image']} | {r.get('utilisation', '')} | {r['peak_memory_mb']} |"
    )


def memory_rows(args, config, diffusion, opt, fsdps: list[int], n_params: int) -> None:
  """Per fsdp: the training step compiled from abstract arrays (nothing allocated, nothing run);
  prints a row of per-device state bytes (parameters, Adam moments, EMA) and the step's peak."""
  import jax
  import numpy as np
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from diffusion import parallel, sharding, train

  s, c = config.data.image_size, config.data.channels
  k = args.steps_per_call or config.train.steps_per_call
  print(
    "\n| config | params | devices | fsdp | state MB/device | step peak MB/device | compile s |"
  )
  print("|---|---|---|---|---|---|---|")
  for fsdp in fsdps:
    mesh = parallel.make_mesh(fsdp)
    lay = parallel.layout(mesh, config.parallel.fsdp_min_size)
    make = lambda: train.initial_state(diffusion, opt, config.seed)
    shapes = jax.eval_shape(make)
    abstract = jax.tree.map(
      lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
      shapes,
      parallel.shardings(shapes, mesh, lay),
    )
    batch_sharding = NamedSharding(mesh, P(None, parallel.BATCH))
    batch = {
      "image": jax.ShapeDtypeStruct((k, args.batch, s, s, c), np.uint8, sharding=batch_sharding),
      "label": jax.ShapeDtypeStruct((k, args.batch), np.int32, sharding=batch_sharding),
    }
    step = parallel.compile_step(
      train.make_per_device_step(diffusion, opt, grad_accum=config.train.grad_accum, layout=lay),
      mesh,
    )
    t0 = time.perf_counter()
    m = step.executable(abstract, batch).memory_analysis()
    compile_s = time.perf_counter() - t0
    # Arguments (the state, donated: aliased to the outputs) + outputs + temporaries: what the
    # step needs at most per device (XLA:CPU's own peak_memory_in_bytes leaves temporaries out).
    peak = (
      m.argument_size_in_bytes
      + m.output_size_in_bytes
      - m.alias_size_in_bytes
      + m.temp_size_in_bytes
    )
    held = sharding.state_bytes((shapes.params, shapes.opt_state, shapes.ema_params), lay)
    row = {
      "config": args.config,
      "what": "memory",
      "batch": args.batch,
      "params": n_params,
      "backend": jax.default_backend(),
      "devices": jax.device_count(),
      "fsdp": fsdp,
      "state_mb_per_device": round(held / 2**20, 2),
      "step_peak_mb_per_device": round(peak / 2**20, 2),
      "step_temp_mb_per_device": round(m.temp_size_in_bytes / 2**20, 2),
      "compile_s": round(compile_s, 2),
    }
    print(json.dumps(row), flush=True)
    print(
      f"| {args.config} {' '.join(args.config_overrides)} | {n_params / 1e6:.1f}M | "
      f"{jax.device_count()} | {fsdp} | {row['state_mb_per_device']} | "
      f"{row['step_peak_mb_per_device']} | {row['compile_s']} |",
      flush=True,
    )


def extractor(kind: str, num_classes: int, image_shape: tuple[int, int, int]) -> tuple[Any, int]:
  """(fid50k.Extractor with random weights, its analytic FLOPs per image): "inception" (the FID
  Inception v3 at 299x299) or "feature_net" (the in-house net at the images' size). The weights
  are drawn in NumPy from the abstract initialisation (nothing compiled): kernels ~ N(0, 1/fan_in),
  BatchNorm variances 1, everything else 0."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import traverse_util

  from diffusion import flops
  from diffusion.evaluation import fid50k
  from diffusion.metrics import feature_net, inception

  rng = np.random.default_rng(0)
  if kind == "inception":
    module, shape = inception.InceptionV3(logits=True), (1, inception.SIZE, inception.SIZE, 3)
  else:
    module, shape = feature_net.FeatureNet(max(num_classes, 4)), (1, *image_shape)
  abstract = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros(shape))

  def fill(path: tuple[str, ...], leaf: Any) -> np.ndarray:
    if path[-1] == "kernel":
      fan_in = int(np.prod(leaf.shape[:-1]))
      return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(np.float32)
    return np.full(leaf.shape, 1.0 if path[-1] in ("var", "scale") else 0.0, np.float32)

  flat = traverse_util.flatten_dict(abstract)
  variables = traverse_util.unflatten_dict({k: fill(k, v) for k, v in flat.items()})
  if kind == "inception":
    ext = fid50k.inception_extractor(variables)
  else:
    meta = {
      "num_outputs": max(num_classes, 4),  # a classifier, or the 4-way rotation net
      "kind": "classifier" if num_classes else "rotation",
      "feature_scale": 1.0,
    }
    ext = fid50k.feature_net_extractor(feature_net.FeatureNetwork(variables, meta))
  images = jax.ShapeDtypeStruct((1, *image_shape), jnp.uint8)
  return ext, flops.count(ext.apply, ext.variables, images)


if __name__ == "__main__":
  runtime.relaunch_with_malloc_tunables()
  main()
