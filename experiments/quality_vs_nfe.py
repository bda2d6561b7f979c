"""FD and SWD against network evaluations for several runs' heldout evals, in one plot and table.

Run:  python experiments/quality_vs_nfe.py --out docs/few_step_quality.png \
        "MeanFlow=runs/mf/eval/metrics.json" "DPM-Solver++=runs/sprites/eval/metrics.json"
Each argument is LABEL=PATH of an `--mode eval` metrics.json (heldout protocol); a PATH may list
several files joined by ",". Prints a markdown table (label, sampler, NFE, FD, SWD) with the
held-out floor, and writes the FD and SWD panels side by side (one line per label).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from diffusion import plots  # noqa: E402


def load(spec: str) -> tuple[str, list[dict], dict]:
  """LABEL=PATH[,PATH...] -> (label, results sorted by NFE, the floor)."""
  label, _, paths = spec.partition("=")
  results, floor = [], {}
  for path in paths.split(","):
    with open(path) as f:
      m = json.load(f)
    results += m["results"]
    floor = m["floor"]
  return label, sorted(results, key=lambda r: r["nfe"]), floor


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("runs", nargs="+", help="LABEL=metrics.json[,metrics.json...]")
  parser.add_argument("--out", default="", help="PNG to write (FD and SWD panels)")
  args = parser.parse_args()
  runs = [load(s) for s in args.runs]
  floor = runs[0][2]
  print("| run | sampler | NFE | FD | SWD |\n|---|---|---|---|---|")
  for label, results, _ in runs:
    for r in results:
      print(
        f"| {label} | {r['sampler']}:{r['num_steps']} | {r['nfe']} | {r['fd']:.2f} | "
        f"{r['swd']:.1f} |"
      )
  print(f"| held-out floor | | | {floor['fd']:.2f} | {floor['swd']:.1f} |")
  if args.out:
    panels = []
    for metric in ("fd", "swd"):
      series = {
        label: ([r["nfe"] for r in res], [r[metric] for r in res]) for label, res, _ in runs
      }
      nfes = [n for xs, _ in series.values() for n in xs]
      series["held-out floor"] = ((min(nfes), max(nfes)), (floor[metric], floor[metric]))
      panels.append(
        plots.line_plot(
          series,
          title=f"{metric.upper()} vs NFE",
          xlabel="NFE",
          ylabel=metric,
          logx=True,
          logy=metric == "fd",
          markers=True,
        )
      )
    Image.fromarray(np.concatenate(panels, axis=1)).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
