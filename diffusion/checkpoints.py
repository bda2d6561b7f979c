"""Checkpoints: a thin wrapper over orbax's CheckpointManager.

Saves are atomic (orbax writes to a temporary directory and renames it when complete), so a run
killed mid-save leaves the previous checkpoint readable and the partial one is ignored. Every
process takes part in saving and restoring (orbax coordinates multi-host writes).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class ShapeMismatchError(ValueError):
  """A checkpoint was written by a model of another shape."""


def _path(keys) -> str:
  """A tree path as "a/b/0", the same whether the tree holds dicts or dataclasses."""
  name = lambda k: str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
  return "/".join(name(k) for k in keys)


def check_shapes(saved: Any, wanted: Any, *, where: str = "") -> None:
  """Raises ShapeMismatchError naming every array whose shape differs between `saved` (a
  checkpoint's tree or its metadata) and `wanted` (what this config's model needs)."""
  shapes = lambda tree: {_path(k): tuple(getattr(v, "shape", np.shape(v)) or ())
                         for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
  have, want = shapes(saved), shapes(wanted)
  diffs = [f"{k}: checkpoint {have.get(k, 'missing')} vs config {want.get(k, 'missing')}"
           for k in sorted(set(want) | set(have)) if have.get(k) != want.get(k)]
  if diffs:
    shown = "\n  ".join(diffs[:10]) + (f"\n  ... and {len(diffs) - 10} more"
                                       if len(diffs) > 10 else "")
    raise ShapeMismatchError(
      f"the checkpoint{where} was written by a model of another shape:\n  {shown}\nUse the "
      "config that wrote it (the workdir's config.json), or a new --workdir for this model.")


class Checkpointer:
  """Save every N steps (the caller decides when), keep the newest `keep` plus every
  `keep_every`-th step permanently (0: none), asynchronously by default.

  `read_only=True` (sampling, evaluation) never writes, creates or cleans up: a training run may be
  saving into the same directory, and cleanup would delete its unfinished save.
  """

  def __init__(self, directory: str, *, keep: int = 3, keep_every: int = 0,
               async_save: bool = True, read_only: bool = False):
    self.directory = os.path.abspath(directory)
    if read_only:
      options = ocp.CheckpointManagerOptions(
        read_only=True, max_to_keep=None, save_interval_steps=0, create=False,
        enable_async_checkpointing=False, cleanup_tmp_directories=False)
    else:
      options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, keep_period=keep_every or None, create=True,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_handlers=ocp.StandardCheckpointHandler())

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, *, force: bool = True) -> None:
    """Starts saving `state` (any pytree of arrays) as `step`; returns before it is written when
    asynchronous. A step already saved is left as it is."""
    if step in self._manager.all_steps():
      return
    self._manager.save(step, args=ocp.args.StandardSave(state), force=force)

  def restore(self, target: Any, step: int | None = None) -> Any:
    """Restores `step` (default newest) into the structure, shapes, dtypes and shardings of
    `target`. Raises ShapeMismatchError naming every differing array."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no complete checkpoint in {self.directory}.")
    self._check_shapes(step, target)
    abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      target)
    return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def restore_host(self, step: int | None = None) -> Any:
    """Restores `step` (default newest) as it was saved, as host NumPy arrays, whatever devices
    wrote it (for sampling, evaluation and inspection)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no complete checkpoint in {self.directory}.")
    cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=cpu),
                            self._manager.item_metadata(step))
    restored = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
    return jax.tree.map(np.asarray, restored)

  def _check_shapes(self, step: int, target: Any) -> None:
    check_shapes(self._manager.item_metadata(step), target,
                 where=f" at step {step} in {self.directory}")

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are complete."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
