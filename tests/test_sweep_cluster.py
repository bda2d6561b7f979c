"""experiments/sweep/cluster.py: the SLURM array job and the TPU-pod job, rendered through the
CLI and run against stub srun and gcloud programs (no training: a finished run is faked). What a
real SLURM shows (two processes, SIGTERM, requeue, resume) is in test_slurm_real.py."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

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
  assert "srun --kill-on-bad-exit=1 --gpu-bind=none $CMD" in text
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
    r.returncode == 1 and r.stderr.startswith("error: a CPU job") and "Traceback" not in r.stderr
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
      ["--kill-on-bad-exit=1", "--gpu-bind=none"]
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
  assert len(made) == 1 and made[0][0] == "--kill-on-bad-exit=1"  # train only: eval waits
  assert out.returncode == 1 and calls(scontrol_calls) == []


def test_tpu_dry_run_and_script(tmp_path, capsys):
  assert (
    sweep.main(
      [
        "--config",
        f"{ABLATION}:tiny",
        "--root",
        "/mnt/runs",
        "--eval",
        "--tpu",
        "pod-a,pod-b",
        "--zone",
        "europe-west4-a",
        "--dry_run",
      ]
    )
    == 0
  )
  text = capsys.readouterr().out
  assert "--zone=europe-west4-a" in text and "{{" not in text
  assert text.count("run_on pod-a all ") == 8 and text.count("run_on pod-b all ") == 8
  assert text.count("run_on pod-a 0 ") == 8 and ") &" in text and 'wait "$PID"' in text
  # Run the rendered script with a stub gcloud: each run trains on all workers of its pod, then
  # evaluates on worker 0.
  script, calls_dir = tmp_path / "tpu.sh", tmp_path / "gcloud_calls"
  s = sweep.expand(f"{ABLATION}:tiny", "/mnt/runs", eval=True)
  script.write_text(sweep.tpu_script(s, "/mnt/runs", ["pod-a", "pod-b"], zone="z"))
  stub(tmp_path, "gcloud", calls_dir)
  env = {**os.environ, "GCLOUD": str(tmp_path / "gcloud")}
  subprocess.run(["bash", str(script)], env=env, check=True, capture_output=True)
  made = calls(calls_dir)
  assert len(made) == 32
  seen = set()
  for argv in made:
    assert argv[:4] == ["compute", "tpus", "tpu-vm", "ssh"] and "--zone=z" in argv
    remote = next(a for a in argv if a.startswith("--command="))
    assert "python3 -m experiments.sweep --config configs/ablations/schedules.py:tiny" in remote
    assert "--root /mnt/runs" in remote and "--eval" in remote
    index, mode = remote.rsplit("--index ", 1)[1].split(" --only ")
    assert argv[4] == ("pod-a" if int(index) % 2 == 0 else "pod-b")
    assert f"--worker={'all' if mode == 'train' else '0'}" in argv
    seen.add((int(index), mode))
  assert seen == {(i, m) for i in range(16) for m in ("train", "eval")}


def test_one_pod_runs_one_after_another_and_set_overrides_travel():
  s = sweep.expand(f"{ABLATION}:tiny", "/mnt/runs", common={"train.num_steps": 7})
  text = sweep.tpu_script(s, "/mnt/runs", ["only"], zone="z")
  assert ") &" not in text and text.count("run_on only all ") == 16
  assert "--only eval" not in text  # no eval asked for
  assert "--set train.num_steps=7" in text  # the workers re-expand the same sweep
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
