"""Throughput of candidate U-Net sizes: forward+backward (and forward) images/s on this machine.

Run:  python experiments/unet_profile.py [--batch 64] [--size 16] [--names a,b] [--dtype float32]
Prints, per candidate, the parameter count and the median images/s of a jitted
value_and_grad of mean(output^2) (the network part of a training step, no optimiser) and of a
forward pass, with how busy other processes kept the CPU (contended repetitions are retried).
Sets XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution unless
XLA_FLAGS is already set (XLA:CPU's YNNPACK convolutions are slow here).
"""

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from configs import default  # noqa: E402
from diffusion.model import net_config  # noqa: E402
from diffusion.nets import unet  # noqa: E402

# name -> config.model overrides
CANDIDATES = {
  "xs": dict(base_channels=32, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=()),
  "s": dict(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(4,)),
  "m": dict(base_channels=32, channel_mult=(1, 2, 4), num_res_blocks=2, attn_resolutions=(4,)),
  "peer": dict(
    base_channels=32,
    channel_mult=(1, 2, 4),
    num_res_blocks=2,
    attn_resolutions=(4,),
    num_heads=1,
    film=False,
    dropout=0.1,
  ),
  "l": dict(base_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(4,)),
}


def _cpu() -> tuple[float, int, int]:
  """(time, busy jiffies of the machine, jiffies of this process)."""
  with open("/proc/stat") as f:
    v = [int(x) for x in f.readline().split()[1:]]
  with open("/proc/self/stat") as f:
    s = f.read().rsplit(")", 1)[1].split()
  return time.perf_counter(), v[0] + v[1] + v[2] + v[5] + v[6], int(s[11]) + int(s[12])


def _wait_idle(hz: int, max_wait_s: float) -> None:
  """Sleeps until other processes use < 0.15 cores over 2 s (or `max_wait_s` passed)."""
  end = time.perf_counter() + max_wait_s
  while time.perf_counter() < end:
    a = _cpu()
    time.sleep(2.0)
    b = _cpu()
    if ((b[1] - a[1]) - (b[2] - a[2])) / hz / (b[0] - a[0]) < 0.15:
      return


def bench(fn, reps: int, target_s: float, max_wait_s: float) -> tuple[float, float]:
  """(median seconds per call over repetitions of about `target_s` each, the most cores other
  processes used during one of those repetitions). A repetition during which other processes
  used more than 0.15 cores is retried after waiting up to `max_wait_s` for an idle machine (up
  to 3 * reps attempts); the median is over clean ones if at least half are clean."""
  jax.block_until_ready(fn())  # compile
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  iters = max(1, round(target_s / (time.perf_counter() - t0)))
  clean, dirty = [], []  # (seconds per call, cores other processes used)
  hz = os.sysconf("SC_CLK_TCK")
  for _ in range(3 * reps):
    a = _cpu()
    for _ in range(iters):
      out = fn()
    jax.block_until_ready(out)
    b = _cpu()
    busy = ((b[1] - a[1]) - (b[2] - a[2])) / hz / (b[0] - a[0])
    (clean if busy < 0.15 else dirty).append(((b[0] - a[0]) / iters, busy))
    if len(clean) == reps:
      break
    if busy >= 0.15 and max_wait_s > 0:
      _wait_idle(hz, max_wait_s)
  kept = clean if len(clean) >= (reps + 1) // 2 else clean + dirty
  return statistics.median(s for s, _ in kept), max(o for _, o in kept)


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--size", type=int, default=16)
  ap.add_argument("--names", default=",".join(CANDIDATES))
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--target-s", type=float, default=2.0)
  ap.add_argument("--max-wait-s", type=float, default=120.0, help="wait for idle CPU (0 = never)")
  args = ap.parse_args()
  print(
    f"jax {jax.__version__} {jax.devices()} XLA_FLAGS={os.environ.get('XLA_FLAGS')!r} "
    f"batch {args.batch} size {args.size} dtype {args.dtype}",
    flush=True,
  )
  key = jax.random.key(0)
  x = jax.random.normal(key, (args.batch, args.size, args.size, 3))
  t = jax.random.uniform(key, (args.batch,), maxval=1000.0)
  for name in args.names.split(","):
    cfg = default.get_config().model
    cfg.update(CANDIDATES[name], dtype=args.dtype)
    model = unet.create_model(net_config(cfg), image_size=args.size, channels=3)
    params = jax.jit(lambda k, m=model: m.init(k, x[:1], t[:1], train=False))(key)

    def loss(p, x, t, k, m=model):
      return jnp.mean(jnp.square(m.apply(p, x, t, train=True, rngs={"dropout": k})))

    grad = jax.jit(jax.value_and_grad(loss))
    fwd = jax.jit(lambda p, x, t, m=model: m.apply(p, x, t, train=False))
    run_train = lambda g=grad, p=params: g(p, x, t, key)
    s_train, o_train = bench(run_train, args.reps, args.target_s, args.max_wait_s)
    s_fwd, o_fwd = bench(
      lambda f=fwd, p=params: f(p, x, t), args.reps, args.target_s, args.max_wait_s
    )
    print(
      f"{name:5s} params {unet.count_params(params) / 1e6:6.3f}M  fwd+bwd "
      f"{args.batch / s_train:7.1f} img/s ({s_train * 1e3:6.1f} ms)  fwd "
      f"{args.batch / s_fwd:7.1f} img/s  (other processes: up to "
      f"{max(o_train, o_fwd):.2f} cores)",
      flush=True,
    )


if __name__ == "__main__":
  main()
