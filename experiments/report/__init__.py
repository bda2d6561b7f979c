"""Report of a sweep: tables (markdown, CSV) and plots (PNG) of its runs, from their workdirs
(`python -m experiments.report DIR`; see cli.py).

  runs.py     RunData, load_run / load_sweep (metrics through diffusion.runlog), varying keys,
              the chart layout (colour per group value, panel per other setting)
  tables.py   the wide table, the quality table, CSV and markdown, report.md
  figures.py  loss.png, quality.png (diffusion/plots.py), samples.png
  cli.py      build(path) and the command line
"""

from experiments.report.cli import build, main
from experiments.report.figures import loss_plot, quality_plot, samples_plot
from experiments.report.runs import (
  QUALITY_KEYS,
  RunData,
  layout,
  load_run,
  load_sweep,
  quality_metric,
  specs,
  varying_keys,
)
from experiments.report.tables import markdown, md_table, quality_rows, rows, write_csv

__all__ = [
  "QUALITY_KEYS",
  "RunData",
  "build",
  "layout",
  "load_run",
  "load_sweep",
  "loss_plot",
  "main",
  "markdown",
  "md_table",
  "quality_metric",
  "quality_plot",
  "quality_rows",
  "rows",
  "samples_plot",
  "specs",
  "varying_keys",
  "write_csv",
]
