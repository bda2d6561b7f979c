"""experiments/report/runs.py and tables.py on RunData built in memory: the chart layout, which
overrides vary, the wide table, markdown bolding. (Reports from fabricated workdirs are in
test_experiments.py.)"""

from __future__ import annotations

import math

from configs.common import product
from experiments import report


def _runs() -> list[report.RunData]:
  overrides = product(
    [
      {"diffusion.schedule": "cosine"},
      {"diffusion.schedule": "shifted", "diffusion.schedule_params": {"image_size": 16}},
    ],
    {"diffusion.prediction": ["eps", "v"]},
  )
  return [
    report.RunData(name=str(i), workdir="", overrides=o, index=i) for i, o in enumerate(overrides)
  ]


def test_layout_panels_follow_the_other_overrides():
  runs = _runs()
  key, values, panel_keys, panels = report.layout(runs)
  assert key == "diffusion.schedule" and values == ["cosine", "shifted"]
  assert panel_keys == ["diffusion.prediction"]  # schedule_params follows the schedule
  assert [t for t, _ in panels] == ["prediction=eps", "prediction=v"]
  assert [[r.index for r in prs] for _, prs in panels] == [[0, 2], [1, 3]]
  # Colour by prediction instead: the schedule and its parameters make the panels.
  key, values, panel_keys, panels = report.layout(runs, "diffusion.prediction")
  assert values == ["eps", "v"] and len(panels) == 2
  assert panel_keys == ["diffusion.schedule", "diffusion.schedule_params"]
  assert panels[1][0] == "schedule=shifted, schedule_params=image_size=16"


def test_wide_table_and_markdown_bold_the_best():
  runs = _runs()
  for r, loss in zip(runs, (0.4, 0.3, 0.2, float("nan")), strict=True):
    r.train = [{"step": s, "loss": loss * 10 / s, "mse": 1.0} for s in (10, 20)]
    r.eval = {
      "bpd": 4.0 + r.index,
      "results": [{"sampler": "ddim", "num_steps": 5, "nfe": 5, "fd": 10.0 - r.index, "kid": None}],
    }
  cols, data = report.rows(runs, last=2)
  assert report.varying_keys(runs) == [
    "diffusion.prediction",
    "diffusion.schedule",
    "diffusion.schedule_params",
  ]
  assert "fd ddim:5" in cols and "kid ddim:5" not in cols  # no column without a value
  assert data[0]["final_loss"] == (0.4 + 0.2) / 2 and data[0]["step"] == 20
  assert math.isnan(data[3]["final_loss"])  # a diverged run stays visible
  assert data[0]["diffusion.schedule_params"] == "(default)"
  md = report.md_table(["run", "bpd"], data, ["bpd"])
  assert "| 0 | **4** |" in md and "| 3 | 7 |" in md
  text = report.markdown("t", runs, cols, data, "fd", 2, ["loss.png"])
  assert "| # | schedule | schedule_params | prediction |" in text
  assert "**7**" in text and "![loss](loss.png)" in text  # fd 7 of run 3 is the best
