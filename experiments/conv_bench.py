"""GFLOP/s of single 3x3 convolutions, forward and forward+backward, in XLA:CPU or PyTorch.

Run:  python experiments/conv_bench.py                       # JAX, the program's default flags
      python experiments/conv_bench.py --no_default_flags    # XLA:CPU's YNNPACK convolutions
      ~/peer-venv/bin/python experiments/conv_bench.py --torch   # the peer's oneDNN kernels
The shapes are the convolutions of the two benchmark networks (batch, size, channels in, out):
the cifar10 network at batch 16 and the peer network at batch 64. Each figure is the median of
five 1-second windows; the backward computes both the input and the kernel gradients (3x the
forward FLOPs). Compare kernels with it; whole steps with experiments/benchmark.py.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

SHAPES = [(16, 32, 32, 128, 128), (16, 16, 16, 256, 256), (16, 8, 8, 256, 256),
          (16, 4, 4, 256, 256), (64, 16, 16, 32, 32), (64, 8, 8, 64, 64), (64, 4, 4, 128, 128)]


def median_ms(fn) -> float:
  fn()
  fn()
  out = []
  for _ in range(5):
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < 1.0:
      fn()
      n += 1
    out.append((time.perf_counter() - start) / n * 1e3)
  return statistics.median(out)


def jax_fns(n: int, h: int, ci: int, co: int):
  import jax
  import jax.numpy as jnp

  x = jax.random.normal(jax.random.PRNGKey(0), (n, h, h, ci))
  k = jax.random.normal(jax.random.PRNGKey(1), (3, 3, ci, co))

  def conv(x, k):
    return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  fwd = jax.jit(conv)
  grad = jax.jit(jax.grad(lambda x, k: jnp.sum(conv(x, k) ** 2), argnums=(0, 1)))
  return (lambda: jax.block_until_ready(fwd(x, k)),
          lambda: jax.block_until_ready(grad(x, k)))


def torch_fns(n: int, h: int, ci: int, co: int):
  import torch

  conv = torch.nn.Conv2d(ci, co, 3, padding=1, bias=False)
  x = torch.randn(n, ci, h, h, requires_grad=True)

  def fwd():
    with torch.no_grad():
      conv(x)

  def grad():
    y = conv(x)
    (y * y).sum().backward()

  return fwd, grad


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--torch", action="store_true", help="time PyTorch (2 threads) instead of JAX")
  p.add_argument("--no_default_flags", action="store_true")
  args = p.parse_args()
  if args.torch:
    import torch

    torch.set_num_threads(2)
    make, name = torch_fns, f"torch {torch.__version__}"
  else:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from diffusion import perf

    if not args.no_default_flags:
      perf.configure_xla()
    import jax

    make, name = jax_fns, f"jax {jax.__version__}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
  print(f"# {name}\n| batch, size, in, out | forward GFLOP/s | forward+backward GFLOP/s |\n"
        "|---|---|---|")
  for n, h, _, ci, co in SHAPES:
    flops = 2 * n * h * h * ci * co * 9
    fwd, grad = make(n, h, ci, co)
    print(f"| {n}, {h}, {ci}, {co} | {flops / median_ms(fwd) / 1e6:.0f} | "
          f"{3 * flops / median_ms(grad) / 1e6:.0f} |", flush=True)


if __name__ == "__main__":
  main()
