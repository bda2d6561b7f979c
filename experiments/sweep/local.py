"""Runs a sweep on this machine: launch.py subprocesses, N runs at a time, each run's modes in
order, skipping what is finished."""

from __future__ import annotations

import ctypes
import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from diffusion import rundir, storage
from experiments.sweep.spec import MODES, REPO, Run, Sweep, command, local_path, shell
from experiments.sweep.state import drift_note, pending_modes, trained

STOPPED = 75  # launch.py's exit after SIGTERM/SIGINT saved a checkpoint (EX_TEMPFAIL): resumable
_PR_SET_PDEATHSIG = 1
LOCK_WAIT_S = 120.0  # how long a run waits for a live trainer (e.g. an orphan saving) to let go


def _die_with_parent(parent: int):
  """A preexec_fn: the child gets SIGTERM (saves and exits 75) when the runner dies, even by
  kill -9; no orphan trains on with its output lost. (Linux sends it when the thread that
  started the child ends; the runner's threads live while they wait for their children.)"""
  prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before the fork

  def preexec() -> None:
    prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the runner died before prctl took effect
      os.kill(os.getpid(), signal.SIGTERM)

  return preexec


class LocalRunner:
  """Runs launch.py subprocesses, `parallel` runs at a time, each run's modes in order (`only`:
  one mode). Output goes to <workdir>/sweep.log (and to the terminal when one run at a time; in a
  gs:// workdir, which has no appends, the log is added when the launch ends).
  SIGTERM is passed on to the children (training saves a checkpoint and exits 75, reported as
  interrupted, not failed); Ctrl-C reaches them directly. No new run starts after either. A
  child gets SIGTERM when the runner dies (kill -9 included), and a run whose workdir lock is
  held by a live process waits for it (LOCK_WAIT_S) instead of failing."""

  def __init__(
    self, sweep: Sweep, parallel: int = 1, echo: bool | None = None, only: str | None = None
  ):
    self.sweep, self.parallel, self.only = sweep, max(1, parallel), only
    self.echo = self.parallel == 1 if echo is None else echo
    self._procs: set[subprocess.Popen] = set()
    self._lock = threading.Lock()
    self.stopping = False

  def _run_mode(self, run: Run, mode: str) -> int | None:
    """The exit status of launch.py in `mode`, or None if it was not started (stopping)."""
    argv = command(self.sweep, run, mode)
    workdir = local_path(run.workdir)
    storage.makedirs(workdir)
    path = os.path.join(workdir, "sweep.log")
    remote = storage.is_remote(path)
    with io.StringIO() if remote else open(path, "a") as log:
      log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {shell(argv)}\n")
      log.flush()
      with self._lock:
        if self.stopping:
          return None
        proc = subprocess.Popen(
          argv,
          cwd=REPO,
          stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT,
          text=True,
          bufsize=1,
          preexec_fn=_die_with_parent(os.getpid()),
        )
        self._procs.add(proc)
      try:
        for line in proc.stdout:
          log.write(line)
          if self.echo:
            sys.stdout.write(line)
            sys.stdout.flush()
        return proc.wait()
      finally:
        with self._lock:
          self._procs.discard(proc)
        if remote:
          storage.append_text(path, log.getvalue())

  def _run(self, run: Run) -> tuple[Run, str]:
    """Train then (for an --eval sweep) evaluate, each only if still needed; a step whose
    predecessor did not finish (e.g. training stopped by a signal) is not started."""
    tag = f"[{run.index}] {run.name}"
    note = drift_note(self.sweep, run)
    if note:
      print(f"{tag}{note}", flush=True)
    ran = []
    for mode in MODES:
      if self.only and mode != self.only:
        continue
      todo = pending_modes(run, self.sweep.eval or self.only == "eval")
      if mode not in todo:
        continue
      if todo[0] != mode:
        return run, f"{mode} waits for {todo[0]} to finish"
      if self.stopping:
        return run, "not started (stopping)"
      busy = self._wait_for_lock(run, tag)
      if busy:
        return run, busy
      t0 = time.time()
      print(f"{tag}: {mode} ...", flush=True)
      rc = self._run_mode(run, mode)
      took = time.time() - t0
      if rc is None:
        return run, "not started (stopping)"
      if rc in (-signal.SIGTERM, -signal.SIGINT):  # killed by a signal before its handler ran
        print(f"{tag}: {mode} stopped by a signal after {took:.0f} s; rerun to resume", flush=True)
        return run, f"{mode} interrupted (stopped by a signal; rerun to resume)"
      if rc == STOPPED:  # a signal stopped it after saving: a rerun resumes from there
        print(
          f"{tag}: {mode} interrupted after {took:.0f} s (exit {rc}: stopped by a signal "
          "after saving a checkpoint); rerun to resume",
          flush=True,
        )
        return run, f"{mode} interrupted (exit {rc}, checkpoint saved; rerun to resume)"
      if rc != 0:
        log = os.path.join(run.workdir, "sweep.log")
        print(f"{tag}: {mode} FAILED (exit {rc}) after {took:.0f} s; see {log}", flush=True)
        return run, f"{mode} failed (exit {rc})"
      if mode == "train" and not trained(run):  # stopped by a signal: it saved and exited
        print(f"{tag}: train stopped before its last step", flush=True)
        return run, "train stopped before its last step (rerun to resume)"
      print(f"{tag}: {mode} done in {took:.0f} s", flush=True)
      ran.append(mode)
    return run, ("ran " + "+".join(ran)) if ran else "skipped (finished)"

  def _wait_for_lock(self, run: Run, tag: str) -> str:
    """Waits up to LOCK_WAIT_S for a live trainer holding the run's lock (e.g. the child of a
    killed runner, saving before it exits); "" once free, else the run's outcome."""
    workdir = local_path(run.workdir)
    holder = rundir.holder(workdir)
    if holder is None:
      return ""
    print(
      f"{tag}: waiting for pid {holder.get('pid')} on {holder.get('host')}, which holds "
      f"{workdir}/lock",
      flush=True,
    )
    deadline = time.time() + LOCK_WAIT_S
    while holder is not None and time.time() < deadline and not self.stopping:
      time.sleep(0.5)
      holder = rundir.holder(workdir)
    if holder is None:
      return ""
    return (
      f"busy (pid {holder.get('pid')} on {holder.get('host')} holds {workdir}/lock; rerun when "
      "it ends)"
    )

  def terminate(self, signum: int = signal.SIGTERM) -> None:
    with self._lock:
      self.stopping = True
      for proc in self._procs:
        if proc.poll() is None:
          proc.send_signal(signum)

  def run(self, runs: Sequence[Run]) -> list[tuple[Run, str]]:
    """Runs what each run still needs; returns (run, outcome) in sweep order."""

    def interrupted(signum: int, frame) -> None:  # the children got the same SIGINT: saving
      self.stopping = True
      print("interrupted: waiting for the runs to save and stop", flush=True)

    # Our own handlers, whatever this process had before (a caller's, or none), and unblocked.
    old = {
      signal.SIGTERM: signal.signal(signal.SIGTERM, lambda s, f: self.terminate(s)),
      signal.SIGINT: signal.signal(signal.SIGINT, interrupted),
    }
    signal.pthread_sigmask(signal.SIG_UNBLOCK, old)
    try:
      with ThreadPoolExecutor(self.parallel) as pool:
        futures = [pool.submit(self._run, r) for r in runs]
        return [f.result() for f in futures]
    finally:
      for sig, handler in old.items():
        signal.signal(sig, handler)
