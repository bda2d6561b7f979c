"""Report of a sweep: a markdown and CSV table of its runs and PNG plots, from their workdirs.

Run:  python -m experiments.report runs/schedules-tiny [--out DIR] [--last 5] [--metric fd]
      (the argument is a sweep folder holding sweep.json, the manifest itself, or any folder
      whose subfolders are workdirs)
Produces, in <sweep>/report/ (or --out):
  report.md     one row per run: overrides, final loss (mean of the last --last logged training
                rows), bits/dim and, per sampler and step count, the sample-quality metric; then
                every quality number, and the pictures below
  report.csv    the same, one row per run, all metrics (fd/kid/swd/fid per sampler:steps)
  quality.csv   one row per (run, sampler, steps): nfe, fd, kid, swd, fid, inception_kid
  loss.png      training-loss curves, one panel per setting of the other overrides, one colour
                per value of --group (default: the schedule)
  quality.png   --metric (fd, else swd) against network evaluations (NFE), same panels
  samples.png   each run's newest sample grid side by side, labelled
Runs without eval results (no `--mode eval` yet) leave those columns empty and skip quality.png.
Drawn with Pillow only.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

QUALITY_KEYS = ("fd", "kid", "swd", "fid", "inception_kid")
MISSING = "(default)"
PALETTE = (
  (31, 119, 180),
  (214, 39, 40),
  (44, 160, 44),
  (255, 127, 14),
  (148, 103, 189),
  (140, 86, 75),
  (227, 119, 194),
  (127, 127, 127),
  (188, 189, 34),
  (23, 190, 207),
)
DASHES = ((), (8, 5), (2, 4), (10, 4, 2, 4))


# ---- reading runs -----------------------------------------------------------------------------


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


def read_jsonl(path: str) -> list[dict]:
  """The rows of a JSON-lines file; lines cut by a kill are skipped."""
  rows = []
  if os.path.exists(path):
    with open(path) as fh:
      for line in fh:
        try:
          row = json.loads(line)
        except json.JSONDecodeError:
          continue
        if isinstance(row, dict):
          rows.append(row)
  return rows


def _eval_from_rows(rows: list[dict]) -> dict | None:
  """eval/metrics.json's shape from the newest step's `"mode": "eval"` rows of metrics.jsonl."""
  rows = [r for r in rows if r.get("mode") == "eval"]
  if not rows:
    return None
  step = max(r.get("step", 0) for r in rows)
  latest = {}
  for r in rows:
    if r.get("step", 0) == step:
      latest[(r.get("sampler"), r.get("num_steps"))] = r  # a rerun's rows replace older ones
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
  """Reads metrics.jsonl (training rows deduplicated by step, the newest kept, as a resumed run
  logs some steps twice), eval/metrics.json and the newest sample grid of one workdir."""
  rows = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  by_step = {}
  for r in rows:
    if r.get("mode", "train") == "train" and "step" in r and "loss" in r:
      by_step[int(r["step"])] = r
  ev = None
  path = os.path.join(workdir, "eval", "metrics.json")
  if os.path.exists(path):
    try:
      with open(path) as fh:
        ev = json.load(fh)
    except (OSError, json.JSONDecodeError):
      ev = None
  ev = ev or _eval_from_rows(rows)
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
    train=[by_step[s] for s in sorted(by_step)],
    eval=ev,
    samples=max(grids)[1] if grids else None,
  )


def load_sweep(path: str) -> tuple[str, list[RunData]]:
  """(title, runs) from a sweep folder with sweep.json, a manifest file, or a folder of workdirs."""
  manifest = path if path.endswith(".json") else os.path.join(path, "sweep.json")
  if os.path.isfile(manifest):
    with open(manifest) as fh:
      m = json.load(fh)
    base = os.path.dirname(os.path.abspath(manifest))
    runs = []
    for r in m["runs"]:
      # The manifest's workdirs may be relative to the repository; the folder next to it is sure.
      workdir = os.path.join(base, os.path.basename(os.path.normpath(r["workdir"])))
      runs.append(load_run(workdir, r["name"], r["overrides"], r["index"], r.get("num_steps")))
    return f"{m['name']} ({m['config']})", runs
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path} is neither a sweep folder, a sweep.json nor a folder.")
  dirs = sorted(
    d
    for d in glob.glob(os.path.join(path, "*"))
    if os.path.exists(os.path.join(d, "metrics.jsonl"))
  )
  if not dirs:
    raise FileNotFoundError(f"no sweep.json and no workdirs (with metrics.jsonl) in {path}.")
  return os.path.basename(os.path.normpath(path)), [
    load_run(d, index=i) for i, d in enumerate(dirs)
  ]


# ---- tables -----------------------------------------------------------------------------------


def _text(v: Any) -> str:
  if isinstance(v, Mapping):
    return ",".join(f"{k}={_text(x)}" for k, x in sorted(v.items())) or "{}"
  if isinstance(v, list | tuple):
    return "(" + ",".join(_text(x) for x in v) + ")"
  return str(v)


def varying_keys(runs: Sequence[RunData]) -> list[str]:
  """Override keys whose value is not the same in every run (sorted)."""
  keys = sorted({k for r in runs for k in r.overrides})
  return [k for k in keys if len({_text(r.overrides.get(k, MISSING)) for r in runs}) > 1]


def specs(runs: Sequence[RunData]) -> list[tuple[str, int]]:
  """Every (sampler, num_steps) any run was scored with, by sampler then steps."""
  found = {
    (q["sampler"], int(q["num_steps"]))
    for r in runs
    for q in r.quality()
    if q.get("sampler") is not None and q.get("num_steps") is not None
  }
  return sorted(found)


def _num(v: Any) -> float | None:
  return (
    float(v)
    if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    else None
  )


def rows(runs: Sequence[RunData], last: int = 5) -> tuple[list[str], list[dict]]:
  """(columns, one dict per run) of the wide table; absent values are None."""
  keys = varying_keys(runs)
  sp = specs(runs)
  has = {
    k: any(_num(q.get(k)) is not None for r in runs for q in r.quality()) for k in QUALITY_KEYS
  }
  quality_cols = [f"{k} {s}:{n}" for s, n in sp for k in QUALITY_KEYS if has[k]]
  cols = [
    "run",
    "index",
    "overrides",
    *keys,
    "step",
    "final_loss",
    "final_mse",
    "bpd",
    "floor_fd",
    "floor_kid",
    "floor_swd",
    *quality_cols,
  ]
  out = []
  for r in runs:
    ev = r.eval or {}
    floor = ev.get("floor") or {}
    row = {
      "run": r.name,
      "index": r.index,
      "overrides": "; ".join(f"{k}={_text(v)}" for k, v in sorted(r.overrides.items())),
      **{k: _text(r.overrides.get(k, MISSING)) for k in keys},
      "step": r.step,
      "final_loss": r.final("loss", last),
      "final_mse": r.final("mse", last),
      "bpd": _num(ev.get("bpd")),
      "floor_fd": _num(floor.get("fd")),
      "floor_kid": _num(floor.get("kid")),
      "floor_swd": _num(floor.get("swd")),
    }
    for q in r.quality():
      for k in QUALITY_KEYS:
        col = f"{k} {q.get('sampler')}:{q.get('num_steps')}"
        if col in quality_cols:
          row[col] = _num(q.get(k))
    out.append({c: row.get(c) for c in cols})
  return cols, out


def quality_rows(runs: Sequence[RunData]) -> list[dict]:
  """One row per (run, sampler, steps) with nfe and every quality metric."""
  out = []
  for r in runs:
    for q in sorted(r.quality(), key=lambda q: (str(q.get("sampler")), q.get("num_steps") or 0)):
      out.append(
        {
          "run": r.name,
          "sampler": q.get("sampler"),
          "num_steps": q.get("num_steps"),
          "nfe": q.get("nfe"),
          **{k: _num(q.get(k)) for k in QUALITY_KEYS},
        }
      )
  return out


def write_csv(path: str, cols: Sequence[str], data: Sequence[Mapping[str, Any]]) -> None:
  with open(path, "w", newline="") as fh:
    w = csv.DictWriter(fh, fieldnames=list(cols))
    w.writeheader()
    for row in data:
      w.writerow({c: "" if row.get(c) is None else row[c] for c in cols})


def _fmt(v: Any) -> str:
  if v is None:
    return ""
  if isinstance(v, float):
    return f"{v:.4g}"
  return str(v).replace("|", "\\|")


def _md_table(
  cols: Sequence[str],
  data: Sequence[Mapping[str, Any]],
  lower_better: Sequence[str],
  headers: Mapping[str, str] | None = None,
) -> str:
  """A markdown table; the best (lowest) value of each `lower_better` column in bold."""
  best = {}
  for c in lower_better:
    vals = [row[c] for row in data if isinstance(row.get(c), float)]
    if len(vals) > 1:
      best[c] = min(vals)
  head = [(headers or {}).get(c, c) for c in cols]
  lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in cols) + "|"]
  for row in data:
    cells = [
      f"**{_fmt(row.get(c))}**" if c in best and row.get(c) == best[c] else _fmt(row.get(c))
      for c in cols
    ]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def quality_metric(runs: Sequence[RunData], wanted: str = "fd") -> str | None:
  """`wanted` if any run has it, else the first of fd, swd, kid that one has; None without eval."""
  for k in (wanted, "fd", "swd", "kid"):
    if any(_num(q.get(k)) is not None for r in runs for q in r.quality()):
      return k
  return None


def markdown(
  title: str,
  runs: Sequence[RunData],
  cols: Sequence[str],
  data: Sequence[dict],
  metric: str | None,
  last: int,
  pictures: Sequence[str],
) -> str:
  group, _, panel_keys, _ = layout(runs)
  keys = varying_keys(runs)
  # The coloured key first, then the keys that follow it, then the panel keys.
  keys = (
    ([group] if group else [])
    + [k for k in keys if k != group and k not in panel_keys]
    + [k for k in keys if k in panel_keys]
  )
  sp = specs(runs)
  short = {k: k.rsplit(".", 1)[-1] for k in keys}
  main = ["index", *keys, "step", "final_loss", "bpd"]
  main += [f"{metric} {s}:{n}" for s, n in sp if f"{metric} {s}:{n}" in cols] if metric else []
  headers = {**short, "index": "#", "final_loss": f"loss (last {last})", "bpd": "bits/dim"}
  done = sum(1 for r in runs if r.num_steps is None or r.step == r.num_steps)
  parts = [
    f"# Sweep report: {title}",
    "",
    f"{len(runs)} runs, {done} trained to their last step; "
    f"{sum(1 for r in runs if r.quality())} with sample-quality results.",
    "",
    "Loss is each run's own training objective (its prediction target and weighting), so "
    "compare it only between runs that share those; bits/dim and the sample-quality "
    "metrics (lower is better, best in bold) compare across all runs.",
    "",
    _md_table(main, data, ["bpd", *main[len(keys) + 4 :]], headers),
  ]
  floors = [row for row in data if row.get("floor_fd") is not None]
  if floors:
    f = floors[0]
    parts += [
      "",
      f"Floor (held-out real images against the reference set): fd "
      f"{_fmt(f['floor_fd'])}, kid {_fmt(f['floor_kid'])}, swd {_fmt(f['floor_swd'])}.",
    ]
  q = quality_rows(runs)
  if q:
    qcols = [
      "run",
      "sampler",
      "num_steps",
      "nfe",
      *[k for k in QUALITY_KEYS if any(r.get(k) is not None for r in q)],
    ]
    parts += ["", "## Sample quality per sampler", "", _md_table(qcols, q, [])]
  else:
    parts += ["", "No eval results yet (run the sweep with --eval, or launch.py --mode eval)."]
  parts += ["", "## Pictures", ""] + [f"![{os.path.splitext(p)[0]}]({p})" for p in pictures]
  parts += ["", "## Runs", ""] + [f"- {r.index}: `{r.name}` ({r.workdir})" for r in runs]
  parts += ["", "Full numbers: report.csv (one row per run), quality.csv (one row per sampler)."]
  return "\n".join(parts) + "\n"


# ---- layout: panels by the other overrides, colours by the group key ---------------------------


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
  val = lambda r, k: _text(r.overrides.get(k, MISSING))
  values = list(dict.fromkeys(val(r, group) for r in runs)) if group else [""]
  panel_keys = []
  for k in keys:
    if k == group:
      continue
    follows = group is not None and all(
      len({val(r, k) for r in runs if val(r, group) == g}) == 1 for g in values
    )
    if not follows:
      panel_keys.append(k)
  panels: dict[str, list[RunData]] = {}
  for r in runs:
    title = ", ".join(f"{k.rsplit('.', 1)[-1]}={val(r, k)}" for k in panel_keys)
    panels.setdefault(title, []).append(r)
  return group, values, panel_keys, list(panels.items())


# ---- drawing (Pillow) ---------------------------------------------------------------------------


def font(size: int) -> ImageFont.ImageFont:
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow < 10.1: the fixed bitmap font
    return ImageFont.load_default()


def _ticks(lo: float, hi: float, log: bool, n: int = 5) -> list[float]:
  """Round tick values inside [lo, hi]: 1-2-5 steps, or powers of ten (and 2, 5) on log axes."""
  if log:
    ticks = []
    for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1):
      for m in (1, 2, 5):
        v = m * 10.0**e
        if lo * (1 - 1e-9) <= v <= hi * (1 + 1e-9):
          ticks.append(v)
    if len(ticks) > 2 * n:
      ticks = [t for t in ticks if abs(math.log10(t) - round(math.log10(t))) < 1e-9] or ticks
    if len(ticks) >= 3:
      return ticks
    return [t for t in _ticks(lo, hi, False, n) if t > 0]  # a narrow range: round linear ticks
  raw = (hi - lo) / max(n, 1)
  mag = 10.0 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
  step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
  start = math.ceil(lo / step - 1e-9) * step
  return [start + i * step for i in range(int((hi - start) / step + 1e-9) + 1)]


def _tick_label(v: float) -> str:
  return f"{v:.3g}" if 1e-3 <= abs(v) < 1e4 or v == 0 else f"{v:.0e}"


def _dashed(
  draw: ImageDraw.ImageDraw,
  pts: Sequence[tuple[float, float]],
  color,
  width: int,
  dash: Sequence[int],
) -> None:
  """A polyline, dashed with the on/off pattern `dash` (empty: solid)."""
  if len(pts) < 2:
    return
  if not dash:
    draw.line(pts, fill=color, width=width, joint="curve")
    return
  k, left, on = 0, dash[0], True
  for (x0, y0), (x1, y1) in zip(pts[:-1], pts[1:], strict=True):
    seg = math.hypot(x1 - x0, y1 - y0)
    pos = 0.0
    while pos < seg:
      d = min(left, seg - pos)
      if on:
        a, b = pos / seg, (pos + d) / seg
        draw.line(
          [(x0 + a * (x1 - x0), y0 + a * (y1 - y0)), (x0 + b * (x1 - x0), y0 + b * (y1 - y0))],
          fill=color,
          width=width,
        )
      pos += d
      left -= d
      if left <= 1e-9:
        k = (k + 1) % len(dash)
        left, on = dash[k], not on


@dataclass
class Axes:
  """One panel of a line chart on a PIL image: data limits, optional log axes, ticks, frame."""

  draw: ImageDraw.ImageDraw
  box: tuple[int, int, int, int]  # plot area (left, top, right, bottom) in pixels
  xlim: tuple[float, float]
  ylim: tuple[float, float]
  xlog: bool = False
  ylog: bool = False

  def _t(self, v: float, lim: tuple[float, float], log: bool) -> float:
    lo, hi = (math.log10(lim[0]), math.log10(lim[1])) if log else lim
    v = math.log10(v) if log else v
    return 0.5 if hi == lo else (v - lo) / (hi - lo)

  def xy(self, x: float, y: float) -> tuple[float, float]:
    """Pixel position of the data point (x, y)."""
    x0, y0, x1, y1 = self.box
    fx, fy = self._t(x, self.xlim, self.xlog), self._t(y, self.ylim, self.ylog)
    return x0 + fx * (x1 - x0), y1 - fy * (y1 - y0)

  def frame(self, title: str, xlabel: str, ylabel: str, f: ImageFont.ImageFont) -> None:
    d, (x0, y0, x1, y1) = self.draw, self.box
    for v in _ticks(*self.xlim, self.xlog):
      x, _ = self.xy(v, self.ylim[0])
      d.line([(x, y0), (x, y1)], fill=(232, 232, 232))
      d.line([(x, y1), (x, y1 + 4)], fill="black")
      d.text((x, y1 + 6), _tick_label(v), fill="black", font=f, anchor="mt")
    for v in _ticks(*self.ylim, self.ylog):
      _, y = self.xy(self.xlim[0], v)
      d.line([(x0, y), (x1, y)], fill=(232, 232, 232))
      d.line([(x0 - 4, y), (x0, y)], fill="black")
      d.text((x0 - 6, y), _tick_label(v), fill="black", font=f, anchor="rm")
    d.rectangle(self.box, outline="black")
    d.text(((x0 + x1) / 2, y0 - 6), title, fill="black", font=f, anchor="mb")
    d.text(((x0 + x1) / 2, y1 + 22), xlabel, fill="black", font=f, anchor="mt")
    d.text((x0 - 44, y0 - 6), ylabel, fill="black", font=f, anchor="lb")

  def line(
    self,
    xs: Sequence[float],
    ys: Sequence[float],
    color,
    *,
    width: int = 2,
    dash: Sequence[int] = (),
    marker: bool = False,
  ) -> None:
    pts = [self.xy(x, y) for x, y in zip(xs, ys, strict=True)]
    _dashed(self.draw, pts, color, width, dash)
    if marker:
      for x, y in pts:
        self.draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)


def _limits(vals: Sequence[float], log: bool) -> tuple[tuple[float, float], bool]:
  """Padded (lo, hi) of the values and whether a log axis is possible (all > 0)."""
  log = log and min(vals) > 0
  lo, hi = min(vals), max(vals)
  if log:
    if hi / lo < 1.0001:
      lo, hi = lo / 1.5, hi * 1.5
    return (lo / 1.08, hi * 1.08), True
  if hi - lo < 1e-12:
    lo, hi = lo - (abs(lo) or 1) * 0.5, hi + (abs(hi) or 1) * 0.5
  pad = 0.05 * (hi - lo)
  return (lo - pad, hi + pad), False


def _grid_shape(n: int) -> tuple[int, int]:
  cols = min(n, 2 if n <= 4 else 3 if n <= 9 else 4)
  return int(math.ceil(n / cols)), cols


def _legend(
  draw: ImageDraw.ImageDraw,
  x: int,
  y: int,
  entries: Sequence[tuple[str, Any, Any]],
  f: ImageFont.ImageFont,
  title: str = "",
) -> int:
  """Entries (label, colour, dash) from (x, y) down; returns the y below the last."""
  if title:
    draw.text((x, y), title, fill="black", font=f)
    y += 18
  for label, color, dash in entries:
    _dashed(draw, [(x, y + 7), (x + 30, y + 7)], color, 3, dash)
    draw.text((x + 38, y), label, fill="black", font=f)
    y += 18
  return y


def _chart(
  panels: Sequence[tuple[str, list]],
  series,
  *,
  xlabel: str,
  ylabel: str,
  xlog: bool,
  ylog: bool,
  legend: Sequence[tuple[str, Any, Any]],
  legend2=(),
  legend_title: str = "",
  legend2_title: str = "",
  heading: str = "",
) -> Image.Image:
  """Small multiples: `series(panel_runs)` -> [(xs, ys, colour, dash)] per panel, shared legend."""
  f, fb = font(12), font(15)
  rows_, cols = _grid_shape(len(panels))
  pw, ph, left, top, gap = 380, 270, 70, 50, 60
  width_legend = 40 + 8 * max(
    [len(s) for s, _, _ in [*legend, *legend2]] + [len(legend_title), len(legend2_title)]
  )
  width = left + cols * (pw + gap) + width_legend
  height = top + rows_ * (ph + 70) + 10
  img = Image.new("RGB", (width, height), "white")
  d = ImageDraw.Draw(img)
  d.text((10, 8), heading, fill="black", font=fb)
  for i, (title, runs) in enumerate(panels):
    r_, c_ = divmod(i, cols)
    box = (left + c_ * (pw + gap), top + 20 + r_ * (ph + 70))
    box = (*box, box[0] + pw, box[1] + ph)
    lines = []
    for xs, ys, color, dash in series(runs):  # NaN / inf points (a diverged run) are left out
      pts = [
        (x, y) for x, y in zip(xs, ys, strict=True) if _num(x) is not None and _num(y) is not None
      ]
      if pts:
        lines.append(([x for x, _ in pts], [y for _, y in pts], color, dash))
    if not lines:
      d.rectangle(box, outline=(180, 180, 180))
      d.text(
        ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), "no data", fill="gray", font=f, anchor="mm"
      )
      continue
    (xl, xlog_), (yl, ylog_) = (
      _limits([x for s in lines for x in s[0]], xlog),
      _limits([y for s in lines for y in s[1]], ylog),
    )
    ax = Axes(d, box, xl, yl, xlog_, ylog_)
    ax.frame(title, xlabel, ylabel, f)
    for xs, ys, color, dash in lines:
      ax.line(xs, ys, color, dash=dash, marker=len(xs) <= 12)
  lx = left + cols * (pw + gap) - 20
  y = _legend(d, lx, top + 20, legend, f, legend_title)
  if legend2:
    _legend(d, lx, y + 12, legend2, f, legend2_title)
  return img


def loss_plot(runs: Sequence[RunData], group: str | None = None) -> Image.Image:
  """Training loss against step: a panel per setting of the other overrides, a colour per group."""
  key, values, _, panels = layout(runs, group)
  color = {v: PALETTE[i % len(PALETTE)] for i, v in enumerate(values)}
  gv = lambda r: _text(r.overrides.get(key, MISSING)) if key else ""

  def series(prs):
    return [
      ([t["step"] for t in r.train], [t["loss"] for t in r.train], color[gv(r)], ())
      for r in prs
      if r.train
    ]

  legend = [(v or "run", color[v], ()) for v in values]
  return _chart(
    panels,
    series,
    xlabel="step",
    ylabel="loss",
    xlog=False,
    ylog=True,
    legend=legend,
    legend_title=key.rsplit(".", 1)[-1] if key else "",
    heading="Training loss (each run's own objective)",
  )


def quality_plot(runs: Sequence[RunData], metric: str, group: str | None = None) -> Image.Image:
  """`metric` against NFE per sampler (line style) and group value (colour), panels as loss_plot."""
  key, values, _, panels = layout(runs, group)
  color = {v: PALETTE[i % len(PALETTE)] for i, v in enumerate(values)}
  samplers = sorted({str(q.get("sampler")) for r in runs for q in r.quality()})
  dash = {s: DASHES[i % len(DASHES)] for i, s in enumerate(samplers)}
  gv = lambda r: _text(r.overrides.get(key, MISSING)) if key else ""

  def series(prs):
    out = []
    for r in prs:
      for s in samplers:
        pts = sorted(
          (q.get("nfe") or q.get("num_steps"), _num(q.get(metric)))
          for q in r.quality()
          if str(q.get("sampler")) == s
        )
        pts = [(x, y) for x, y in pts if x and y is not None]
        if pts:
          out.append(([x for x, _ in pts], [y for _, y in pts], color[gv(r)], dash[s]))
    return out

  return _chart(
    panels,
    series,
    xlabel="network evaluations (NFE)",
    ylabel=metric,
    xlog=True,
    ylog=False,
    legend=[(v or "run", color[v], ()) for v in values],
    legend2=[(s, (60, 60, 60), dash[s]) for s in samplers],
    legend_title=key.rsplit(".", 1)[-1] if key else "",
    legend2_title="sampler",
    heading=f"Sample quality ({metric}, lower is better) against sampling cost",
  )


def samples_plot(runs: Sequence[RunData], group: str | None = None, cell: int = 200) -> Image.Image:
  """Each run's newest sample grid: a row per panel setting, a column per group value."""
  key, values, _, panels = layout(runs, group)
  f, fb = font(13), font(15)
  head_w, head_h = 200 if any(t for t, _ in panels) else 10, 40
  width = head_w + len(values) * (cell + 12) + 10
  height = head_h + 30 + len(panels) * (cell + 30)
  img = Image.new("RGB", (width, height), "white")
  d = ImageDraw.Draw(img)
  d.text((10, 8), "Newest sample grid of each run", fill="black", font=fb)
  for j, v in enumerate(values):
    x = head_w + j * (cell + 12) + cell / 2
    label = v if len(v) <= 28 else v[:27] + "…"
    d.text((x, head_h + 22), label or "run", fill="black", font=f, anchor="mb")
  for i, (title, prs) in enumerate(panels):
    y = head_h + 30 + i * (cell + 30)
    for n, line in enumerate(title.split(", ")):
      d.text((10, y + cell / 2 - 10 + 16 * n), line, fill="black", font=f)
    for r in prs:
      j = values.index(_text(r.overrides.get(key, MISSING)) if key else "")
      x = head_w + j * (cell + 12)
      if r.samples:
        with Image.open(r.samples) as im:
          tile = im.convert("RGB")
        scale = cell / max(tile.size)
        tile = tile.resize(
          (max(1, round(tile.width * scale)), max(1, round(tile.height * scale))), Image.NEAREST
        )
        img.paste(tile, (x, y))
        step = re.search(r"step_(\d+)", os.path.basename(r.samples))
        d.text(
          (x + cell / 2, y + cell + 4),
          f"step {step.group(1) if step else '?'}",
          fill=(90, 90, 90),
          font=f,
          anchor="mt",
        )
      else:
        d.rectangle([x, y, x + cell, y + cell], fill=(235, 235, 235), outline=(180, 180, 180))
        d.text((x + cell / 2, y + cell / 2), "no samples", fill="gray", font=f, anchor="mm")
  return img


# ---- entry point ------------------------------------------------------------------------------


def build(
  path: str, out: str | None = None, *, last: int = 5, metric: str = "fd", group: str | None = None
) -> dict[str, str]:
  """Writes the report of the sweep at `path` into `out` (default <path>/report); returns the
  written files by name."""
  title, runs = load_sweep(path)
  base = path if os.path.isdir(path) else os.path.dirname(path)
  out = out or os.path.join(base, "report")
  os.makedirs(out, exist_ok=True)
  cols, data = rows(runs, last)
  files = {
    "report.csv": os.path.join(out, "report.csv"),
    "quality.csv": os.path.join(out, "quality.csv"),
  }
  write_csv(files["report.csv"], cols, data)
  write_csv(
    files["quality.csv"], ["run", "sampler", "num_steps", "nfe", *QUALITY_KEYS], quality_rows(runs)
  )
  pictures = []
  if any(r.train for r in runs):
    loss_plot(runs, group).save(os.path.join(out, "loss.png"))
    pictures.append("loss.png")
  m = quality_metric(runs, metric)
  if m:
    quality_plot(runs, m, group).save(os.path.join(out, "quality.png"))
    pictures.append("quality.png")
  if any(r.samples for r in runs):
    samples_plot(runs, group).save(os.path.join(out, "samples.png"))
    pictures.append("samples.png")
  for p in pictures:
    files[p] = os.path.join(out, p)
  files["report.md"] = os.path.join(out, "report.md")
  with open(files["report.md"], "w") as fh:
    fh.write(markdown(title, runs, cols, data, m, last, pictures))
  return files


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(
    prog="python -m experiments.report", description=__doc__.split("\n")[0]
  )
  p.add_argument(
    "sweep", help="sweep folder (with sweep.json), a sweep.json, or a folder of workdirs"
  )
  p.add_argument("--out", help="output folder (default <sweep>/report)")
  p.add_argument("--last", type=int, default=5, help="training rows averaged for the final loss")
  p.add_argument(
    "--metric", default="fd", help="quality metric to plot and tabulate (fd|kid|swd|fid)"
  )
  p.add_argument("--group", help="override key coloured in the plots (default diffusion.schedule)")
  args = p.parse_args(argv)
  files = build(args.sweep, args.out, last=args.last, metric=args.metric, group=args.group)
  for name, path in files.items():
    print(f"{name}: {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
