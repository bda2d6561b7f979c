"""The run directory's own files: the trainer's lock and config.json with its history.

Lock: `<workdir>/lock`, made by an exclusive create (atomic on local and network filesystems, and
on GCS through the upload's generation-match precondition: diffusion/storage.py), holding the host,
pid, the process's start time and the time it was taken. A lock whose process is gone (same host,
pid dead or reused) is stale and taken over; a lock from another host is never cleared
automatically: its message says how. Only process 0 of a multi-host run locks.

The workdir may be a gs:// URL: every file here goes through diffusion/storage.py.

Config: config.json is what the checkpoints were trained with. A relaunch that changes a field that
can change training (configs.common.NOT_HASHED lists those that cannot) while checkpoints exist is
refused before anything is written. Other changes (sampling, logging, a longer num_steps) are
applied, and each is recorded in config_history.jsonl: one row per relaunch
{"time": ISO time, "changes": {dotted key: [old, new]}}.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

from diffusion import storage

LOCK = "lock"
CONFIG = "config.json"
HISTORY = "config_history.jsonl"
PHEMA = "phema"  # power-EMA snapshots of training (train.py), read by --mode posthoc


class WorkdirBusyError(RuntimeError):
  """Another live trainer holds the workdir."""


def _start_time(pid: int) -> str | None:
  """The process's start time in clock ticks since boot (Linux), None if it does not exist."""
  try:
    with open(f"/proc/{pid}/stat") as fh:
      return fh.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      return None
    except PermissionError:
      pass
    return "unknown"  # alive, start time not readable here


def _holder() -> dict[str, Any]:
  return {
    "host": socket.gethostname(),
    "pid": os.getpid(),
    "start": _start_time(os.getpid()),
    "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
  }


_HELD: set[Lock] = set()  # locks this process holds, for `release_locks`


def release_locks() -> None:
  """Releases every lock this process holds (a signal handler's exit path)."""
  for lock in list(_HELD):
    lock.release()


class Lock:
  """`with Lock(workdir):` holds <workdir>/lock for one trainer (see the module docstring)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK)
    self._held = False

  def _stale(self, info: Mapping[str, Any]) -> bool:
    if info.get("host") != socket.gethostname():
      return False
    start = _start_time(int(info.get("pid", -1)))
    return start is None or (start != "unknown" and start != info.get("start"))

  def acquire(self) -> Lock:
    storage.makedirs(os.path.dirname(self.path))
    for _ in range(3):
      try:
        storage.create_exclusive(self.path, json.dumps(_holder()))
      except FileExistsError:
        try:
          info = json.loads(storage.read_text(self.path))
        except (OSError, json.JSONDecodeError):
          info = {}  # being written, or torn by a crash
        if info and self._stale(info):
          storage.remove(self.path)  # a dead trainer's lock on this host
          continue
        if not info:
          time.sleep(0.2)
          continue
        raise WorkdirBusyError(  # noqa: B904 (not an error in the handler: the lock is held)
          f"{os.path.dirname(self.path)} is in use by another trainer (pid {info.get('pid')} on "
          f"{info.get('host')}, since {info.get('since')}). Wait for it, or use another "
          f"--workdir; if that run is dead (e.g. a node that crashed), delete {self.path}."
        )
      self._held = True
      _HELD.add(self)
      return self
    raise WorkdirBusyError(
      f"could not take {self.path}: it keeps changing or is unreadable; "
      "delete it if no trainer is running."
    )

  def release(self) -> None:
    if self._held:
      self._held = False
      _HELD.discard(self)
      try:
        storage.remove(self.path)
      except FileNotFoundError:
        pass

  def __enter__(self) -> Lock:
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def holder(workdir: str) -> dict[str, Any] | None:
  """Who holds <workdir>/lock (host, pid, start, since) when it is not stale, else None."""
  try:
    info = json.loads(storage.read_text(os.path.join(workdir, LOCK)))
    return None if Lock(workdir)._stale(info) else info
  except (OSError, ValueError, TypeError, AttributeError):  # none, torn, or not a holder's JSON
    return None


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Nested dicts as dotted keys: {"a": {"b": 1}, "c.d": {"e": 2}} -> {"a.b": 1, "c.d.e": 2}.
  Empty dicts stay leaves."""
  flat: dict[str, Any] = {}
  for k, v in tree.items():
    if isinstance(v, Mapping) and v:
      flat.update(flatten(v, f"{prefix}{k}."))
    else:
      flat[f"{prefix}{k}"] = v
  return flat


def has_checkpoints(workdir: str) -> bool:
  """Whether <workdir>/checkpoints holds a finished step folder."""
  folder = os.path.join(workdir, "checkpoints")
  return storage.isdir(folder) and any(n.isdigit() for n in storage.listdir(folder))


def check_workdir(workdir: str) -> None:
  """Raises ValueError when `workdir` (or its checkpoints/ folder) is a file, or when it cannot
  be created or written (its nearest existing folder is read-only). Writes nothing."""
  if storage.is_remote(workdir):
    return
  for path in (workdir, os.path.join(workdir, "checkpoints")):
    if os.path.exists(path) and not os.path.isdir(path):
      raise ValueError(f"{path} is a file, not a folder; give --workdir a folder (or move it).")
  existing = os.path.abspath(workdir)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise ValueError(f"cannot create --workdir {workdir}: {existing} is a file.")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise ValueError(
      f"cannot write --workdir {workdir}: {existing} is not writable; choose a writable folder."
    )


def _saved_config(workdir: str) -> dict[str, Any] | None:
  """config.json of `workdir`, None when there is none; ValueError naming it when garbled."""
  path = os.path.join(workdir, CONFIG)
  if not storage.exists(path):
    return None
  try:
    return json.loads(storage.read_text(path))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(
      f"{path} is not valid JSON ({e}); restore it, or delete it to have it rewritten from "
      "this launch's config (the checkpoints are then checked against this config's shapes)."
    ) from e


Changes = Callable[..., list[str]]  # (old, new, ignore=(...)) -> dotted training fields that differ


def check_config(workdir: str, config: Mapping[str, Any], training_changes: Changes) -> None:
  """Raises ValueError when checkpoints exist and `config` changes a field that can change
  training against config.json (see the module docstring; `training_changes` is the config
  loader's rule, configs.common.training_changes). Writes nothing."""
  old = _saved_config(workdir)
  if old is None or old == config or not has_checkpoints(workdir):
    return
  bad = training_changes(old, config, ignore=("train.num_steps",))
  if bad:
    path = os.path.join(workdir, CONFIG)
    a, b = flatten(old), flatten(config)
    shown = "; ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in bad[:6])
    raise ValueError(
      f"{workdir} holds checkpoints trained with another config ({shown}"
      f"{' ...' if len(bad) > 6 else ''}). Relaunch with the settings in {path}, or use a new "
      "--workdir for the new settings."
    )


def record_config(workdir: str, config: Mapping[str, Any], training_changes: Changes) -> list[str]:
  """Writes config.json (`config` in its JSON form) for a run about to train (see the module
  docstring); call it once the checkpoints are known to fit `config`. Returns the keys that
  changed (recorded in the history). Raises ValueError as `check_config`; then nothing is
  written."""
  path = os.path.join(workdir, CONFIG)
  text = json.dumps(config, sort_keys=True, indent=2)
  old = _saved_config(workdir)
  if old is None:
    storage.makedirs(workdir)
    storage.write_text(path, text)
    return []
  if old == config:
    return []
  check_config(workdir, config, training_changes)
  a, b = flatten(old), flatten(config)
  changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
  row = {
    "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    "changes": {k: [a.get(k), b.get(k)] for k in changed},
  }
  storage.append_text(os.path.join(workdir, HISTORY), json.dumps(row) + "\n")
  storage.write_text(path, text)
  return changed
