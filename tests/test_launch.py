"""launch.py: every user error is one line and exit code 2 before anything is compiled or
written; a second trainer and a changed config are refused."""

import json
import os

import pytest
from conftest import fabricate_checkpoints, launch, tiny_config

import launch as launch_module


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("train.log_every", 0, "config.train.log_every must be a positive integer, got 0"),
    ("train.num_steps", 0, "config.train.num_steps must be a positive integer"),
    ("train.batch_size", -8, "config.train.batch_size must be a positive integer, got -8"),
    ("train.checkpoint_every", -1, "checkpoint_every must be >= 0"),
    ("sample.sampler", "dmp_solver", "unknown sampler 'dmp_solver'"),
    ("diffusion.schedule", "cosin", "unknown schedule 'cosin'"),
    ("train.lr_schedule", "step", "lr_schedule 'step'"),
  ],
)
def test_bad_values_are_caught_before_anything_runs(field, value, message):
  c = tiny_config()
  section, name = field.split(".")
  c[section][name] = value
  with pytest.raises(ValueError, match=message):
    launch_module.check(c, "train")


def test_eval_sampler_list_is_checked_for_eval():
  c = tiny_config()
  c.eval.samplers = "ddim:10,dmp:5"
  with pytest.raises(ValueError, match="unknown sampler 'dmp'"):
    launch_module.check(c, "eval")


def one_line_error(r, *needles):
  assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and all(n in errors[0] for n in needles), r.stderr[-3000:]


def test_a_user_error_is_one_line_exit_2_and_writes_nothing(tmp_path):
  r = launch(tmp_path / "run", "--config.diffusion.schedule=cosin")
  one_line_error(r, "unknown schedule 'cosin'")
  assert not (tmp_path / "run").exists()
  empty = tmp_path / "empty"
  empty.mkdir()
  r = launch(tmp_path / "run", "--config.data.source=folder", f"--config.data.path={empty}")
  one_line_error(r, str(empty))
  assert not (tmp_path / "run").exists()
  r = launch(tmp_path / "run", "--mode=sample", "--config.sample.num_images=4")
  one_line_error(r, "no checkpoints", "train first")


def test_relaunch_with_another_model_keeps_config_json_and_a_second_trainer_is_refused(tmp_path):
  c = tiny_config()
  fabricate_checkpoints(c, str(tmp_path), [2])
  from configs import common

  (tmp_path / "config.json").write_text(json.dumps(common.as_dict(c), sort_keys=True, indent=2))
  before = (tmp_path / "config.json").read_text()
  r = launch(tmp_path, "--config.model.base_channels=32", "--config.train.num_steps=3")
  one_line_error(r, "model.base_channels: 8 -> 32", "new --workdir")
  assert (tmp_path / "config.json").read_text() == before
  (tmp_path / "lock").write_text(
    json.dumps({"host": os.uname().nodename, "pid": os.getpid(), "since": "now"})
  )
  from diffusion import rundir

  (tmp_path / "lock").write_text(
    json.dumps({**json.load(open(tmp_path / "lock")), "start": rundir._start_time(os.getpid())})
  )
  r = launch(tmp_path, "--config.train.num_steps=3")
  one_line_error(r, f"pid {os.getpid()}", "in use by another trainer")
  assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize(
  "overrides, message",
  [
    (
      {"diffusion.process": "edm", "diffusion.prediction": "edm"},
      "edm process has no integer timesteps: set config.sample.spacing",
    ),
    (
      {"diffusion.process": "flow", "diffusion.prediction": "flow"},
      "flow process has no integer timesteps",
    ),
    ({"data.eval_fraction": 1.5}, "eval_fraction must lie in \\[0, 1\\)"),
    ({"train.learning_rate": -1.0}, "learning_rate must be a finite number > 0"),
    ({"train.learning_rate": float("inf")}, "learning_rate must be a finite number > 0"),
    ({"train.learning_rate": float("nan")}, "learning_rate must be a finite number > 0"),
    ({"sample.guidance_interval": (2.0, 1.0)}, "lo <= hi"),
    ({"sample.labels": "3"}, "the model is unconditional"),
    ({"data.image_size": 0}, "image_size must be a positive integer"),
    ({"data.num_sprites": 0}, "num_sprites must be >= 1"),
    ({"model.channel_mult": ("a", "b")}, "channel_mult must be a tuple of integers"),
  ],
)
def test_cross_field_settings_that_fail_later_are_refused_before_training(overrides, message):
  c = tiny_config()
  for key, value in overrides.items():
    section, name = key.split(".")
    c[section][name] = value
  with pytest.raises(ValueError, match=message):
    launch_module.check(c, "train")


def test_a_config_file_field_the_defaults_lack_is_refused():
  c = tiny_config()
  c.train.learnig_rate = 1e-3
  with pytest.raises(ValueError, match='did you mean "train.learning_rate"'):
    launch_module.check(c, "train")


def test_exit_codes_of_the_endings_of_a_run():
  from diffusion import checkpoints, train

  saved = checkpoints.CheckpointSaveError(8, "/w/checkpoints", OSError(28, "No space"), [4])
  assert launch_module.outcome(saved)[0] == launch_module.FAULT == 1
  assert launch_module.outcome(train.NonFiniteLossError("nan at step 3"))[0] == 1
  assert launch_module.outcome(train.StoppedBySignal(5)) == (75, str(train.StoppedBySignal(5)))
  assert launch_module.outcome(KeyError("no such thing")) == (2, "no such thing")
  assert launch_module.outcome(RuntimeError("bug"))[0] is None  # a fault with its traceback


def test_a_non_finite_loss_is_one_line_exit_1(tmp_path):
  r = launch(
    tmp_path,
    "--config.train.num_steps=2",
    "--config.train.learning_rate=1e30",
    "--config.train.warmup_steps=0",
  )
  assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
  (line,) = [x for x in r.stderr.splitlines() if x.startswith("error: ")]
  assert "non-finite loss or parameters at step" in line and "learning_rate" in line
  assert not (tmp_path / "lock").exists()


def test_config_loading_errors_are_one_line_exit_2(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("from configs import tiny\ndef get_config():\n  c = tiny.get_config(\n")
  r = launch(tmp_path / "run", config=str(bad))
  one_line_error(r, "syntax error in", "line 3")
  assert r.stderr.rstrip().endswith("^")  # the offending line and its caret follow
  r = launch(tmp_path / "run", "--config.train.bogus=3", "--config.train.learnin_rate=1")
  one_line_error(r, "no field 'train.bogus'")
  r = launch(tmp_path / "run", "--config.train.learnin_rate=1")
  one_line_error(r, 'Did you mean "learning_rate"')
  r = launch(tmp_path / "run", "--config.train.num_steps=abc")
  one_line_error(r, "train.num_steps='abc' does not fit")
  r = launch(tmp_path / "run", config="configs/sprites.py:bogus")
  one_line_error(r, "get_config('bogus')", "unknown sprites config variant")
  r = launch(tmp_path / "run", config="configs/nothere.py")
  one_line_error(r, "config file 'configs/nothere.py' not found")
  r = launch(tmp_path / "run", env={"DIFFUSION_MALLOC": "bogus"})
  one_line_error(r, "DIFFUSION_MALLOC='bogus'")
  (tmp_path / "file").write_text("")
  r = launch(tmp_path / "file", "--config.train.num_steps=1")
  one_line_error(r, "is a file, not a folder")
  assert not (tmp_path / "run").exists()


def test_configs_are_found_from_another_directory(tmp_path):
  """configs/X.py (and the default config) resolve from the repository root when the working
  directory is elsewhere: the check after loading is what fails here."""
  import subprocess
  import sys

  script = os.path.join(os.path.dirname(launch_module.__file__), "launch.py")
  for flags in (["--config", "configs/tiny.py"], []):
    r = subprocess.run(
      [sys.executable, script, *flags, "--config.train.num_steps=0"],
      cwd=tmp_path,
      capture_output=True,
      text=True,
    )
    one_line_error(r, "config.train.num_steps must be a positive integer, got 0")


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_sigterm_during_start_up_exits_75_and_releases_the_lock(tmp_path, mode):
  """SIGTERM while the lock is held and the data, the state or the restore are being prepared
  (train), or while eval starts: exit 75 (the SLURM script requeues it), no lock left."""
  import signal
  import time

  if mode == "eval":
    fabricate_checkpoints(tiny_config(), str(tmp_path), [2])
  p = launch(tmp_path, f"--mode={mode}", "--config.train.num_steps=2", wait=False)
  deadline = time.time() + 120
  lock = tmp_path / "lock"
  while mode == "train" and not lock.exists() and p.poll() is None and time.time() < deadline:
    time.sleep(0.005)
  if mode == "eval":
    time.sleep(1.0)
  p.send_signal(signal.SIGTERM)
  out, _ = p.communicate(timeout=120)
  assert p.returncode == 75, out[-3000:]
  assert "stopped by SIGTERM" in out and "Traceback" not in out
  assert not lock.exists()
