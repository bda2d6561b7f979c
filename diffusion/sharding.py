"""Fully sharded data parallelism (FSDP / ZeRO-3): which arrays are split over the `fsdp` mesh
axis, and the collectives a per-device step uses on them.

The mesh is (`data`, `fsdp`) = (N / fsdp, fsdp) (`parallel.make_mesh`). The batch is split over
both axes; every array of the train state (parameters, Adam moments, EMA, post-hoc EMAs) of at
least `min_size` elements is split over `fsdp` along its largest dimension divisible by the axis
size, the others are replicated. The rule depends on the shape alone, so a parameter and its
moments and EMAs are split alike. A step `gather`s the parameters (all-gather over `fsdp`),
computes per-device gradients of the full parameters and `reduce`s them (reduce-scatter over
`fsdp`, sum over `data`, divided by N): each device keeps 1/fsdp of the state between steps.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging
from jax.sharding import PartitionSpec as P

DATA, FSDP = "data", "fsdp"
REPLICATED = -1  # Layout.dim of an array kept whole on every device


@dataclasses.dataclass(frozen=True)
class Layout:
  """How a per-device step sees the devices.

  batch_axes: the mesh axes the batch is split over, major first (the device's position in them
    orders the global batch). fsdp: the size of the FSDP axis (1: every array replicated).
    min_size: arrays with fewer elements stay replicated.
  The default is plain data parallelism over one axis "data" (what `jax.pmap(axis_name="data")`
  runs).
  """

  batch_axes: tuple[str, ...] = (DATA,)
  fsdp: int = 1
  min_size: int = 2**12

  def dim(self, shape: tuple[int, ...]) -> int:
    """The dimension an array of `shape` is split along over FSDP, or REPLICATED: the largest
    dimension divisible by the axis size (the last of equals) for arrays of >= min_size
    elements."""
    if self.fsdp == 1 or math.prod(shape) < max(self.min_size, 1):
      return REPLICATED
    fits = [(n, i) for i, n in enumerate(shape) if n % self.fsdp == 0]
    return max(fits)[1] if fits else REPLICATED

  def leaf_dim(self, x: Any) -> int:
    """`dim` of an array or ShapeDtypeStruct; integer arrays (steps, keys) stay replicated."""
    if not jnp.issubdtype(x.dtype, jnp.floating):
      return REPLICATED
    return self.dim(tuple(x.shape))

  def spec(self, x: Any) -> P:
    d, n = self.leaf_dim(x), len(x.shape)
    return P() if d == REPLICATED else P(*[FSDP if i == d else None for i in range(n)])

  def specs(self, tree: Any) -> Any:
    """PartitionSpecs of every leaf of `tree` (arrays or ShapeDtypeStructs); a train state's
    `distill` (consistency distillation's teacher and target) is replicated."""
    distill = getattr(tree, "distill", None)
    if distill is not None:
      rest = jax.tree.map(self.spec, tree.replace(distill=None))
      return rest.replace(distill=jax.tree.map(lambda _: P(), distill))
    return jax.tree.map(self.spec, tree)

  def dims(self, tree: Any) -> Any:
    return jax.tree.map(self.leaf_dim, tree)

  def unsplit(self, tree: Any) -> list[tuple[str, tuple[int, ...]]]:
    """(path, shape) of the arrays of >= min_size elements that no dimension lets split."""
    if self.fsdp == 1:
      return []
    out = []
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
      shape = tuple(x.shape)
      big = math.prod(shape) >= max(self.min_size, 1) and jnp.issubdtype(x.dtype, jnp.floating)
      if big and self.dim(shape) == REPLICATED:
        out.append((jax.tree_util.keystr(path), shape))
    return out

  def log_unsplit(self, tree: Any) -> None:
    """One log line naming the large arrays kept whole (no dimension divisible by fsdp)."""
    left = self.unsplit(tree)
    if left and jax.process_index() == 0:
      shown = ", ".join(f"{p} {s}" for p, s in left[:5]) + (" ..." if len(left) > 5 else "")
      logging.info(
        "fsdp=%d: %d arrays have no dimension divisible by %d and stay replicated: %s",
        self.fsdp,
        len(left),
        self.fsdp,
        shown,
      )

  # ---- inside a per-device step (shard_map or pmap) -----------------------------------------

  def device_index(self) -> jax.Array:
    """This device's position in the batch split (int32 scalar, major axis first)."""
    idx = jnp.int32(0)
    for a in self.batch_axes:
      idx = idx * jax.lax.axis_size(a) + jax.lax.axis_index(a)
    return idx

  def gather(self, params: Any, dims: Any) -> Any:
    """The full parameters from this device's shards (all-gather over fsdp), typed per device
    (varying over every batch axis), so that their gradients are this device's own."""

    def one(x, d):
      if d != REPLICATED:
        x = jax.lax.all_gather(x, FSDP, axis=d, tiled=True)
      return _varying(x, self.batch_axes)

    return jax.tree.map(one, params, dims)

  def full(self, params: Any, dims: Any) -> Any:
    """The full arrays from this device's shards, the same on every device (all-gather)."""

    def one(x, d):
      return (
        x if d == REPLICATED else jax.lax.all_gather(x, FSDP, axis=d, tiled=True, to="invariant")
      )

    return jax.tree.map(one, params, dims)

  def reduce(self, grads: Any, dims: Any) -> Any:
    """The mean over devices of per-device gradients of the full parameters, as this device's
    shards: reduce-scatter over fsdp, sum over the other axes, / device count."""
    n = 1
    for a in self.batch_axes:
      n *= jax.lax.axis_size(a)
    rest = tuple(a for a in self.batch_axes if a != FSDP)

    def one(g, d):
      if d == REPLICATED:
        return jax.lax.psum(g, self.batch_axes) / n
      g = jax.lax.psum_scatter(g, FSDP, scatter_dimension=d, tiled=True)
      return (jax.lax.psum(g, rest) if rest else g) / n

    return jax.tree.map(one, grads, dims)

  def mean(self, x: Any) -> Any:
    """pmean over every batch axis (per-device scalars -> the global mean)."""
    return jax.lax.pmean(x, self.batch_axes)

  def sum_squares(self, tree: Any, dims: Any) -> jax.Array:
    """sum(x^2) over every element of the full arrays whose shards (per `dims`) this device
    holds; the same on every device."""
    split, whole = jnp.float32(0.0), jnp.float32(0.0)
    for x, d in zip(jax.tree.leaves(tree), jax.tree.leaves(dims), strict=True):
      s = jnp.sum(jnp.square(x.astype(jnp.float32)))
      if d == REPLICATED:
        whole = whole + s
      else:
        split = split + s
    if self.fsdp > 1:
      split = jax.lax.psum(split, FSDP)
    return split + whole

  def all_finite(self, tree: Any) -> jax.Array:
    """Whether every element of every array (all shards) is finite, on every device."""
    ok = jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))
    if self.fsdp > 1:
      ok = jax.lax.pmin(ok.astype(jnp.int32), FSDP) > 0
    return ok


def _varying(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
  missing = tuple(a for a in axes if a not in jax.typeof(x).mat.varying)
  return jax.lax.pcast(x, missing, to="varying") if missing else x


def state_bytes(tree: Any, layout: Layout) -> int:
  """Bytes of `tree` (arrays or ShapeDtypeStructs) that one device holds under `layout`."""
  total = 0
  for x in jax.tree.leaves(tree):
    n = math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
    total += n if layout.leaf_dim(x) == REPLICATED else n // layout.fsdp
  return total
