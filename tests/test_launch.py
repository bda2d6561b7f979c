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
