"""The sweep's SLURM array job on a real SLURM: one node ("localhost") with two CPU tasks, as
.ci/slurm_up.sh sets it up; the test runs that script when SLURM is not running, and fails if it
cannot (it needs root or passwordless sudo, and installs Debian's slurm-wlm if missing). The job
trains through jax.distributed in two processes (gloo) of two devices each, with the state split
over all four (fsdp 4, spanning both processes: gathers, gradient reductions and checkpoints
across them). SIGTERM to one of the two processes (a preemption notice may reach one host only)
makes both stop at the same step, save and exit 75, and the job requeue itself; the requeued task
resumes to the parameters of an uninterrupted one-process run on four devices."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import ROOT, TINY_CONFIG, launch, run_python

from diffusion import checkpoints

SETUP = ".ci/slurm_up.sh"
UP = ("idle", "mixed", "allocated")  # a node taking jobs (allocated: the job waits its turn)
NUM_STEPS = 30  # the signal lands after step 2; the rest must outlast its delivery
# fsdp_min_size 16: the tiny U-Net's kernels are split (its biases of 8 stay whole).
SETTINGS = {
  "train.batch_size": 16,
  "train.checkpoint_every": 0,
  "train.num_steps": NUM_STEPS,
  "parallel.fsdp": 4,
  "parallel.fsdp_min_size": 16,
}


def slurm(*argv: str) -> str:
  return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def slurm_state() -> str | None:
  """The node's state ("idle", "allocated", ...), or None when SLURM is missing or not answering."""
  if shutil.which("sinfo") is None:
    return None
  r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=60)
  return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else None


def ensure_slurm(setup: str = os.path.join(ROOT, SETUP)) -> None:
  """Returns when a node takes jobs; else runs `setup` (installing SLURM first if missing; root
  or passwordless sudo) and fails with its own message if the node still does not."""
  if (slurm_state() or "").startswith(UP):
    return
  r = subprocess.run([setup], cwd=ROOT, capture_output=True, text=True, timeout=900)
  state = slurm_state()
  if r.returncode or not (state or "").startswith(UP):
    pytest.fail(
      f"SLURM is not running and {setup} could not start it (exit {r.returncode}, node state "
      f"{state}): {(r.stderr or r.stdout).strip()[-2000:]}"
    )


@pytest.fixture(scope="module", autouse=True)
def running_slurm() -> None:
  ensure_slurm()


def job(job_id: str) -> dict[str, str]:
  """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
  return dict(re.findall(r"(\w+)=(\S*)", slurm("scontrol", "show", "job", job_id)))


def wait_for(what: str, ready, log: str, timeout: float = 300) -> None:
  deadline = time.time() + timeout
  while not ready():
    if time.time() > deadline:
      tail = open(log).read()[-4000:] if os.path.exists(log) else "(no log)"
      queue = subprocess.run(["squeue"], capture_output=True, text=True).stdout
      pytest.fail(f"timed out waiting for {what}; squeue:\n{queue}job log:\n{tail}")
    time.sleep(0.05)


def terminate_process(job_id: str, rank: int) -> None:
  """SIGTERM to the training process of SLURM job `job_id` with SLURM_PROCID `rank` alone (read
  from /proc: the job's processes run on this node)."""
  want = {f"SLURM_JOB_ID={job_id}".encode(), f"SLURM_PROCID={rank}".encode()}
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{pid}/cmdline", "rb") as f:
        if b"launch.py" not in f.read():
          continue
      with open(f"/proc/{pid}/environ", "rb") as f:
        if want <= set(f.read().split(b"\0")):
          os.kill(int(pid), signal.SIGTERM)
          return
    except OSError:  # the process ended meanwhile
      continue
  pytest.fail(f"no training process of rank {rank} in job {job_id}")


def final_params(workdir: str) -> tuple[int, dict]:
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  try:
    step = ckpt.latest_step()
    return step, ckpt.restore_host(step)["params"]
  finally:
    ckpt.close()


def test_array_job_trains_two_processes_saves_on_sigterm_and_resumes_after_requeue(tmp_path):
  flags = [f"--config.{k}={v}" for k, v in SETTINGS.items()]
  reference = launch(tmp_path / "ref", *flags, devices=4, wait=False)  # uninterrupted, meanwhile
  sets = [a for k, v in SETTINGS.items() for a in ("--set", f"{k}={v}")]
  submit = run_python(  # sbatch passes this environment on to the job: 2 processes x 2 devices
    ["-m", "experiments.sweep", "--config", TINY_CONFIG, "--root", str(tmp_path), *sets]
    + ["--slurm", "--gpus_per_node=0", "--tasks_per_node=2", "--cpus_per_task=1", "--time=10:00"],
    devices=2,
    env={"PYTHON": sys.executable},  # the job script's interpreter
  )
  assert submit.returncode == 0, submit.stderr
  array_id = re.search(r"Submitted batch job (\d+)", submit.stdout).group(1)
  task = f"{array_id}_0"
  (sweep_root,) = [p for p in tmp_path.iterdir() if p.name.startswith("tiny+")]
  workdir, log = sweep_root / "base", str(sweep_root / "slurm" / f"{array_id}_0.out")
  metrics = workdir / "metrics.jsonl"
  try:
    wait_for("the first logged step", lambda: metrics.exists() and metrics.read_text(), log)
    terminate_process(job(task)["JobId"], rank=1)
    # The task requeues itself and starts again after SLURM's hold (slurm_up.sh: about 6 s).
    wait_for("the end of the job", lambda: job(task)["JobState"] == "COMPLETED", log)
    out, _ = reference.communicate(timeout=300)
  finally:
    subprocess.run(["scancel", array_id], capture_output=True)
    reference.kill()
  text = open(log).read()
  assert job(task)["ExitCode"] == "0:0", text[-4000:]
  # Both allocations trained with two processes through jax.distributed (the log is appended).
  assert text.count("4 devices (fsdp 4), 2 processes") == 2, text[-4000:]
  assert "train stopped after saving a checkpoint (exit 75); requeueing job" in text
  assert not (workdir / "lock").exists()
  stopped = int(re.search(r"resumed from step (\d+)", text).group(1))
  # Both processes, the signalled one and the other, stopped at that step.
  assert text.count(f"stopped by a signal at step {stopped}; checkpoint saved. Relaunch") == 2
  assert 0 < stopped < NUM_STEPS, "training finished before SIGTERM arrived: raise NUM_STEPS"
  assert stopped % 2 == 0  # several processes stop together at a log step (log_every=2)
  steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
  assert steps == list(range(2, NUM_STEPS + 1, 2))  # each logged step once, across the requeue
  assert reference.returncode == 0, out[-3000:]
  (s1, a), (s2, b) = final_params(str(tmp_path / "ref")), final_params(str(workdir))
  assert s1 == s2 == NUM_STEPS
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
