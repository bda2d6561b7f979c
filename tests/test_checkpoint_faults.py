"""Checkpoint faults: a save that fails (disk full, a folder that cannot be written) and damaged
checkpoints (truncated, corrupted or missing files). No training: the compiled step is replaced
by one that only counts steps, checkpoints are fabricated, and faults are injected where orbax
hands work to the file system."""

from __future__ import annotations

import gc
import glob
import json
import logging
import os
import re
import threading
import time

import jax
import numpy as np
import pytest
from conftest import fabricate_checkpoints, run_python, tiny_config
from orbax.checkpoint._src.serialization import serialization

from diffusion import checkpoints, parallel, train

ENOSPC = (
  'RESOURCE_EXHAUSTED: Error writing "w/0" in OCDBT database at local file "{}": '
  "Failed to write 4096 bytes to file 11: No space left on device [os_error_code='28']"
)


# ---- helpers ----------------------------------------------------------------------------------


_STATES = {}  # the tiny config's initial state by seed


def counting_step(monkeypatch, on_call=None) -> None:
  """The compiled training step becomes one that only adds k to state.step and reports a finite
  loss of 1 (no compiling, no maths), so the loop's logs and saves run in milliseconds on real
  TrainStates; the tiny config's initial state is made once per session (tiny config only).
  `on_call(n)` runs inside call n (1-based)."""
  calls, real_initial_state = [0], train.initial_state

  def initial_state(diffusion, opt, seed, posthoc_sigma_rels=(), shardings=None, **kw):
    assert not posthoc_sigma_rels
    if kw.get("shapes_only"):  # a resume's target: nothing computed
      return real_initial_state(diffusion, opt, seed, shardings=shardings, **kw)
    if seed not in _STATES:
      _STATES[seed] = real_initial_state(diffusion, opt, seed, shardings=shardings)
    return _STATES[seed]

  def compile_step(per_device, mesh):
    def step(state, batches):
      k = batches["image"].shape[0]
      calls[0] += 1
      if on_call:
        on_call(calls[0])
      ones = np.ones(k, np.float32)
      return state.replace(step=state.step + k), {
        "loss": ones,
        "mse": ones,
        "grad_norm": ones,
        "learning_rate": ones,
        "finite": np.ones(k, bool),
        "stop": np.zeros(k, np.int32),
      }

    return step

  monkeypatch.setattr(parallel, "compile_step", compile_step)
  monkeypatch.setattr(train, "initial_state", initial_state)


def record_checkpointers(monkeypatch) -> list[checkpoints.Checkpointer]:
  """The Checkpointers that train.py makes, for a test to look at while the loop runs."""
  made = []

  class Recorded(checkpoints.Checkpointer):
    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      made.append(self)

  monkeypatch.setattr(checkpoints, "Checkpointer", Recorded)
  return made


def fill_disk(monkeypatch, from_step: int) -> None:
  """The disk is full for the saves of step `from_step` on: orbax's call into TensorStore that
  writes an array's chunks fails the way TensorStore fails on ENOSPC (a ValueError
  RESOURCE_EXHAUSTED ... os_error_code 28), in orbax's writer threads, as on a real full disk."""
  real = serialization.async_serialize_from_host

  async def write(rslices, spec, **kwargs):
    tmp = re.search(r"[^\"' ]*/(\d+)\.orbax-checkpoint-tmp", json.dumps(spec, default=str))
    if tmp and int(tmp.group(1)) >= from_step:
      raise ValueError(ENOSPC.format(tmp.group(0)))
    return await real(rslices, spec, **kwargs)

  monkeypatch.setattr(serialization, "async_serialize_from_host", write)


def rows(workdir) -> list[int]:
  with open(os.path.join(workdir, "metrics.jsonl")) as fh:
    return [json.loads(line)["step"] for line in fh]


def steps_on_disk(workdir, folder: str = "checkpoints") -> list[int]:
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, folder)) if d.isdigit())


def live_threads() -> set[threading.Thread]:
  return {t for t in threading.enumerate() if t.is_alive() and not t.daemon}


# ---- a save that fails --------------------------------------------------------------------------


def test_disk_full_stops_the_run_at_the_next_log_step_with_one_message(
  tmp_path, monkeypatch, caplog
):
  """ENOSPC (see fill_disk) from the save of step 8 on; step 9 is slow: it lasts until that save
  has failed in the background. The run must stop at step 9's log with one CheckpointSaveError
  naming step 8, the folder and the cause, keep step 4, and leave no orbax thread behind. Before:
  training went on to the save of step 12, where the failure came out as TensorStore's
  ValueError (a "user error" to launch.py) after orbax logged a traceback per thread."""
  made = record_checkpointers(monkeypatch)

  def slow_step(n):
    if n == 9:
      deadline = time.time() + 60
      while made[0].saving() and time.time() < deadline:
        time.sleep(0.01)

  counting_step(monkeypatch, slow_step)
  fill_disk(monkeypatch, from_step=8)
  caplog.set_level(logging.ERROR)
  before = live_threads()
  c = tiny_config(num_steps=16, log_every=1, checkpoint_every=4)
  with pytest.raises(checkpoints.CheckpointSaveError) as err:
    train.train(c, str(tmp_path))
  gc.collect()  # asyncio reports the failed writes' tasks when they are collected
  message = str(err.value)
  assert err.value.step == 8 and f"step 8 in {tmp_path / 'checkpoints'} failed" in message
  assert "No space left on device" in message and "the newest is step 4" in message
  assert rows(tmp_path) == list(range(1, 9))  # stopped at step 9's log, before writing it
  assert steps_on_disk(tmp_path) == [4]
  assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
  assert live_threads() <= before  # orbax's threads are gone


def test_a_failed_final_save_is_an_error_and_a_relaunch_resumes(tmp_path, monkeypatch, caplog):
  """ENOSPC (see fill_disk) for the final save only: the run must not end as if it had saved
  (before: the failure came out of ckpt.close() as TensorStore's ValueError). The earlier
  checkpoint stays, and once there is space a relaunch resumes from it."""
  counting_step(monkeypatch)
  fill_disk(monkeypatch, from_step=6)
  c = tiny_config(num_steps=6, log_every=2, checkpoint_every=4)
  with pytest.raises(checkpoints.CheckpointSaveError, match="step 6 .*newest is step 4"):
    train.train(c, str(tmp_path))
  assert steps_on_disk(tmp_path) == [4]
  monkeypatch.undo()  # space again
  counting_step(monkeypatch)
  caplog.set_level(logging.INFO)
  state = train.train(c, str(tmp_path))
  assert int(state.step) == 6 and steps_on_disk(tmp_path) == [4, 6]
  assert "resumed from step 4" in caplog.text and rows(tmp_path) == [2, 4, 6]


UNWRITABLE = r"""
import errno, os, sys
import jax.numpy as jnp
from diffusion import checkpoints

directory = sys.argv[1]
ckpt = checkpoints.Checkpointer(directory)
ckpt.save(1, {"w": jnp.arange(4.0)})
ckpt.wait()
real = os.mkdir

def mkdir(path, *args, **kwargs):
  if os.fspath(path).startswith(directory):
    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
  return real(path, *args, **kwargs)

os.mkdir = mkdir  # the folder can no longer be written
try:
  try:
    ckpt.save(2, {"w": jnp.arange(4.0) + 1})
  finally:
    ckpt.close()
except Exception as e:
  print(f"{type(e).__name__}: {e}", flush=True)
  sys.exit(3)
"""


def test_an_unwritable_folder_fails_the_save_and_the_process_exits(tmp_path):
  """After a first save, os.mkdir refuses (EACCES) every path in the checkpoint folder (as root,
  chmod would not stop writes). In a subprocess with a timeout: before, the save 'succeeded', the
  failure came out of close(), and the process then hung at exit for 5 minutes, joining orbax's
  writer threads that wait for a folder that will never be made."""
  directory = str(tmp_path / "checkpoints")
  out = run_python(["-c", UNWRITABLE, directory], timeout=120)
  assert out.returncode == 3, out.stdout + out.stderr[-3000:]
  assert out.stdout.startswith(
    f"CheckpointSaveError: saving the checkpoint of step 2 in {directory} failed: PermissionError"
  ), out.stdout
  assert "Permission denied" in out.stdout and "the newest is step 1" in out.stdout
  reader = checkpoints.Checkpointer(directory, read_only=True)
  assert reader.all_steps() == [1]
  np.testing.assert_array_equal(reader.restore_host()["w"], np.arange(4.0))
  reader.close()


# ---- damaged checkpoints ------------------------------------------------------------------------


def small_state(step: int) -> dict:
  rng = np.random.default_rng(step)  # random: incompressible, so "w" has the largest file
  return {"w": rng.standard_normal((64, 33)).astype(np.float32), "b": {"c": np.arange(5) + step}}


def save_steps(directory, steps) -> None:
  ckpt = checkpoints.Checkpointer(str(directory), async_save=False)
  for s in steps:
    ckpt.save(s, small_state(s))
  ckpt.close()


def damage(step_dir, how: str) -> None:
  """Damages a saved step folder as a crash, a full disk or a bad copy would."""
  item = os.path.join(step_dir, "default")
  data = [
    f for f in glob.glob(os.path.join(item, "**", "d", "*"), recursive=True) if os.path.isfile(f)
  ]
  biggest = max(data, key=os.path.getsize)
  if how == "truncated array file":
    os.truncate(biggest, os.path.getsize(biggest) // 2)
  elif how == "corrupted array file":
    with open(biggest, "r+b") as fh:
      fh.write(b"\x00" * os.path.getsize(biggest))
  elif how == "emptied manifest":
    open(os.path.join(item, "manifest.ocdbt"), "w").close()
  elif how == "emptied metadata":
    open(os.path.join(item, "_METADATA"), "w").close()
  elif how == "deleted metadata":
    os.remove(os.path.join(item, "_METADATA"))
  else:
    raise ValueError(how)


DAMAGES = [
  "truncated array file",
  "corrupted array file",
  "emptied manifest",
  "emptied metadata",
  "deleted metadata",
]


def same(a, b) -> bool:
  return all(
    np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


# TensorStore may call back into orbax's closed event loop after a failed read: an unraisable
# "Event loop is closed" that the Checkpointer drops, but pytest reports with its own hook.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_newest_checkpoint_is_moved_aside_and_the_previous_one_restored(
  tmp_path, how, caplog
):
  """Steps 1-3 saved, step 3's files damaged (see `damage`). Before: a TensorStore traceback, or,
  for a deleted _METADATA, a ShapeMismatchError."""
  directory = tmp_path / "checkpoints"
  save_steps(directory, [1, 2, 3])
  damage(directory / "3", how)
  caplog.set_level(logging.WARNING)
  ckpt = checkpoints.Checkpointer(str(directory))
  restored = ckpt.restore(small_state(0))
  assert same(restored, small_state(2)) and ckpt.restored_step == 2
  aside = tmp_path / "checkpoints_damaged" / "3.1"
  assert aside.is_dir() and not (directory / "3").exists()  # moved, not deleted
  assert ckpt.all_steps() == [1, 2]
  warning = caplog.text
  assert "checkpoint step 3" in warning and "is damaged" in warning
  assert str(aside) in warning and "resuming from step 2" in warning
  # Saving step 3 again works; damaged again, it goes to 3.2.
  ckpt.save(3, small_state(3))
  ckpt.close()
  damage(directory / "3", how)
  ckpt = checkpoints.Checkpointer(str(directory))
  assert same(ckpt.restore(small_state(0)), small_state(2))
  ckpt.close()
  assert (tmp_path / "checkpoints_damaged" / "3.2").is_dir() and aside.is_dir()


def test_read_only_readers_skip_a_damaged_checkpoint_without_moving_it(tmp_path, caplog):
  directory = tmp_path / "checkpoints"
  save_steps(directory, [1, 2, 3])
  damage(directory / "3", "truncated array file")
  caplog.set_level(logging.WARNING)
  reader = checkpoints.Checkpointer(str(directory), read_only=True)
  assert same(reader.restore_host(), small_state(2)) and reader.restored_step == 2
  assert "checkpoint step 3" in caplog.text and "reading step 2 instead" in caplog.text
  with pytest.raises(checkpoints.DamagedCheckpointError, match="step 3 .* is damaged"):
    reader.restore_host(3)  # asked for by number: no substitute
  reader.close()
  assert (directory / "3").is_dir() and not (tmp_path / "checkpoints_damaged").exists()


def test_a_deleted_metadata_file_is_damage_not_a_shape_mismatch(tmp_path):
  """Before: every array 'missing' from the checkpoint, reported as a model of another shape."""
  directory = tmp_path / "checkpoints"
  save_steps(directory, [1])
  damage(directory / "1", "deleted metadata")
  ckpt = checkpoints.Checkpointer(str(directory))
  with pytest.raises(checkpoints.DamagedCheckpointError, match=r"step 1 .*_METADATA\) is missing"):
    ckpt.restore(small_state(0), 1)
  ckpt.close()


def test_every_checkpoint_damaged_is_one_clear_error_and_nothing_moves(tmp_path):
  directory = tmp_path / "checkpoints"
  save_steps(directory, [1, 2])
  damage(directory / "1", "deleted metadata")
  damage(directory / "2", "truncated array file")
  ckpt = checkpoints.Checkpointer(str(directory))
  with pytest.raises(
    checkpoints.DamagedCheckpointError,
    match=r"(?s)no intact checkpoint in .*step 2 .*step 1 .*new --workdir",
  ):
    ckpt.restore(small_state(0))
  ckpt.close()
  assert sorted(os.listdir(directory)) == ["1", "2"]
  assert not (tmp_path / "checkpoints_damaged").exists()


def test_a_model_of_another_shape_is_still_a_shape_mismatch_and_nothing_moves(tmp_path):
  directory = tmp_path / "checkpoints"
  save_steps(directory, [1, 2])
  other = {"w": np.zeros((64, 32), np.float32), "b": {"c": np.zeros(5, np.int64)}}
  ckpt = checkpoints.Checkpointer(str(directory))
  with pytest.raises(checkpoints.ShapeMismatchError, match=r"w: checkpoint \(64, 33\)"):
    ckpt.restore(other)
  ckpt.close()
  assert sorted(os.listdir(directory)) == ["1", "2"]


def test_training_resumes_from_the_newest_intact_checkpoint(tmp_path, monkeypatch, caplog):
  """Fabricated checkpoints at steps 2 and 4 of the tiny config, step 4's largest array file
  truncated: the run resumes from step 2, says so, and sets step 4 aside in the workdir."""
  counting_step(monkeypatch)
  fabricate_checkpoints(tiny_config(), str(tmp_path), [2, 4])
  damage(tmp_path / "checkpoints" / "4", "truncated array file")
  caplog.set_level(logging.INFO)
  state = train.train(tiny_config(num_steps=6, log_every=1, checkpoint_every=0), str(tmp_path))
  assert int(state.step) == 6 and rows(tmp_path) == [3, 4, 5, 6]
  assert steps_on_disk(tmp_path) == [2, 6] and (tmp_path / "checkpoints_damaged" / "4.1").is_dir()
  assert "checkpoint step 4" in caplog.text and "resumed from step 2" in caplog.text


# ---- endings that must keep the first error, and what runs before step 1 -------------------------


def test_a_failed_save_is_not_replaced_by_orbax_close_raising_again(tmp_path):
  """On a full disk orbax's close() raises once more (a ValueError, a "user error" to launch);
  the documented CheckpointSaveError must be what comes out."""
  ckpt = checkpoints.Checkpointer(str(tmp_path / "checkpoints"))
  real = ckpt._manager

  class Full:
    def wait_until_finished(self):
      raise ValueError("RESOURCE_EXHAUSTED: No space left on device")

    def close(self):
      real.close()
      raise ValueError("RESOURCE_EXHAUSTED: again, from close")

    def all_steps(self):
      return [4]

  ckpt._manager, ckpt._pending = Full(), 8
  with pytest.raises(checkpoints.CheckpointSaveError, match="step 8 .*No space left"):
    ckpt.close()
  closed = []

  def boom():
    raise ValueError("second")

  with pytest.raises(ValueError, match="second"):  # nothing on its way out: raised
    train._close_all([boom, lambda: closed.append(1)], keep_error=False)
  train._close_all([boom, lambda: closed.append(2)], keep_error=True)  # logged, not raised
  assert closed == [1, 2]


def test_a_refused_relaunch_writes_no_config_json(tmp_path, caplog):
  """Checkpoints of base_channels=8 and no config.json: a relaunch with 16 is refused by the
  shape check before `on_start` (where launch.py writes config.json) runs. A relaunch with
  num_steps below the newest checkpoint says that there is nothing to train."""
  c = tiny_config()
  fabricate_checkpoints(c, str(tmp_path), [4])
  wider = tiny_config()
  wider.model.base_channels = 16
  started = []
  with pytest.raises(checkpoints.ShapeMismatchError):
    train.train(wider, str(tmp_path), on_start=lambda: started.append(1))
  assert started == [] and not (tmp_path / "config.json").exists()
  caplog.set_level(logging.WARNING)
  train.train(tiny_config(num_steps=2), str(tmp_path), on_start=lambda: started.append(1))
  assert started == [1] and "nothing to train" in caplog.text


def test_damage_messages_carry_no_tensorstore_reprs():
  spec = '[tensorstore_spec=\'{"driver":"zarr","kvstore":{"path":"/w/4/default/"}}\']'
  e = ValueError(f'DATA_LOSS: Error reading "w/.zarray": Encoded length (0) is too short {spec}')
  assert checkpoints._describe(e) == (
    'ValueError: DATA_LOSS: Error reading "w/.zarray": Encoded length (0) is too short'
  )
  bound = "<bound method PyCapsule.read of TensorStore({\n  'driver': 'zarr',\n})>"
  e = ValueError(f"FAILED_PRECONDITION: cannot read {bound} at byte 0")
  assert checkpoints._describe(e) == "ValueError: FAILED_PRECONDITION: cannot read"
  assert len(checkpoints._describe(ValueError("x" * 1000))) == len("ValueError: ") + 300
