"""Analytic FLOP counts: the convolutions and matrix products of a traced function, from shapes.

Convention: a multiply-add is 2 FLOPs; only `conv_general_dilated` and `dot_general` are counted
(convolutions, dense layers, the attention's QK^T and AV products); normalisations, activations,
softmax and additions are left out (a few % of the work, and memory-bound). A training step is
counted as 3x the forward pass (the backward pass computes the gradient with respect to the
activations and to the weights, each as costly as the forward pass; `TRAIN_FACTOR`).

The count walks `jax.make_jaxpr` of the function on abstract inputs (nothing is computed or
compiled), so it is exact for these operations and the same on every backend. XLA's own
`cost_analysis` is not: on GPUs it leaves out the convolutions that run as cuDNN custom calls.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core

TRAIN_FACTOR = 3  # training FLOPs per image = TRAIN_FACTOR x forward FLOPs per image


def _eqn_flops(eqn: Any) -> int:
  """FLOPs of one conv_general_dilated or dot_general equation (0 for any other primitive)."""
  name, out = eqn.primitive.name, eqn.outvars[0].aval.shape
  if name == "dot_general":
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    return 2 * math.prod(out) * math.prod(lhs[d] for d in lhs_contract)
  if name == "conv_general_dilated":
    # Each output element sums over the kernel entries of its output feature: prod(rhs) / O
    # (the kernel's in-feature dim is already C_in / feature_group_count).
    rhs = eqn.invars[1].aval.shape
    out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
    return 2 * math.prod(out) * math.prod(rhs) // out_features
  return 0


def jaxpr_flops(jaxpr: core.Jaxpr | core.ClosedJaxpr) -> int:
  """FLOPs of the convolutions and matrix products of a jaxpr, nested jaxprs included (jit, remat,
  custom_jvp/vjp bodies once; scan bodies `length` times; the costliest branch of a cond).
  Raises ValueError for a while loop (its trip count is not in the jaxpr)."""
  jaxpr = jaxpr.jaxpr if isinstance(jaxpr, core.ClosedJaxpr) else jaxpr
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "while":
      raise ValueError("a while loop's FLOPs depend on its trip count; count its body instead.")
    if name == "cond":
      total += max(jaxpr_flops(b) for b in eqn.params["branches"])
      continue
    total += _eqn_flops(eqn)
    times = eqn.params["length"] if name == "scan" else 1
    for sub in core.jaxprs_in_params(eqn.params):
      total += times * jaxpr_flops(sub)
  return total


def count(fn: Callable, *args: Any, **kwargs: Any) -> int:
  """FLOPs of `fn(*args, **kwargs)`; args may be arrays or jax.ShapeDtypeStruct (abstract)."""
  return jaxpr_flops(jax.make_jaxpr(lambda *a: fn(*a, **kwargs))(*args))


def net_forward(net: Any, image_shape: tuple[int, int, int], *, batch: int = 1) -> int:
  """Forward FLOPs of a network of diffusion/nets (UNet, DiT) for `batch` images of (H, W, C),
  unconditional (a label embedding is a lookup), counted with XLA's attention (the same products
  as cuDNN's fused kernel: QK^T and AV are dot_generals) and float32 (the count ignores dtype)."""
  net = net.clone(attention_impl=None, dtype=jnp.float32)
  x = jax.ShapeDtypeStruct((batch, *image_shape), jnp.float32)
  cond = jax.ShapeDtypeStruct((batch,), jnp.float32)
  params = jax.eval_shape(lambda x, c: net.init(jax.random.PRNGKey(0), x, c, train=False), x, cond)
  return count(lambda p, x, c: net.apply(p, x, c, train=False), params, x, cond)


unet_forward = net_forward  # the name callers used before there were other networks
