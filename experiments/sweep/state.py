"""Where each run of a sweep stands, read from its workdir: trained, evaluated, what is left, and
whether the config file changed under it (drift).

Training rows come from diffusion.runlog (the one metrics.jsonl reader); the fields that cannot
change training are configs.common.NOT_HASHED (the one list).
"""

from __future__ import annotations

import json
import os

from configs.common import as_dict, load, training_changes
from diffusion import runlog, storage
from experiments.sweep.spec import Run, Sweep, local_path


def trained(run: Run) -> bool:
  """Training reached num_steps: the orbax step folder exists and the last row says so."""
  ckpt = os.path.join(local_path(run.workdir), "checkpoints", str(run.num_steps))
  return storage.isdir(ckpt) and runlog.last_train_step(local_path(run.workdir)) == run.num_steps


def _sampler_specs(text: str) -> set[tuple[str, int | None]]:
  specs = set()
  for item in filter(None, (s.strip() for s in text.split(","))):
    name, _, steps = item.partition(":")
    specs.add((name, int(steps) if steps else None))
  return specs


def evaluated(run: Run) -> bool:
  """eval/metrics.json exists for the final step and scores every requested sampler:steps."""
  try:
    result = json.loads(
      storage.read_text(os.path.join(local_path(run.workdir), "eval", "metrics.json"))
    )
  except (OSError, json.JSONDecodeError):
    return False
  if result.get("step") != run.num_steps:
    return False
  have = {(r.get("sampler"), r.get("num_steps")) for r in result.get("results", [])}
  names = {n for n, _ in have}
  return all(
    (name, steps) in have if steps is not None else name in names
    for name, steps in _sampler_specs(run.eval_samplers)
  )


def status(run: Run, eval: bool) -> str:
  """ "done", "trained" (eval still to do), "partial" (started, resumes) or "new"."""
  if trained(run):
    return "done" if not eval or evaluated(run) else "trained"
  started = storage.isdir(os.path.join(local_path(run.workdir), "checkpoints"))
  return "partial" if started else "new"


def pending_modes(run: Run, eval: bool) -> list[str]:
  """What a rerun still has to do for this run: ["train", "eval"], ["eval"] or []."""
  modes = [] if trained(run) else ["train"]
  if eval and (modes or not evaluated(run)):
    modes.append("eval")
  return modes


def config_drift(sweep: Sweep, run: Run) -> list[str]:
  """Dotted keys of training fields whose value in the run's config.json (what it trained with)
  differs from the config the sweep gives it now, leaving out train.num_steps (a longer run
  resumes); [] when it has not started. launch.py refuses to resume such a run."""
  try:
    saved = json.loads(storage.read_text(os.path.join(local_path(run.workdir), "config.json")))
  except (OSError, json.JSONDecodeError):
    return []
  now = as_dict(load(sweep.config, sweep.overrides(run)))
  return training_changes(saved, now, ignore=("train.num_steps",))


def drift_note(sweep: Sweep, run: Run) -> str:
  """The warning a dry run and the runner print for a drifted run (see `config_drift`), or ""."""
  keys = config_drift(sweep, run)
  if not keys:
    return ""
  shown = ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
  return (
    f"; WARNING: its config.json differs from the sweep's config in {shown} (the config "
    "file changed since it trained): use another --root or --set to train afresh"
  )
