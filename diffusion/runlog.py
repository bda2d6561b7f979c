"""The run log: metrics.jsonl (one JSON object per logged step) and TensorBoard, written here and
read here only.

Rows: training rows {"step", "loss", ...} (no "mode", or "mode": "train"); eval rows
{"step", "mode": "eval", "sampler", ...}. A training step is logged once: a resumed run first
drops the rows of the steps after its checkpoint (`truncate`), and the reader keeps the newest
row of a step all the same, so older logs read right too. Imports no JAX.

A remote workdir (gs://) has no appends (diffusion/storage.py): each write rewrites metrics.jsonl,
and TensorBoard writes its events in a local temporary folder, each file uploaded whole at every
write and at close (through gcsfs, like the rest of the run directory's files).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from typing import Any

from absl import logging

from diffusion import storage

METRICS = "metrics.jsonl"


def read_rows(path: str) -> list[dict]:
  """Every row of a JSON-lines file; a missing file is empty, lines cut by a kill are skipped."""
  rows = []
  for line in storage.read_text(path).split("\n") if storage.exists(path) else []:
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(row, dict):
      rows.append(row)
  return rows


def is_train_row(row: Mapping[str, Any]) -> bool:
  """The one rule for a training row: mode absent or "train", with a step and a loss."""
  return row.get("mode", "train") == "train" and "step" in row and "loss" in row


def train_rows(rows: Iterable[Mapping[str, Any]]) -> list[dict]:
  """Training rows, one per step (the newest of repeated steps), in step order."""
  by_step = {int(r["step"]): dict(r) for r in rows if is_train_row(r)}
  return [by_step[s] for s in sorted(by_step)]


def eval_rows(rows: Iterable[Mapping[str, Any]]) -> list[dict]:
  return [dict(r) for r in rows if r.get("mode") == "eval"]


def read_metrics(workdir: str) -> list[dict]:
  """The rows of <workdir>/metrics.jsonl (see `read_rows`)."""
  return read_rows(os.path.join(workdir, METRICS))


def last_train_step(workdir: str) -> int | None:
  rows = train_rows(read_metrics(workdir))
  return int(rows[-1]["step"]) if rows else None


def append_rows(workdir: str, rows: Iterable[Mapping[str, Any]]) -> None:
  """Appends rows to <workdir>/metrics.jsonl (eval and sample modes; the trainer uses Writer)."""
  storage.append_text(
    os.path.join(workdir, METRICS), "".join(json.dumps(dict(r)) + "\n" for r in rows)
  )


def truncate(workdir: str, step: int) -> int:
  """Drops the training rows after `step` (a resume from the checkpoint at `step` logs them
  again), keeping every other row; atomic (a kill leaves the old file or the new one). Returns
  how many rows were dropped."""
  path = os.path.join(workdir, METRICS)
  rows = read_rows(path)
  keep = [r for r in rows if not (is_train_row(r) and int(r["step"]) > step)]
  if len(keep) == len(rows):
    return 0
  storage.write_text(path, "".join(json.dumps(r) + "\n" for r in keep))
  return len(rows) - len(keep)


class Writer:
  """metrics.jsonl plus TensorBoard events (tensorboardX, no TensorFlow); a no-op when disabled
  (processes other than 0). `start_step`: the step training resumes from; TensorBoard hides the
  events of later steps that an interrupted run wrote (purge_step), metrics.jsonl drops them."""

  def __init__(self, workdir: str, enabled: bool, start_step: int = 0):
    self.enabled = enabled
    if enabled:
      dropped = truncate(workdir, start_step)
      if dropped:
        logging.info(
          "metrics.jsonl: dropped %d rows logged after step %d (resumed there).",
          dropped,
          start_step,
        )
      self._metrics = os.path.join(workdir, METRICS)
      remote = storage.is_remote(workdir)
      self._jsonl = None if remote else open(self._metrics, "a")
      self._events = os.path.join(workdir, "tensorboard")
      self._local_events = tempfile.mkdtemp(prefix="diffusion-tensorboard-") if remote else None
      self._tb = _summary_writer()(
        self._local_events or self._events, purge_step=start_step + 1 if start_step else None
      )

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    line = json.dumps({"step": step, **scalars}) + "\n"
    if self._jsonl:
      self._jsonl.write(line)
      self._jsonl.flush()
    else:
      storage.append_text(self._metrics, line)
    for k, v in scalars.items():
      self._tb.add_scalar(k, v, step)
    self._tb.flush()
    self._upload_events()

  def close(self) -> None:
    if self.enabled:
      if self._jsonl:
        self._jsonl.close()
      self._tb.close()
      self._upload_events()
      if self._local_events:
        shutil.rmtree(self._local_events, ignore_errors=True)

  def _upload_events(self) -> None:
    """Copies the event files of a remote workdir's local folder up (whole objects)."""
    for name in os.listdir(self._local_events) if self._local_events else []:
      storage.upload(os.path.join(self._local_events, name), f"{self._events}/{name}")


def _summary_writer() -> type:
  """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch when it is
  installed (2-3 s per launch) only to recognise torch tensors, and this writer logs floats."""
  blocked = "torch" not in sys.modules
  if blocked:
    sys.modules["torch"] = None  # type: ignore[assignment]  # makes `import torch` raise
  try:
    from tensorboardX import SummaryWriter
  finally:
    if blocked:
      del sys.modules["torch"]
  return SummaryWriter


def duration(seconds: float) -> str:
  """'H:MM:SS', with days in front past 24 hours ('2d 03:04:05')."""
  days, rest = divmod(int(seconds), 86400)
  return (f"{days}d " if days else "") + time.strftime("%H:%M:%S", time.gmtime(rest))


class _QuietLibraries:
  """Drops INFO records from orbax's modules (dozens per save), keeping warnings and errors."""

  def filter(self, record) -> bool:
    return record.levelno > 20 or "orbax" not in record.pathname


def quiet_library_logs() -> None:
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
    handler.addFilter(_QuietLibraries())
