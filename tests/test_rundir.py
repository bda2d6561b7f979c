"""rundir.py: one trainer per workdir, and config.json never rewritten under its checkpoints."""

import json
import os
import socket
import subprocess
import sys

import pytest

from configs import common, tiny
from diffusion import rundir


def test_a_second_trainer_is_refused_with_the_holder_named(tmp_path):
  with rundir.Lock(str(tmp_path)):
    info = json.load(open(tmp_path / "lock"))
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
    with pytest.raises(rundir.WorkdirBusyError, match=rf"pid {os.getpid()} on .*delete .*lock"):
      rundir.Lock(str(tmp_path)).acquire()
  assert not (tmp_path / "lock").exists()  # released


def test_a_dead_trainers_lock_on_this_host_is_taken_over(tmp_path):
  dead = subprocess.run(
    [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
  ).stdout.strip()
  (tmp_path / "lock").write_text(
    json.dumps({"host": socket.gethostname(), "pid": int(dead), "start": "1", "since": "then"})
  )
  with rundir.Lock(str(tmp_path)):
    assert json.load(open(tmp_path / "lock"))["pid"] == os.getpid()
  # A live pid whose start time differs was reused by another process: stale as well.
  (tmp_path / "lock").write_text(
    json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "start": "-1", "since": "then"})
  )
  rundir.Lock(str(tmp_path)).acquire().release()


def test_a_lock_from_another_host_is_never_cleared(tmp_path):
  (tmp_path / "lock").write_text(json.dumps({"host": "node-17", "pid": 1, "since": "then"}))
  with pytest.raises(rundir.WorkdirBusyError, match="pid 1 on node-17"):
    rundir.Lock(str(tmp_path)).acquire()


def test_config_json_keeps_a_history_and_is_never_rewritten_under_other_checkpoints(tmp_path):
  wd = str(tmp_path)
  base = common.as_dict(tiny.get_config())
  assert rundir.record_config(wd, base, common.training_changes) == []
  assert (
    rundir.record_config(wd, base, common.training_changes) == []
  )  # the same config: nothing to record
  (tmp_path / "checkpoints" / "5").mkdir(parents=True)
  longer = json.loads(json.dumps(base))
  longer["train"]["num_steps"], longer["sample"]["num_steps"] = 20_000, 7
  assert rundir.record_config(wd, longer, common.training_changes) == [
    "sample.num_steps",
    "train.num_steps",
  ]
  (row,) = [json.loads(line) for line in open(tmp_path / "config_history.jsonl")]
  assert row["changes"] == {"sample.num_steps": [3, 7], "train.num_steps": [10_000, 20_000]}
  assert json.load(open(tmp_path / "config.json")) == longer
  wider = json.loads(json.dumps(longer))
  wider["model"]["base_channels"] = 32
  before = (tmp_path / "config.json").read_text()
  with pytest.raises(ValueError, match=r"model.base_channels: 8 -> 32.*new --workdir"):
    rundir.record_config(wd, wider, common.training_changes)
  assert (tmp_path / "config.json").read_text() == before
  assert len(open(tmp_path / "config_history.jsonl").readlines()) == 1


def test_workdir_and_config_json_faults_are_named_before_any_work(tmp_path):
  (tmp_path / "file").write_text("")
  with pytest.raises(ValueError, match="is a file, not a folder"):
    rundir.check_workdir(str(tmp_path / "file"))
  with pytest.raises(ValueError, match=r"cannot create --workdir .*file/run: .*file is a file"):
    rundir.check_workdir(str(tmp_path / "file" / "run"))
  (tmp_path / "run" / "checkpoints").parent.mkdir()
  (tmp_path / "run" / "checkpoints").write_text("")
  with pytest.raises(ValueError, match=r"run/checkpoints is a file"):
    rundir.check_workdir(str(tmp_path / "run"))
  ro = tmp_path / "ro"
  ro.mkdir()
  real_access = os.access
  with pytest.MonkeyPatch.context() as mp:  # a read-only folder (root may write anywhere)
    mp.setattr(os, "access", lambda p, mode: False if str(p) == str(ro) else real_access(p, mode))
    with pytest.raises(ValueError, match=r"cannot write --workdir .*ro/run: .*ro is not writable"):
      rundir.check_workdir(str(ro / "run"))
  (tmp_path / "run" / "config.json").write_text('{"train": ')
  with pytest.raises(ValueError, match=r"run/config.json is not valid JSON"):
    rundir.check_config(
      str(tmp_path / "run"), common.as_dict(tiny.get_config()), common.training_changes
    )
  assert rundir.release_locks() is None and not rundir._HELD
  with rundir.Lock(str(tmp_path / "w")):
    rundir.release_locks()  # what the signal handler does
    assert not (tmp_path / "w" / "lock").exists()


def test_holder_names_only_a_live_trainer(tmp_path):
  assert rundir.holder(str(tmp_path)) is None  # no lock
  with rundir.Lock(str(tmp_path)):
    assert rundir.holder(str(tmp_path))["pid"] == os.getpid()
  dead = subprocess.run(
    [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
  ).stdout.strip()
  (tmp_path / "lock").write_text(
    json.dumps({"host": socket.gethostname(), "pid": int(dead), "start": "1", "since": "then"})
  )
  assert rundir.holder(str(tmp_path)) is None  # a dead trainer's lock
  (tmp_path / "lock").write_text('["torn')
  assert rundir.holder(str(tmp_path)) is None
