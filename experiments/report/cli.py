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
Drawn with Pillow only (diffusion/plots.py); imports no JAX.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from experiments.report import figures, tables
from experiments.report.runs import QUALITY_KEYS, load_sweep, quality_metric


def build(
  path: str, out: str | None = None, *, last: int = 5, metric: str = "fd", group: str | None = None
) -> dict[str, str]:
  """Writes the report of the sweep at `path` into `out` (default <path>/report); returns the
  written files by name."""
  title, runs = load_sweep(path)
  out = out or os.path.join(path if os.path.isdir(path) else os.path.dirname(path), "report")
  os.makedirs(out, exist_ok=True)
  files = {name: os.path.join(out, name) for name in ("report.csv", "quality.csv")}
  cols, data = tables.rows(runs, last)
  tables.write_csv(files["report.csv"], cols, data)
  tables.write_csv(
    files["quality.csv"],
    ["run", "sampler", "num_steps", "nfe", *QUALITY_KEYS],
    tables.quality_rows(runs),
  )
  m = quality_metric(runs, metric)
  drawn = {
    "loss.png": (any(r.train for r in runs), lambda: figures.loss_plot(runs, group)),
    "quality.png": (m is not None, lambda: figures.quality_plot(runs, m, group)),
    "samples.png": (any(r.samples for r in runs), lambda: figures.samples_plot(runs, group)),
  }
  pictures = [name for name, (wanted, _) in drawn.items() if wanted]
  for name in pictures:
    files[name] = os.path.join(out, name)
    drawn[name][1]().save(files[name])
  files["report.md"] = os.path.join(out, "report.md")
  with open(files["report.md"], "w") as fh:
    fh.write(tables.markdown(title, runs, cols, data, m, last, pictures))
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
