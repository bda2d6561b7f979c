"""The training loop: pinned numbers of a short run, exact resume, faults and signals, on the
tiny config and CPU devices (two processes and a signal to one of them: test_slurm_real.py)."""

import glob
import json
import os
import signal
import time

import jax
import numpy as np
import pytest
from conftest import TINY_DIT, fabricate_checkpoints, launch, tiny_config

from diffusion import checkpoints, parallel, rundir, train


def final_params(workdir):
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  try:
    step = ckpt.latest_step()
    return step, ckpt.restore_host(step)
  finally:
    ckpt.close()


def rows(workdir):
  return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def assert_same(a, b, **tol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    if tol:
      np.testing.assert_allclose(x, y, **tol)
    else:
      np.testing.assert_array_equal(x, y)


# Written by train.train on its tests' tiny_config() with num_steps=5, log_every=1 (noise, noise
# levels and dropout keyed per example by (seed, step, global example index), so that any mesh
# trains these numbers): the loss of steps 1-5, and the float64 sum and sum of squares of the
# 12,203 parameters after step 5 (and the EMA's sum). A change here changes users' runs.
PINNED_LOSSES = [
  1.1055136919021606,
  0.9921690225601196,
  1.0171911716461182,
  0.9981181621551514,
  0.996364176273346,
]
PINNED_SUM, PINNED_SUMSQ, PINNED_EMA_SUM = 123.21785783265796, 350.0725001406632, 123.1287074494035


def test_tiny_config_trains_the_pinned_parameters(tmp_path):
  train.train(tiny_config(num_steps=5, log_every=1, checkpoint_every=5), str(tmp_path))
  np.testing.assert_allclose([r["loss"] for r in rows(tmp_path)], PINNED_LOSSES, rtol=1e-5)
  step, state = final_params(tmp_path)
  leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(state["params"])]
  assert step == 5 and sum(x.size for x in leaves) == 12_203
  assert sum(x.sum() for x in leaves) == pytest.approx(PINNED_SUM, rel=1e-6)
  assert sum((x**2).sum() for x in leaves) == pytest.approx(PINNED_SUMSQ, rel=1e-6)
  ema = sum(np.asarray(x, np.float64).sum() for x in jax.tree.leaves(state["ema_params"]))
  assert ema == pytest.approx(PINNED_EMA_SUM, rel=1e-6)


@pytest.mark.parametrize("arch", ["unet", "dit"])
def test_resume_is_bit_identical_and_logs_each_step_once(
  tmp_path, tiny_reference, arch, monkeypatch
):
  def config(**overrides):
    c = tiny_config(**overrides)
    if arch == "dit":
      c.model.update(TINY_DIT)
    return c

  if arch == "dit":  # the uninterrupted reference, as tiny_reference for the U-Net
    tiny_reference = tmp_path / "reference"
    train.train(config(num_steps=4, checkpoint_every=2), str(tiny_reference))
  part = tmp_path / "part"
  train.train(config(num_steps=3, checkpoint_every=2, log_every=1), str(part))
  # Killed after step 3 was logged but before it was saved: the resume starts at step 2 and must
  # not log step 3 twice.
  resumed = config(num_steps=4, checkpoint_every=2, log_every=1)
  resumed.sample.num_images = 4  # the end of training writes a grid
  import shutil

  shutil.rmtree(part / "checkpoints" / "3")
  made, real = [], train.initial_state
  monkeypatch.setattr(
    train, "initial_state", lambda *a, **k: made.append(k.get("shapes_only")) or real(*a, **k)
  )
  train.train(resumed, str(part))
  assert made == [True]  # restored into the state's shapes: no fresh state computed first
  assert (part / "samples" / "step_4.png").exists()
  (s1, a), (s2, b) = final_params(tiny_reference), final_params(part)  # uninterrupted, 4 steps
  assert s1 == s2 == 4
  assert_same(a, b)
  assert [r["step"] for r in rows(part)] == [1, 2, 3, 4]
  assert {"loss", "learning_rate", "grad_norm", "images_per_sec"} <= set(rows(part)[0])


def test_several_steps_per_call_match_one_and_fire_at_crossed_boundaries(tmp_path, tiny_reference):
  """2 steps per call train the parameters of one step per call (up to float rounding: XLA fuses
  the unrolled steps differently); logs, saves and grids due every step fire once per call, at
  its end (steps 2 and 4)."""
  c = tiny_config(num_steps=4, steps_per_call=2, log_every=1, checkpoint_every=1, sample_every=1)
  c.sample.num_images = 4
  run = tmp_path / "k2"
  train.train(c, str(run))
  assert [r["step"] for r in rows(run)] == [2, 4]
  assert sorted(os.listdir(run / "samples")) == ["step_2.png", "step_4.png"]
  assert sorted(int(s) for s in os.listdir(run / "checkpoints")) == [2, 4]
  (s1, a), (s2, b) = final_params(tiny_reference), final_params(run)
  assert s1 == s2 == 4
  assert_same(a, b, rtol=1e-5, atol=1e-6)


def inject_non_finite(monkeypatch, at_call: int):
  """The compiled step reports a non-finite loss from call `at_call` (1-based) on: a fault fed
  into the real compiled step, without training to a NaN."""
  real, calls = parallel.compile_step, [0]

  def compile_step(per_device, mesh):
    fn = real(per_device, mesh)

    def step(state, batches):
      calls[0] += 1
      state, metrics = fn(state, batches)
      if calls[0] >= at_call:
        metrics["finite"] = jax.numpy.zeros_like(metrics["finite"])
      return state, metrics

    return step

  monkeypatch.setattr(parallel, "compile_step", compile_step)


@pytest.mark.parametrize("log_every", [1, 100])
def test_non_finite_step_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, log_every):
  # log_every=100: no log, checkpoint or sample boundary before the end, so the flags are checked
  # one call late and must still be caught before the final save.
  fabricate_checkpoints(tiny_config(), str(tmp_path), [2])
  inject_non_finite(monkeypatch, at_call=1)
  c = tiny_config(num_steps=7, checkpoint_every=1 if log_every == 1 else 100, log_every=log_every)
  with pytest.raises(train.NonFiniteLossError, match="step 3.*last good checkpoint is step 2"):
    train.train(c, str(tmp_path))
  step, _ = final_params(tmp_path)
  assert step == 2


def test_checkpoint_of_another_shape_is_a_clear_error(tmp_path):
  fabricate_checkpoints(tiny_config(), str(tmp_path), [1])
  c = tiny_config(num_steps=2)
  c.model.base_channels = 24
  want = r"(?s)another shape.*conv_in/kernel: checkpoint \(3, 3, 3, 8\) vs config \(3, 3, 3, 24\)"
  with pytest.raises(checkpoints.ShapeMismatchError, match=want):
    train.train(c, str(tmp_path))


def test_bfloat16_compute_trains_with_float32_parameters_and_logs_to_tensorboard(tmp_path):
  c = tiny_config(num_steps=2, checkpoint_every=0)
  c.model.dtype = "bfloat16"
  state = train.train(c, str(tmp_path))
  assert int(jax.device_get(state.step)) == 2
  for tree in (state.params, state.ema_params):
    assert {x.dtype for x in jax.tree.leaves(tree)} == {np.dtype(np.float32)}
  last = rows(tmp_path)[-1]
  assert last["step"] == 2 and 0.0 < last["loss"] < 10.0
  # The TensorBoard events hold the same scalars (records: length, crc, Event proto, crc).
  from tensorboardX.proto import event_pb2

  (events,) = glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
  raw, pos, scalars = open(events, "rb").read(), 0, {}
  while pos < len(raw):
    n = int.from_bytes(raw[pos : pos + 8], "little")
    event = event_pb2.Event.FromString(raw[pos + 12 : pos + 12 + n])
    pos += 16 + n
    for v in event.summary.value:
      scalars[(v.tag, event.step)] = v.simple_value
  for tag in ("loss", "learning_rate", "grad_norm", "images_per_sec"):
    assert scalars[(tag, 2)] == pytest.approx(last[tag], rel=1e-6), tag


# ---- whole launches: kill -9, SIGTERM, two processes ---------------------------------------------


def test_kill_during_save_then_resume_matches_uninterrupted(tmp_path, tiny_reference):
  killed = tmp_path / "killed"
  flags = ["--config.train.num_steps=4", "--config.train.checkpoint_every=1"]
  proc = launch(killed, *flags, wait=False)  # flags as launch.py's (conftest applies them)
  deadline, caught = time.time() + 300, False
  while time.time() < deadline and proc.poll() is None:
    tmp = glob.glob(str(killed / "checkpoints" / "*tmp*"))
    if tmp and glob.glob(str(killed / "checkpoints" / "[0-9]*")):
      os.kill(proc.pid, signal.SIGKILL)  # mid-save, with an earlier checkpoint complete
      caught = True
      break
    time.sleep(0.002)
  proc.wait()
  assert caught, "the run finished before a save could be interrupted"
  # Resumed in this process, as launch.py runs it: the dead trainer's lock is taken over.
  assert json.loads((killed / rundir.LOCK).read_text())["pid"] == proc.pid
  with rundir.Lock(str(killed)):
    train.train(tiny_config(num_steps=4, checkpoint_every=1), str(killed))
  (s1, a), (s2, b) = final_params(tiny_reference), final_params(killed)  # uninterrupted
  assert s1 == s2 == 4
  assert_same(a, b)
  assert [r["step"] for r in rows(killed)] == [2, 4]


def test_sigterm_saves_and_stops_after_that_step(tmp_path, monkeypatch):
  """One process: the step during which SIGTERM arrived is the last; it is saved, the run raises
  StoppedBySignal (launch.py's exit 75, checked by the two-process test) and the handlers are
  restored."""
  real = parallel.compile_step

  def compile_step(per_device, mesh):
    fn, calls = real(per_device, mesh), [0]

    def step(state, batches):
      calls[0] += 1
      if calls[0] == 3:
        os.kill(os.getpid(), signal.SIGTERM)
      return fn(state, batches)

    return step

  monkeypatch.setattr(parallel, "compile_step", compile_step)
  before = signal.getsignal(signal.SIGTERM)
  with pytest.raises(train.StoppedBySignal, match="stopped by a signal at step 3"):
    train.train(tiny_config(num_steps=100000, checkpoint_every=0), str(tmp_path))
  assert final_params(tmp_path)[0] == 3
  assert signal.getsignal(signal.SIGTERM) is before
