"""The runs of a sweep as the report sees them: each workdir's training rows (diffusion.runlog's
reader), eval results and newest sample grid; which overrides vary, and the chart layout."""

from __future__ import annotations

import glob
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from diffusion import runlog
from experiments.sweep.spec import MANIFEST, read_manifest

QUALITY_KEYS = ("fd", "kid", "swd", "fid", "inception_kid")
MISSING = "(default)"  # the value shown for a key that a run does not override


@dataclass
class RunData:
  """What the report knows about one workdir."""

  name: str
  workdir: str
  overrides: dict[str, Any] = field(default_factory=dict)
  index: int = -1
  num_steps: int | None = None  # the sweep's target, when a manifest says so
  train: list[dict] = field(default_factory=list)  # training rows, one per step, by step
  eval: dict | None = None  # eval/metrics.json (or rebuilt from metrics.jsonl eval rows)
  samples: str | None = None  # newest samples/step_N.png

  @property
  def step(self) -> int | None:
    return self.train[-1]["step"] if self.train else None

  def final(self, key: str, last: int) -> float | None:
    """Mean of `key` over the last `last` logged training rows that have it."""
    vals = [r[key] for r in self.train if isinstance(r.get(key), int | float)][-last:]
    return float(np.mean(vals)) if vals else None

  def quality(self) -> list[dict]:
    return list((self.eval or {}).get("results") or [])

  def value(self, key: str | None) -> str:
    """The run's override of `key` as text ("" for no key, MISSING when not overridden)."""
    return text(self.overrides.get(key, MISSING)) if key else ""


def number(v: Any) -> float | None:
  """A finite int or float as float, else None (bools, None, NaN, text)."""
  ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
  return float(v) if ok else None


def text(v: Any) -> str:
  """An override value as short text: dicts as k=v lists, sequences in parentheses."""
  if isinstance(v, Mapping):
    return ",".join(f"{k}={text(x)}" for k, x in sorted(v.items())) or "{}"
  if isinstance(v, list | tuple):
    return "(" + ",".join(text(x) for x in v) + ")"
  return str(v)


def _eval_from_rows(rows: list[dict]) -> dict | None:
  """eval/metrics.json's shape from the newest step's eval rows of metrics.jsonl."""
  rows = runlog.eval_rows(rows)
  if not rows:
    return None
  step = max(r.get("step", 0) for r in rows)
  latest = {
    (r.get("sampler"), r.get("num_steps")): r  # a rerun's rows replace older ones
    for r in rows
    if r.get("step", 0) == step
  }
  bpd = next((r["bpd"] for r in latest.values() if r.get("bpd") is not None), None)
  results = [
    {k: r.get(k) for k in ("sampler", "num_steps", "nfe", *QUALITY_KEYS)}
    for r in latest.values()
    if r.get("sampler")
  ]
  return {"step": step, "bpd": bpd, "results": results}


def load_run(
  workdir: str,
  name: str | None = None,
  overrides: Mapping[str, Any] | None = None,
  index: int = -1,
  num_steps: int | None = None,
) -> RunData:
  """Reads metrics.jsonl (training rows one per step, the newest kept, as runlog reads them),
  eval/metrics.json (else metrics.jsonl's eval rows) and the newest sample grid of a workdir."""
  rows = runlog.read_metrics(workdir)
  try:
    with open(os.path.join(workdir, "eval", "metrics.json")) as fh:
      ev = json.load(fh)
  except (OSError, json.JSONDecodeError):
    ev = None
  grids = []
  for p in glob.glob(os.path.join(workdir, "samples", "step_*.png")):
    m = re.fullmatch(r"step_(\d+)\.png", os.path.basename(p))
    if m:
      grids.append((int(m.group(1)), p))
  return RunData(
    name=name or os.path.basename(os.path.normpath(workdir)),
    workdir=workdir,
    overrides=dict(overrides or {}),
    index=index,
    num_steps=num_steps,
    train=runlog.train_rows(rows),
    eval=ev or _eval_from_rows(rows),
    samples=max(grids)[1] if grids else None,
  )


def load_sweep(path: str) -> tuple[str, list[RunData]]:
  """(title, runs) from a sweep folder with sweep.json, a manifest file, or a folder of workdirs."""
  manifest = path if path.endswith(".json") else os.path.join(path, MANIFEST)
  if os.path.isfile(manifest):
    sweep = read_manifest(os.path.abspath(manifest))
    base = os.path.dirname(os.path.abspath(manifest))
    # The manifest's workdirs may be relative to the repository; the folder next to it is sure.
    runs = [
      load_run(
        os.path.join(base, os.path.basename(os.path.normpath(r.workdir))),
        r.name,
        r.overrides,
        r.index,
        r.num_steps,
      )
      for r in sweep.runs
    ]
    return f"{sweep.name} ({sweep.config})", runs
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path} is neither a sweep folder, a sweep.json nor a folder.")
  dirs = sorted(
    d for d in glob.glob(os.path.join(path, "*")) if os.path.exists(os.path.join(d, runlog.METRICS))
  )
  if not dirs:
    raise FileNotFoundError(f"no sweep.json and no workdirs (with metrics.jsonl) in {path}.")
  return os.path.basename(os.path.normpath(path)), [
    load_run(d, index=i) for i, d in enumerate(dirs)
  ]


# ---- what varies ------------------------------------------------------------------------------


def varying_keys(runs: Sequence[RunData]) -> list[str]:
  """Override keys whose value is not the same in every run (sorted)."""
  keys = sorted({k for r in runs for k in r.overrides})
  return [k for k in keys if len({r.value(k) for r in runs}) > 1]


def specs(runs: Sequence[RunData]) -> list[tuple[str, int]]:
  """Every (sampler, num_steps) any run was scored with, by sampler then steps."""
  return sorted(
    {
      (q["sampler"], int(q["num_steps"]))
      for r in runs
      for q in r.quality()
      if q.get("sampler") is not None and q.get("num_steps") is not None
    }
  )


def quality_metric(runs: Sequence[RunData], wanted: str = "fd") -> str | None:
  """`wanted` if any run has it, else the first of fd, swd, kid that one has; None without eval."""
  for k in (wanted, "fd", "swd", "kid"):
    if any(number(q.get(k)) is not None for r in runs for q in r.quality()):
      return k
  return None


def layout(
  runs: Sequence[RunData], group: str | None = None
) -> tuple[str | None, list[str], list[str], list[tuple[str, list[RunData]]]]:
  """(group key, its values in order, panel keys, [(panel title, runs)]).

  The group key is `group`, else diffusion.schedule when it varies, else the first varying key.
  Keys that follow the group key (one value per group value, e.g. a schedule's parameters) make
  no panels; the other varying keys do, one panel per combination."""
  keys = varying_keys(runs)
  if group is None:
    group = "diffusion.schedule" if "diffusion.schedule" in keys else (keys[0] if keys else None)
  values = list(dict.fromkeys(r.value(group) for r in runs))
  panel_keys = [
    k
    for k in keys
    if k != group
    and not (
      group is not None
      and all(len({r.value(k) for r in runs if r.value(group) == g}) == 1 for g in values)
    )
  ]
  panels: dict[str, list[RunData]] = {}
  for r in runs:
    title = ", ".join(f"{k.rsplit('.', 1)[-1]}={r.value(k)}" for k in panel_keys)
    panels.setdefault(title, []).append(r)
  return group, values, panel_keys, list(panels.items())
