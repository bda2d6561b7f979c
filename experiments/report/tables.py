"""The report's tables: one wide row per run (CSV and markdown), one row per (run, sampler,
steps), and report.md around them."""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from typing import Any

from experiments.report.runs import QUALITY_KEYS, RunData, layout, number, specs, text, varying_keys


def rows(runs: Sequence[RunData], last: int = 5) -> tuple[list[str], list[dict]]:
  """(columns, one dict per run) of the wide table; absent values are None."""
  keys = varying_keys(runs)
  has = {
    k: any(number(q.get(k)) is not None for r in runs for q in r.quality()) for k in QUALITY_KEYS
  }
  quality_cols = [f"{k} {s}:{n}" for s, n in specs(runs) for k in QUALITY_KEYS if has[k]]
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
      "overrides": "; ".join(f"{k}={text(v)}" for k, v in sorted(r.overrides.items())),
      **{k: r.value(k) for k in keys},
      "step": r.step,
      "final_loss": r.final("loss", last),
      "final_mse": r.final("mse", last),
      "bpd": number(ev.get("bpd")),
      **{f"floor_{k}": number(floor.get(k)) for k in ("fd", "kid", "swd")},
    }
    for q in r.quality():
      for k in QUALITY_KEYS:
        row[f"{k} {q.get('sampler')}:{q.get('num_steps')}"] = number(q.get(k))
    out.append({c: row.get(c) for c in cols})
  return cols, out


def quality_rows(runs: Sequence[RunData]) -> list[dict]:
  """One row per (run, sampler, steps) with nfe and every quality metric."""
  return [
    {
      "run": r.name,
      "sampler": q.get("sampler"),
      "num_steps": q.get("num_steps"),
      "nfe": q.get("nfe"),
      **{k: number(q.get(k)) for k in QUALITY_KEYS},
    }
    for r in runs
    for q in sorted(r.quality(), key=lambda q: (str(q.get("sampler")), q.get("num_steps") or 0))
  ]


def write_csv(path: str, cols: Sequence[str], data: Sequence[Mapping[str, Any]]) -> None:
  """A CSV file with `cols` as header; None is an empty cell."""
  with open(path, "w", newline="") as fh:
    w = csv.DictWriter(fh, fieldnames=list(cols))
    w.writeheader()
    for row in data:
      w.writerow({c: "" if row.get(c) is None else row[c] for c in cols})


def _cell(v: Any) -> str:
  if v is None:
    return ""
  return f"{v:.4g}" if isinstance(v, float) else str(v).replace("|", "\\|")


def md_table(
  cols: Sequence[str],
  data: Sequence[Mapping[str, Any]],
  lower_better: Sequence[str] = (),
  headers: Mapping[str, str] | None = None,
) -> str:
  """A markdown table; the best (lowest) value of each `lower_better` column in bold."""
  best = {}
  for c in lower_better:
    vals = [row[c] for row in data if isinstance(row.get(c), float)]
    if len(vals) > 1:
      best[c] = min(vals)
  lines = [
    "| " + " | ".join((headers or {}).get(c, c) for c in cols) + " |",
    "|" + "|".join("---" for _ in cols) + "|",
  ]
  for row in data:
    cells = [
      f"**{_cell(row.get(c))}**" if c in best and row.get(c) == best[c] else _cell(row.get(c))
      for c in cols
    ]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def markdown(
  title: str,
  runs: Sequence[RunData],
  cols: Sequence[str],
  data: Sequence[dict],
  metric: str | None,
  last: int,
  pictures: Sequence[str],
) -> str:
  """report.md: the main table (the coloured key first, then the keys that follow it, then the
  panel keys), the floor, every quality number, the pictures and the runs."""
  group, _, panel_keys, _ = layout(runs)
  keys = varying_keys(runs)
  keys = (
    ([group] if group else [])
    + [k for k in keys if k != group and k not in panel_keys]
    + [k for k in keys if k in panel_keys]
  )
  main = ["index", *keys, "step", "final_loss", "bpd"]
  if metric:
    main += [f"{metric} {s}:{n}" for s, n in specs(runs) if f"{metric} {s}:{n}" in cols]
  headers = {
    **{k: k.rsplit(".", 1)[-1] for k in keys},
    "index": "#",
    "final_loss": f"loss (last {last})",
    "bpd": "bits/dim",
  }
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
    md_table(main, data, ["bpd", *main[len(keys) + 4 :]], headers),
  ]
  floors = [row for row in data if row.get("floor_fd") is not None]
  if floors:
    f = floors[0]
    parts += [
      "",
      f"Floor (held-out real images against the reference set): fd "
      f"{_cell(f['floor_fd'])}, kid {_cell(f['floor_kid'])}, swd {_cell(f['floor_swd'])}.",
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
    parts += ["", "## Sample quality per sampler", "", md_table(qcols, q)]
  else:
    parts += ["", "No eval results yet (run the sweep with --eval, or launch.py --mode eval)."]
  parts += ["", "## Pictures", ""] + [f"![{os.path.splitext(p)[0]}]({p})" for p in pictures]
  parts += ["", "## Runs", ""] + [f"- {r.index}: `{r.name}` ({r.workdir})" for r in runs]
  parts += ["", "Full numbers: report.csv (one row per run), quality.csv (one row per sampler)."]
  return "\n".join(parts) + "\n"
