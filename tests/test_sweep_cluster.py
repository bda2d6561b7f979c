"""experiments/sweep/cluster.py: the SLURM array job and the TPU-pod job, rendered through the
CLI and run against stub srun and gcloud programs (no training: a finished run is faked). What a
real SLURM shows (two processes, SIGTERM, requeue, resume) is in test_slurm_real.py."""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from experiments import sweep
from experiments.sweep import cli

ABLATION = "configs/ablations/schedules.py"


def stub(bindir, name: str, calls_dir, exit_code: int = 0) -> None:
  """An executable that records its arguments, one per line, in a new file under `calls_dir`
  (a file per call: calls from parallel pods do not interleave), and exits with `exit_code`."""
  os.makedirs(calls_dir, exist_ok=True)
  path = os.path.join(bindir, name)
  with open(path, "w") as fh:
    fh.write(
      f'#!/bin/bash\nprintf \'%s\\n\' "$@" > "$(mktemp -p {calls_dir} call.XXXXXX)"\n'
      f"exit {exit_code}\n"
    )
  os.chmod(path, 0o755)


def calls(calls_dir) -> list[list[str]]:
  """The recorded argument lists, oldest first; the records are removed."""
  out = []
  for f in sorted(glob.glob(os.path.join(calls_dir, "call.*")), key=os.path.getmtime):
    with open(f) as fh:
      out.append(fh.read().rstrip("\n").split("\n"))
    os.remove(f)
  return out


def finish(run: sweep.Run, results: list[dict] | None = None) -> None:
  """Makes `run` look trained (its last checkpoint and training row) and, given eval results,
  evaluated (eval/metrics.json for that step)."""
  wd = sweep.local_path(run.workdir)
  os.makedirs(os.path.join(wd, "checkpoints", str(run.num_steps)), exist_ok=True)
  with open(os.path.join(wd, "metrics.jsonl"), "a") as fh:
    fh.write(json.dumps({"step": run.num_steps, "loss": 0.1}) + "\n")
  if results is not None:
    os.makedirs(os.path.join(wd, "eval"), exist_ok=True)
    with open(os.path.join(wd, "eval", "metrics.json"), "w") as fh:
      json.dump({"step": run.num_steps, "results": results}, fh)


def test_render_fills_placeholders_and_drops_notes():
  assert sweep.render("#% note\na={{a}} b={{b}}\n", {"a": 1, "b": "x"}) == "a=1 b=x\n"
  with pytest.raises(KeyError, match=r"\['b'\]"):
    sweep.render("{{a}} {{b}}", {"a": 1})


def test_slurm_dry_run_prints_the_array_job_and_writes_nothing(tmp_path, capsys):
  root = str(tmp_path / "runs")
  assert (
    sweep.main(
      [
        "--config",
        f"{ABLATION}:tiny",
        "--root",
        root,
        "--eval",
        "--slurm",
        "--dry_run",
        "--gpus_per_node",
        "4",
        "--partition",
        "gpu",
        "--max_concurrent",
        "3",
        "--sbatch_arg=--account=x",
      ]
    )
    == 0
  )
  text = capsys.readouterr().out
  assert "#SBATCH --array=0-15%3\n" in text and "#SBATCH --ntasks-per-node=4" in text
  # Every task sees all of its node's GPUs (jax's SLURM layout), never one GPU bound per task.
  assert "#SBATCH --gpus-per-node=4\n" in text and "#SBATCH --gpus-per-task" not in text
  assert "srun --kill-on-bad-exit=0 --gpu-bind=none $CMD" in text
  assert "#SBATCH --partition=gpu" in text and "#SBATCH --open-mode=append" in text
  assert "#SBATCH --account=x" in text and "#%" not in text
  assert "srun" in text and "SLURM_ARRAY_TASK_ID" in text and "{{" not in text
  assert '--next "$MODE"' in text and "for MODE in train eval" in text
  assert "would write" in text and not os.path.exists(root)
  s = sweep.expand(f"{ABLATION}:tiny", root)  # no --eval: training only
  assert "for MODE in train;" in sweep.slurm_script(s)
  cpu = sweep.slurm_script(s, gpus_per_node=0, tasks_per_node=2)  # a CPU job
  assert "#SBATCH --ntasks-per-node=2\n" in cpu and "#SBATCH --gpus-per-node" not in cpu
  with pytest.raises(ValueError, match="--tasks_per_node"):
    sweep.slurm_script(s, gpus_per_node=0)


def test_slurm_cpu_job_without_task_count_is_one_line_error(tmp_path):
  r = subprocess.run(
    [sys.executable, "-m", "experiments.sweep", "--config", f"{ABLATION}:tiny"]
    + ["--root", str(tmp_path), "--slurm", "--gpus_per_node=0", "--dry_run"],
    cwd=sweep.REPO,
    capture_output=True,
    text=True,
  )
  assert (
    r.returncode == 2 and r.stderr.startswith("error: a CPU job") and "Traceback" not in r.stderr
  )


def no_sbatch(monkeypatch) -> None:
  """The job is written, not submitted, even where SLURM is installed (test_slurm_real.py)."""
  monkeypatch.setattr(cli.shutil, "which", lambda name: None)


def test_slurm_array_task_runs_the_next_step_of_its_run(tmp_path, monkeypatch):
  no_sbatch(monkeypatch)
  root = str(tmp_path / "runs")
  # Submit for real with no sbatch here: the manifest and script are written.
  assert sweep.main(["--config", f"{ABLATION}:tiny", "--root", root, "--eval", "--slurm"]) == 0
  s = sweep.read_manifest(os.path.join(root, "schedules-tiny", "sweep.json"))
  script = os.path.join(s.root, "slurm.sbatch")
  assert os.access(script, os.X_OK) and os.path.isdir(os.path.join(s.root, "slurm"))
  # Run array task 13 against a stub srun: it gets run 13's train command; eval waits for it.
  bindir, calls_dir = tmp_path / "bin", tmp_path / "srun_calls"
  bindir.mkdir()
  stub(bindir, "srun", calls_dir)
  env = {
    **os.environ,
    "PATH": f"{bindir}:{os.environ['PATH']}",
    "SLURM_ARRAY_TASK_ID": "13",
    "PYTHON": sys.executable,
  }
  run = s.runs[13]  # the shifted schedule: its dict-valued override survives the quoting
  assert run.overrides["diffusion.schedule_params"] == {"image_size": 16}

  def task() -> tuple[list[list[str]], str]:
    out = subprocess.run(["bash", script], env=env, check=True, capture_output=True, text=True)
    return calls(calls_dir), out.stderr

  def check(argv: list[str], mode: str) -> None:
    # Training: every task of the allocation; eval: one process.
    srun = (
      ["--kill-on-bad-exit=0", "--gpu-bind=none"]
      if mode == "train"
      else ["--nodes=1", "--ntasks=1"]
    )
    assert argv[: len(srun)] == srun
    argv = argv[len(srun) :]
    assert argv[1] == "launch.py"
    assert argv[argv.index("--workdir") + 1] == run.workdir
    assert argv[argv.index("--mode") + 1] == mode
    assert argv[argv.index("--config") + 1] == f"{ABLATION}:tiny"
    assert "--config.diffusion.schedule=logsnr_cosine_shifted" in argv
    assert "--config.diffusion.schedule_params={'image_size': 16}" in argv

  made, err = task()
  assert len(made) == 1 and "run 13: eval waits for train to finish" in err
  check(made[0], "train")
  finish(run)  # trained: the task evaluates
  made, err = task()
  assert len(made) == 1 and "run 13: train already finished" in err
  check(made[0], "eval")
  finish(run, [{"sampler": "ddim", "num_steps": n, "nfe": n, "fd": 1.0} for n in (5, 20)])
  made, err = task()  # finished: the task starts nothing
  assert made == [] and "run 13: eval already finished" in err


def test_slurm_task_that_fails_keeps_its_status_and_is_not_requeued(tmp_path, monkeypatch):
  """Stub srun exits 1 (a fault; exit 75 and the requeue run on a real SLURM in
  test_slurm_real.py); stub scontrol records its calls: none, and the task fails with status 1."""
  no_sbatch(monkeypatch)
  root = str(tmp_path / "runs")
  assert sweep.main(["--config", f"{ABLATION}:tiny", "--root", root, "--eval", "--slurm"]) == 0
  s = sweep.read_manifest(os.path.join(root, "schedules-tiny", "sweep.json"))
  bindir, srun_calls, scontrol_calls = tmp_path / "bin", tmp_path / "srun", tmp_path / "scontrol"
  bindir.mkdir()
  stub(bindir, "srun", srun_calls, exit_code=1)
  stub(bindir, "scontrol", scontrol_calls)
  env = {
    **os.environ,
    "PATH": f"{bindir}:{os.environ['PATH']}",
    "SLURM_ARRAY_TASK_ID": "3",
    "SLURM_JOB_ID": "4242",
    "PYTHON": sys.executable,
  }
  out = subprocess.run(
    ["bash", os.path.join(s.root, "slurm.sbatch")], env=env, capture_output=True, text=True
  )
  made = calls(srun_calls)
  assert len(made) == 1 and made[0][0] == "--kill-on-bad-exit=0"  # train only: eval waits
  assert out.returncode == 1 and calls(scontrol_calls) == []


FAKE_WORKER = r"""#!/bin/bash
# gcloud stand-in: records its arguments, then runs --command with bash as one worker would (in
# the worker's home), so what the pod script sends is executed, not just read.
printf '%s\n' "$@" > "$(mktemp -p CALLS call.XXXXXX)"
for a in "$@"; do case "$a" in --command=*) cmd=${a#--command=} ;; esac; done
HOME=WORKER_HOME exec bash -c "$cmd"
"""

FAKE_PYTHON = r"""#!/bin/bash
# python3 stand-in on the worker: logs its arguments; the train of run 0 takes a while (and saves
# and exits 75 on SIGTERM, as launch.py does).
echo "$*" >> RECORD
trap 'echo stopped >> RECORD; exit 75' TERM
case "$*" in *"--index 0 --only train"*) sleep "${FAKE_SLEEP:-1}" & wait ;; esac
echo "python3 $*: done"
"""


def fake_pod(tmp_path) -> tuple[dict, str, str]:
  """A bin folder with the fake gcloud and python3; returns the environment, the calls folder
  and the record of python3 calls."""
  bindir, calls_dir, home = tmp_path / "bin", tmp_path / "calls", tmp_path / "worker"
  for d in (bindir, calls_dir, home, home / "repo"):
    d.mkdir()
  record = str(tmp_path / "python3_calls")
  for name, text in (("gcloud", FAKE_WORKER), ("python3", FAKE_PYTHON)):
    (bindir / name).write_text(
      text.replace("CALLS", str(calls_dir))
      .replace("WORKER_HOME", str(home))
      .replace("RECORD", record)
    )
    (bindir / name).chmod(0o755)
  env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "POLL": "0.1"}
  return env, str(calls_dir), record


def test_tpu_dry_run_prints_the_job(capsys):
  args = ["--config", f"{ABLATION}:tiny", "--root", "/mnt/runs", "--eval", "--tpu", "pod-a,pod-b"]
  assert sweep.main([*args, "--zone", "europe-west4-a", "--dry_run"]) == 0
  text = capsys.readouterr().out
  assert "--zone=europe-west4-a --worker=all" in text and "{{" not in text and "#%" not in text
  assert "START[pod-a]=" in text and "STOP[pod-b]=" in text and "setsid nohup bash -c" in text


def test_tpu_pod_job_runs_detached_on_all_workers_and_survives_sighup(tmp_path):
  """Two pods, the 16-run ablation with --eval, each pod's runs in one detached job per worker:
  the ssh call returns while training runs, SIGHUP (a dropped connection) does not stop it,
  every step runs on all workers in order, and the log lands in the runs' shared folder."""
  env, calls_dir, record = fake_pod(tmp_path)
  root = str(tmp_path / "runs")
  s = sweep.expand(f"{ABLATION}:tiny", root, eval=True)
  script = tmp_path / "tpu.sh"
  script.write_text(
    sweep.tpu_script(
      s, root, ["pod-a", "pod-b"], zone="z", remote_dir=str(tmp_path / "worker/repo")
    )
  )
  out = subprocess.run(
    ["bash", str(script)],
    env={**env, "FAKE_SLEEP": "3"},
    capture_output=True,
    text=True,
    start_new_session=True,
    timeout=60,
  )
  assert out.returncode == 0, out.stdout + out.stderr
  assert "sweep schedules-tiny: done" in out.stdout
  made = calls(calls_dir)
  assert all(a[:5] == ["compute", "tpus", "tpu-vm", "ssh", a[4]] for a in made)
  assert all("--worker=all" in a and "--zone=z" in a for a in made)  # eval too: every worker
  ran = open(record).read().splitlines()
  for i in range(16):  # each run trains, then evaluates, on its pod's workers
    mine = [r for r in ran if f"--index {i} " in r]
    assert [r.rsplit(" ", 1)[1] for r in mine] == ["train", "eval"], mine
  host = socket.gethostname()
  log = tmp_path / "runs" / "schedules-tiny" / "tpu_logs" / f"pod-a.{host}.log"
  assert "--index 0 --only train: done" in log.read_text()


def test_tpu_pod_job_outlives_its_ssh_and_stops_on_request(tmp_path):
  env, calls_dir, record = fake_pod(tmp_path)
  root = str(tmp_path / "runs")
  s = sweep.expand("configs/tiny.py", root, eval=True)
  script = str(tmp_path / "tpu.sh")
  with open(script, "w") as fh:
    fh.write(sweep.tpu_script(s, root, ["p"], zone="z", remote_dir=str(tmp_path / "worker/repo")))
  env["FAKE_SLEEP"] = "60"
  # The start call: gcloud returns at once, the job runs on; SIGHUP to its group changes nothing.
  start = subprocess.Popen(
    ["bash", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )
  jobs = tmp_path / "worker" / ".diffusion-jobs" / "tiny"

  def session_leader() -> int | None:  # the job, once it has written its pid, left the ssh's
    try:  # session and ignores SIGHUP (nohup's doing: before that, a HUP would end setsid itself)
      pid = int((jobs / "p.pid").read_text())
      with open(f"/proc/{pid}/status") as f:
        ignored = next(int(line.split()[1], 16) for line in f if line.startswith("SigIgn:"))
      return pid if os.getsid(pid) == pid and ignored & (1 << (signal.SIGHUP - 1)) else None
    except (OSError, ValueError, StopIteration):
      return None

  deadline = time.time() + 60
  while (pid := session_leader()) is None and time.time() < deadline:
    time.sleep(0.05)
  assert pid is not None, "the job did not start"
  os.killpg(pid, signal.SIGHUP)
  time.sleep(0.5)
  os.kill(pid, 0)  # still alive: raises if not
  assert not (jobs / "p.exit").exists() and start.poll() is None  # the script waits
  stop = subprocess.run(["bash", script, "stop"], env=env, capture_output=True, text=True)
  assert stop.returncode == 0, stop.stderr
  try:
    out, _ = start.communicate(timeout=60)
  except subprocess.TimeoutExpired:
    start.kill()
    pytest.fail(f"the script did not see the stop: {start.communicate()[0]}; {os.listdir(jobs)}")
  assert start.returncode == 1 and "pod p: failed or stopped" in out
  assert (jobs / "p.exit").read_text().strip() == "143"
  assert open(record).read().splitlines()[-1] == "stopped"  # the trainer saw SIGTERM (exit 75)


def test_one_pod_runs_one_after_another_and_set_overrides_travel():
  s = sweep.expand(f"{ABLATION}:tiny", "gs://b/runs", common={"train.num_steps": 7})
  text = sweep.tpu_script(s, "gs://b/runs", ["only"], zone="z")
  indices = [int(i) for i in re.findall(r"--index (\d+) --only train", text)]
  assert indices == list(range(16))  # one job, the runs in order
  assert "--only eval" not in text  # no eval asked for
  assert "--set train.num_steps=7" in text  # the workers re-expand the same sweep
  # A gs:// root: each worker logs to its own disk (a shell cannot append to a bucket).
  assert "tail -n 20 $HOME/.diffusion-jobs/" in text and "gs://b/runs/" not in text.split("tail")[1]
  with pytest.raises(ValueError, match="at least one TPU pod"):
    sweep.tpu_script(s, "/mnt/runs", [], zone="z")


def test_tpu_job_without_gcloud_is_written_not_run(tmp_path, capsys, monkeypatch):
  monkeypatch.setenv("PATH", "/nonexistent")
  assert (
    sweep.main(
      ["--config", f"{ABLATION}:tiny", "--root", str(tmp_path), "--tpu", "p", "--zone", "z"]
    )
    == 0
  )
  assert "gcloud is not on this machine" in capsys.readouterr().out
  root = tmp_path / "schedules-tiny"
  assert os.access(root / "tpu_pod.sh", os.X_OK) and (root / "sweep.json").exists()
