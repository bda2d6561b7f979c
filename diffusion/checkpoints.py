"""Checkpoints: a thin wrapper over orbax's CheckpointManager.

Saves are atomic (orbax writes to a temporary directory and renames it when complete), so a run
killed mid-save leaves the previous checkpoint readable and the partial one is ignored. Every
process takes part in saving and restoring (orbax coordinates multi-host writes).

Faults:
- A save that fails (disk full, a folder that cannot be written) raises CheckpointSaveError,
  naming the step, the folder and the cause, at the latest at the next `check`, `save`, `wait` or
  `close`. orbax removes old steps only after a new one is complete, so the earlier checkpoints
  stay. Folders are made in the caller's thread: one that cannot be made fails there, instead of
  leaving orbax's writer threads waiting for it (up to 5 minutes each, keeping the process alive).
  orbax's own tracebacks of a failed save or read (one per array and thread) are left out of the
  log: the error carries the cause.
- A damaged checkpoint (unreadable metadata or arrays) is skipped when no step is asked for:
  `restore` and `restore_host` read the newest intact one and log which one was damaged; a
  writable Checkpointer moves the damaged ones aside, never deleting them, to
  <directory>_damaged/<step>.<n>. If none is intact they raise DamagedCheckpointError and move
  nothing. A checkpoint of another model is a ShapeMismatchError, never damage. (Bytes flipped
  inside an array chunk that zstd could not compress go unnoticed: TensorStore keeps no checksum
  of chunk data; truncated, zeroed or missing files are caught.)
"""

from __future__ import annotations

import logging as std_logging
import os
import re
import sys
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from diffusion import storage

_ORBAX = f"{os.sep}orbax{os.sep}"


class ShapeMismatchError(ValueError):
  """A checkpoint was written by a model of another shape."""


class DamagedCheckpointError(ValueError):
  """A checkpoint cannot be read (truncated or corrupted files, missing metadata)."""


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written (disk full, a folder that cannot be written). A fault of
  the machine, not of the config; the earlier checkpoints are kept."""

  def __init__(self, step: int | None, directory: str, cause: BaseException, kept: list[int]):
    self.step, self.directory = step, directory
    newest = f"the newest is step {kept[-1]}" if kept else "there is none yet"
    what = "a checkpoint" if step is None else f"the checkpoint of step {step}"
    super().__init__(
      f"saving {what} in {directory} failed: {_describe(cause)}. The earlier checkpoints are "
      f"kept ({newest}); free disk space or make the folder writable, then relaunch with the "
      "same --workdir to resume."
    )


# Where TensorStore's messages turn into reprs of its spec or of bound pybind11 methods.
_REPR = re.compile(r"\s*(\[tensorstore_spec=|<bound method |TensorStore\(\{).*", re.S)


def _describe(e: BaseException) -> str:
  """An exception as one line: its type and the first line of its message, without the specs
  and object reprs TensorStore appends, at most 300 characters."""
  text = _REPR.sub("", str(e).strip()).splitlines()
  line = text[0] if text else ""
  return f"{type(e).__name__}: {line if len(line) <= 300 else line[:297] + '...'}"


def _path(keys) -> str:
  """A tree path as "a/b/0", the same whether the tree holds dicts or dataclasses."""
  name = lambda k: str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
  return "/".join(name(k) for k in keys)


def check_shapes(saved: Any, wanted: Any, *, where: str = "") -> None:
  """Raises ShapeMismatchError naming every array whose shape differs between `saved` (a
  checkpoint's tree or its metadata) and `wanted` (what this config's model needs)."""
  shapes = lambda tree: {
    _path(k): tuple(getattr(v, "shape", np.shape(v)) or ())
    for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]
  }
  have, want = shapes(saved), shapes(wanted)
  diffs = [
    f"{k}: checkpoint {have.get(k, 'missing')} vs config {want.get(k, 'missing')}"
    for k in sorted(set(want) | set(have))
    if have.get(k) != want.get(k)
  ]
  if diffs:
    shown = "\n  ".join(diffs[:10]) + (
      f"\n  ... and {len(diffs) - 10} more" if len(diffs) > 10 else ""
    )
    raise ShapeMismatchError(
      f"the checkpoint{where} was written by a model of another shape:\n  {shown}\nUse the "
      "config that wrote it (the workdir's config.json), or a new --workdir for this model."
    )


def _through_orbax(e: BaseException | None) -> bool:
  """Whether `e`, or an exception it arose from, was raised in orbax's code."""
  seen = 0
  while e is not None and seen < 8:
    tb = e.__traceback__
    while tb is not None:
      if _ORBAX in tb.tb_frame.f_code.co_filename:
        return True
      tb = tb.tb_next
    e, seen = e.__cause__ or e.__context__, seen + 1
  return False


class _OrbaxTracebacks(std_logging.Filter):
  """Drops the error records with tracebacks that a failed save or read makes orbax and asyncio
  log (one per array and thread, "exception was never retrieved", "Event loop is closed"): the
  Checkpointer raises one error with the cause instead."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.levelno < std_logging.ERROR or not record.exc_info:
      return True
    return _ORBAX not in record.pathname and not _through_orbax(record.exc_info[1])


def _quiet_orbax_failures() -> None:
  """Installs the filter on the loggers orbax (absl) and asyncio write to, and drops the
  unraisable exceptions of a failed read or write: orbax's coroutines collected unfinished, and
  TensorStore's callbacks into orbax's event loops after they closed ("Event loop is closed")."""
  for name in ("absl", "asyncio"):
    logger = std_logging.getLogger(name)
    if not any(isinstance(f, _OrbaxTracebacks) for f in logger.filters):
      logger.addFilter(_OrbaxTracebacks())
  hook = sys.unraisablehook
  if getattr(hook, "_drops_orbax", False):
    return

  def unraisable(u) -> None:
    code = getattr(u.object, "cr_code", None)
    closed = isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed"
    if not (closed or _through_orbax(u.exc_value) or _ORBAX in getattr(code, "co_filename", "")):
      hook(u)

  unraisable._drops_orbax = True
  sys.unraisablehook = unraisable


def _everywhere(ok: bool) -> bool:
  """Whether `ok` holds on every process (a collective when there are several)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils

  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


class Checkpointer:
  """Save every N steps (the caller decides when), keep the newest `keep` plus every
  `keep_every`-th step permanently (0: none), asynchronously by default.

  `read_only=True` (sampling, evaluation) never writes, creates, moves or cleans up: a training
  run may be saving into the same directory, and cleanup would delete its unfinished save.
  """

  def __init__(
    self,
    directory: str,
    *,
    keep: int | None = 3,
    keep_every: int = 0,
    async_save: bool = True,
    read_only: bool = False,
  ):
    self.directory = storage.absolute(directory)  # a gs:// URL as it is
    self.read_only = read_only
    self.restored_step: int | None = None  # the step the last restore read
    self._pending: int | None = None  # the step of a save that may still be running
    _quiet_orbax_failures()
    if read_only:
      options = ocp.CheckpointManagerOptions(
        read_only=True,
        max_to_keep=None,
        save_interval_steps=0,
        create=False,
        enable_async_checkpointing=False,
        cleanup_tmp_directories=False,
      )
    else:
      options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        keep_period=keep_every or None,
        create=True,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
        async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
      )
    self._manager = ocp.CheckpointManager(
      self.directory, options=options, item_handlers=ocp.StandardCheckpointHandler()
    )

  @property
  def damaged_directory(self) -> str:
    """Where damaged checkpoints are moved: <directory>_damaged, beside the directory."""
    return self.directory.rstrip(os.sep) + "_damaged"

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step (which may be damaged), or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  # ---- saving ------------------------------------------------------------------------------

  def save(self, step: int, state: Any, *, force: bool = True) -> None:
    """Starts saving `state` (any pytree of arrays) as `step`; returns before it is written when
    asynchronous. A step already saved is left as it is. Raises CheckpointSaveError if the
    previous save or this one failed."""
    self.wait()
    if step in self._manager.all_steps():
      return
    try:
      self._manager.save(step, args=ocp.args.StandardSave(state), force=force)
    except Exception as e:
      raise self._save_error(step, e) from e
    self._pending = step

  def saving(self) -> bool:
    """Whether a save is still being written."""
    return self._pending is not None and self._manager.is_saving_in_progress()

  def check(self) -> None:
    """Raises CheckpointSaveError if the save in flight has failed; returns at once while it is
    still being written (call it often: at log steps)."""
    if self._pending is not None and not self.saving():
      self.wait()

  def wait(self) -> None:
    """Blocks until the save in flight is written; raises CheckpointSaveError if it failed."""
    step, self._pending = self._pending, None
    try:
      self._manager.wait_until_finished()
    except Exception as e:
      raise self._save_error(step, e) from e

  def close(self) -> None:
    """Waits for the save in flight (CheckpointSaveError if it failed) and stops orbax's threads,
    after a failure too."""
    try:
      self.wait()
    except BaseException:
      try:  # orbax's close raises again about the failed save: keep the first error
        self._manager.close()
      except Exception as e:
        logging.warning("closing the checkpoint manager after a failed save: %s", _describe(e))
      raise
    self._manager.close()

  def _save_error(self, step: int | None, cause: BaseException) -> CheckpointSaveError:
    kept = sorted(s for s in self._manager.all_steps() if s != step)
    return CheckpointSaveError(step, self.directory, cause, kept)

  # ---- restoring ---------------------------------------------------------------------------

  def restore(self, target: Any, step: int | None = None) -> Any:
    """Restores `step` (default: the newest intact checkpoint) into the structure, shapes,
    dtypes and shardings of `target`. Raises ShapeMismatchError naming every differing array,
    DamagedCheckpointError for a damaged `step` or when none is intact."""
    abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      target,
    )
    return self._restore(step, target, abstract)

  def restore_host(self, step: int | None = None) -> Any:
    """Restores `step` (default: the newest intact checkpoint) as it was saved, as host NumPy
    arrays, whatever devices wrote it (for sampling, evaluation and inspection)."""
    return jax.tree.map(np.asarray, self._restore(step, None, None))

  def _restore(self, step: int | None, target: Any, abstract: Any) -> Any:
    if step is not None:
      out = self._read(step, target, abstract)
      self.restored_step = step
      return out
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"no complete checkpoint in {self.directory}.")
    damaged = []
    for step in steps:
      out, error = None, None
      try:
        out = self._read(step, target, abstract)
      except DamagedCheckpointError as e:
        error = e
      if _everywhere(error is None):
        break
      damaged.append(
        (
          step,
          error
          or DamagedCheckpointError(
            f"checkpoint step {step} in {self.directory} is damaged on another process."
          ),
        )
      )
    else:
      listed = "\n  ".join(str(e) for _, e in damaged)
      raise DamagedCheckpointError(
        f"no intact checkpoint in {self.directory}; every step is damaged (nothing was moved):"
        f"\n  {listed}\nMove the folder away to train afresh, or use a new --workdir."
      )
    self._set_aside(damaged, step)
    self.restored_step = step
    return out

  def _read(self, step: int, target: Any, abstract: Any) -> Any:
    """`step` restored into `abstract` (None: as saved, on the host CPU), after checking its
    shapes against `target`. Raises DamagedCheckpointError if it cannot be read."""
    where = f" at step {step} in {self.directory}"
    try:
      meta = self._manager.item_metadata(step)
      if meta is None:
        raise FileNotFoundError("its array metadata (_METADATA) is missing")
      if abstract is None:
        cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
        abstract = jax.tree.map(
          lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=cpu), meta
        )
    except Exception as e:
      raise self._damaged(step, e) from e
    if target is not None:
      check_shapes(meta, target, where=where)
    try:
      return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:
      raise self._damaged(step, e) from e

  def _damaged(self, step: int, cause: BaseException) -> DamagedCheckpointError:
    return DamagedCheckpointError(
      f"checkpoint step {step} in {self.directory} is damaged ({_describe(cause)}); the saved "
      f"steps are {sorted(self._manager.all_steps())}."
    )

  def _set_aside(self, damaged: list[tuple[int, Exception]], used: int) -> None:
    """Logs each damaged step skipped in favour of `used`; a writable Checkpointer moves it to
    <directory>_damaged/<step>.<n> (process 0; n counts the times that step was damaged)."""
    if not damaged:
      return
    lead = jax.process_index() == 0
    for step, error in damaged:
      if self.read_only:
        if lead:
          logging.warning(
            "%s Skipped it (read-only: nothing moved); reading step %d instead.", error, used
          )
        continue
      if lead:
        storage.makedirs(self.damaged_directory)
        n = 1
        while storage.exists(os.path.join(self.damaged_directory, f"{step}.{n}")):
          n += 1
        dest = os.path.join(self.damaged_directory, f"{step}.{n}")
        storage.rename(os.path.join(self.directory, str(step)), dest)
        logging.warning("%s Moved it to %s; resuming from step %d.", error, dest, used)
    if not self.read_only:
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("diffusion.checkpoints.set_aside")
      self._manager.reload()
