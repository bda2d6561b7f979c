"""GFLOP/s of single 3x3 convolutions, forward and forward+backward, in XLA:CPU or PyTorch.

Run:  python experiments/conv_bench.py                       # JAX, the program's default flags
      python experiments/conv_bench.py --no_default_flags    # XLA:CPU's YNNPACK convolutions
      ~/peer-venv/bin/python experiments/conv_bench.py --torch   # the peer's oneDNN kernels
      python experiments/conv_bench.py --kernel_grad_variants    # other ways to get dL/dkernel
The shapes are the convolutions of the two benchmark networks (batch, size, channels in, out):
the cifar10 network at batch 16 and the peer network at batch 64. Each figure is the median of
five 1-second windows. Columns: the forward pass, the input gradient alone, the kernel gradient
alone (each the forward's FLOPs), and forward+backward (both gradients, 3x the forward FLOPs).
Compare kernels with it; whole steps with experiments/benchmark.py.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

SHAPES = [
  (16, 32, 32, 128, 128),
  (16, 16, 16, 256, 256),
  (16, 8, 8, 256, 256),
  (16, 4, 4, 256, 256),
  (64, 16, 16, 32, 32),
  (64, 8, 8, 64, 64),
  (64, 4, 4, 128, 128),
]


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


def conv(x, k):
  """The networks' 3x3 convolution (imports JAX only when called)."""
  import jax

  return jax.lax.conv_general_dilated(
    x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )


def jax_fns(n: int, h: int, ci: int, co: int):
  import jax
  import jax.numpy as jnp

  x = jax.random.normal(jax.random.PRNGKey(0), (n, h, h, ci))
  k = jax.random.normal(jax.random.PRNGKey(1), (3, 3, ci, co))
  g = jax.random.normal(jax.random.PRNGKey(2), (n, h, h, co))
  fwd = jax.jit(conv)
  dx = jax.jit(lambda x, k, g: jax.vjp(lambda x: conv(x, k), x)[1](g)[0])
  dk = jax.jit(lambda x, k, g: jax.vjp(lambda k: conv(x, k), k)[1](g)[0])
  grad = jax.jit(jax.grad(lambda x, k: jnp.sum(conv(x, k) ** 2), argnums=(0, 1)))
  return (
    lambda: jax.block_until_ready(fwd(x, k)),
    lambda: jax.block_until_ready(dx(x, k, g)),
    lambda: jax.block_until_ready(dk(x, k, g)),
    lambda: jax.block_until_ready(grad(x, k)),
  )


def kernel_grad_variants(n: int, h: int, ci: int, co: int) -> dict:
  """dL/dkernel three ways: XLA's own (a convolution of the transposed tensors), nine per-tap
  matmuls over shifted views, and im2col (the 9x larger patch matrix) then one matmul."""
  import jax
  import jax.numpy as jnp

  x = jax.random.normal(jax.random.PRNGKey(0), (n, h, h, ci))
  g = jax.random.normal(jax.random.PRNGKey(2), (n, h, h, co))
  shifted = lambda x: [
    jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))[:, a : a + h, b : b + h]
    for a in range(3)
    for b in range(3)
  ]  # tap (a, b) -> x[n, y+a-1, x+b-1]
  over_pixels = (((0, 1, 2), (0, 1, 2)), ((), ()))
  fns = {
    "xla": lambda x, g: jax.vjp(lambda k: conv(x, k), jnp.zeros((3, 3, ci, co)))[1](g)[0],
    "taps": lambda x, g: jnp.stack(
      [jax.lax.dot_general(s, g, over_pixels) for s in shifted(x)]
    ).reshape(3, 3, ci, co),
    "im2col": lambda x, g: (
      g.reshape(-1, co).T @ jnp.concatenate(shifted(x), -1).reshape(-1, 9 * ci)
    ).T.reshape(3, 3, ci, co),
  }
  fns = {name: jax.jit(f) for name, f in fns.items()}
  want = fns["xla"](x, g)
  for name, f in fns.items():
    err = float(jnp.max(jnp.abs(f(x, g) - want)) / jnp.max(jnp.abs(want)))
    assert err < 1e-4, f"{name} disagrees with XLA's kernel gradient: relative error {err:.1e}"
  return {name: lambda f=f: jax.block_until_ready(f(x, g)) for name, f in fns.items()}


def torch_fns(n: int, h: int, ci: int, co: int):
  import torch

  layer = torch.nn.Conv2d(ci, co, 3, padding=1, bias=False)
  x = torch.randn(n, ci, h, h, requires_grad=True)
  g = torch.randn(n, co, h, h)

  def fwd():
    with torch.no_grad():
      layer(x)

  def backward(which: tuple[bool, bool, bool]):
    def run():
      with torch.no_grad():
        torch.ops.aten.convolution_backward(
          g, x, layer.weight, None, (1, 1), (1, 1), (1, 1), False, (0, 0), 1, which
        )

    return run

  def grad():
    y = layer(x)
    (y * y).sum().backward()

  return fwd, backward((True, False, False)), backward((False, True, False)), grad


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--torch", action="store_true", help="time PyTorch (2 threads) instead of JAX")
  p.add_argument("--no_default_flags", action="store_true")
  p.add_argument(
    "--kernel_grad_variants",
    action="store_true",
    help="time XLA's kernel gradient against per-tap matmuls and im2col",
  )
  args = p.parse_args()
  if args.kernel_grad_variants and args.torch:
    p.error("--kernel_grad_variants times JAX formulations; drop --torch")
  if args.torch:
    import torch

    torch.set_num_threads(2)
    make, name = torch_fns, f"torch {torch.__version__}"
  else:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from diffusion import runtime

    if not args.no_default_flags:
      runtime.configure_xla()
    import jax

    make, name = jax_fns, f"jax {jax.__version__}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
  if args.kernel_grad_variants:
    print(
      f"# {name}, kernel gradient GFLOP/s\n| batch, size, in, out | XLA | nine tap matmuls "
      "| im2col + matmul |\n|---|---|---|---|"
    )
    for n, h, _, ci, co in SHAPES:
      flops = 2 * n * h * h * ci * co * 9
      rates = [flops / median_ms(fn) / 1e6 for fn in kernel_grad_variants(n, h, ci, co).values()]
      print(f"| {n}, {h}, {ci}, {co} | " + " | ".join(f"{r:.0f}" for r in rates) + " |", flush=True)
    return
  print(
    f"# {name}, GFLOP/s\n| batch, size, in, out | forward | input gradient | kernel gradient "
    "| forward+backward |\n|---|---|---|---|---|"
  )
  for n, h, _, ci, co in SHAPES:
    flops = 2 * n * h * h * ci * co * 9
    fwd, dx, dk, grad = make(n, h, ci, co)
    rates = [m * flops / median_ms(fn) / 1e6 for m, fn in ((1, fwd), (1, dx), (1, dk), (3, grad))]
    print(f"| {n}, {h}, {ci}, {co} | " + " | ".join(f"{r:.0f}" for r in rates) + " |", flush=True)


if __name__ == "__main__":
  main()
