"""End to end on the tiny config: a MeanFlow model and a consistency-distilled model train through
launch.py's runner, resume bit-identically and sample; bad settings are refused before anything
runs (one line, exit 2)."""

import os
import shutil

import jax
import numpy as np
import pytest
from conftest import fabricate_checkpoints, launch, tiny_config

import launch as launch_module
from configs import common
from diffusion import checkpoints, rundir


def final_state(workdir):
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  try:
    step = ckpt.latest_step()
    return step, ckpt.restore_host(step)
  finally:
    ckpt.close()


def assert_same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def train_twice(config, workdir, mode):
  """4 steps with a checkpoint at 2; then the same run resumed from step 2. Returns both final
  states (reference, resumed)."""
  launch_module.run(config, str(workdir), mode)
  reference = final_state(workdir)
  shutil.rmtree(workdir / "checkpoints" / "4")
  launch_module.run(config, str(workdir), mode)
  resumed = final_state(workdir)
  assert reference[0] == resumed[0] == 4
  assert_same(reference[1], resumed[1])
  return reference[1]


def meanflow_config():
  c = tiny_config(num_steps=4, checkpoint_every=2)
  c.diffusion.update(process="flow", prediction="flow", objective="meanflow")
  c.sample.update(sampler="meanflow", num_steps=2, num_images=4)
  return c


def test_meanflow_trains_resumes_exactly_and_samples(tmp_path):
  c = meanflow_config()
  state = train_twice(c, tmp_path / "mf", "train")
  assert {"cond2_mlp_0", "cond2_mlp_1"} <= set(state["params"]["params"])
  assert state["distill"] is None
  assert (tmp_path / "mf" / "samples" / "step_4.png").exists()  # the meanflow sampler, 2 steps
  c.sample.num_steps = 1
  launch_module.run(c, str(tmp_path / "mf"), "sample")
  (tag,) = [d for d in os.listdir(tmp_path / "mf" / "samples") if d.startswith("step4_meanflow1")]
  images = np.load(tmp_path / "mf" / "samples" / tag / "samples.npz")["images"]
  assert images.shape == (4, 8, 8, 3) and images.dtype == np.uint8 and images.std() > 0


def test_distilled_model_starts_from_the_teacher_resumes_exactly_and_samples(tmp_path):
  teacher = tmp_path / "teacher"
  fabricate_checkpoints(tiny_config(), str(teacher), [3])
  rundir.record_config(str(teacher), common.as_dict(tiny_config()), common.training_changes)
  _, taught = final_state(teacher)
  c = tiny_config(num_steps=4, checkpoint_every=2, learning_rate=1e-3)
  c.distill.teacher = str(teacher)
  state = train_twice(c, tmp_path / "student", "distill")
  assert_same(state["distill"]["teacher"], taught["ema_params"])  # fixed through training
  # The student moved away from the teacher's EMA it started from; the target, an EMA of the
  # student with mu = 0.95, moved less.
  start = jax.tree.leaves(taught["ema_params"])
  gap = lambda tree: max(
    float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(tree), start, strict=True)
  )
  assert 0 < gap(state["distill"]["target"]) < 0.5 * gap(state["params"])
  c.sample.update(sampler="consistency", num_steps=4, num_images=4, gif_images=0)
  launch_module.run(c, str(tmp_path / "student"), "sample")
  (tag,) = os.listdir(tmp_path / "student" / "samples")
  assert tag.startswith("step4_consistency4")
  images = np.load(tmp_path / "student" / "samples" / tag / "samples.npz")["images"]
  assert images.shape == (4, 8, 8, 3) and images.std() > 0


def test_bad_few_step_settings_are_refused_before_anything_runs(tmp_path):
  c = tiny_config()
  c.diffusion.objective = "meanflow"  # on the vp process
  with pytest.raises(ValueError, match="process=flow"):
    launch_module.check(c, "train")
  for sampler in ("meanflow", "consistency"):
    for steps in (0, 5):
      c = meanflow_config()
      c.sample.update(sampler=sampler, num_steps=steps)
      with pytest.raises(ValueError, match="takes 1 to 4 steps"):
        launch_module.check(c, "sample")
  c = meanflow_config()
  c.eval.samplers = "meanflow:1,consistency:9"
  with pytest.raises(ValueError, match="got 9"):
    launch_module.check(c, "eval")
  c = tiny_config()
  c.sample.update(sampler="meanflow", num_steps=1)
  with pytest.raises(ValueError, match="objective=meanflow"):
    launch_module.check(c, "sample")
  c = tiny_config()
  c.diffusion.objective = "consistency"
  with pytest.raises(ValueError, match="--mode distill"):
    launch_module.check(c, "train")
  c = tiny_config()
  with pytest.raises(ValueError, match="distill.teacher=WORKDIR"):
    launch_module.check(c, "distill", str(tmp_path / "student"))
  teacher = tmp_path / "teacher"
  c.distill.teacher = str(teacher)
  with pytest.raises(FileNotFoundError, match="config.json not found"):
    launch_module.check(c, "distill", str(tmp_path / "student"))
  rundir.record_config(str(teacher), common.as_dict(tiny_config()), common.training_changes)
  r = launch(
    tmp_path / "student",
    "--mode=distill",
    f"--config.distill.teacher={teacher}",
    "--config.data.image_size=16",
  )
  assert r.returncode == 2 and "Traceback" not in r.stderr
  (line,) = [x for x in r.stderr.splitlines() if x.startswith("error: ")]
  assert "config.data.image_size=8" in line and "has 16" in line
  assert not (tmp_path / "student").exists()
