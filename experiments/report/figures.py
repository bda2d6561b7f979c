"""The report's pictures: loss curves and quality against NFE (diffusion/plots.py's small
multiples), and the runs' newest sample grids side by side. All share `runs.layout`: a colour
(or column) per value of the group key, a panel (or row) per setting of the other overrides."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from PIL import Image, ImageDraw

from diffusion import plots
from experiments.report.runs import RunData, layout, number


def _colours(runs: Sequence[RunData], group: str | None):
  key, values, _, panels = layout(runs, group)
  colour = {v: plots.COLORS[i % len(plots.COLORS)] for i, v in enumerate(values)}
  title = key.rsplit(".", 1)[-1] if key else ""
  return key, colour, panels, (title, [(v or "run", colour[v], ()) for v in values])


def loss_plot(runs: Sequence[RunData], group: str | None = None) -> Image.Image:
  """Training loss against step: a panel per setting of the other overrides, a colour per group."""
  key, colour, panels, legend = _colours(runs, group)
  lines = [
    (
      title,
      [
        plots.Line([t["step"] for t in r.train], [t["loss"] for t in r.train], colour[r.value(key)])
        for r in prs
        if r.train
      ],
    )
    for title, prs in panels
  ]
  return plots.small_multiples(
    lines,
    xlabel="step",
    ylabel="loss",
    ylog=True,
    legends=[legend],
    heading="Training loss (each run's own objective)",
  )


def quality_plot(runs: Sequence[RunData], metric: str, group: str | None = None) -> Image.Image:
  """`metric` against NFE per sampler (line style) and group value (colour), panels as loss_plot."""
  key, colour, panels, legend = _colours(runs, group)
  samplers = sorted({str(q.get("sampler")) for r in runs for q in r.quality()})
  dash = {s: plots.DASHES[i % len(plots.DASHES)] for i, s in enumerate(samplers)}

  def lines(r: RunData) -> list[plots.Line]:
    out = []
    for s in samplers:
      pts = sorted(
        (q.get("nfe") or q.get("num_steps"), number(q.get(metric)))
        for q in r.quality()
        if str(q.get("sampler")) == s
      )
      pts = [(x, y) for x, y in pts if x and y is not None]
      if pts:
        out.append(
          plots.Line([x for x, _ in pts], [y for _, y in pts], colour[r.value(key)], dash[s])
        )
    return out

  return plots.small_multiples(
    [(title, [ln for r in prs for ln in lines(r)]) for title, prs in panels],
    xlabel="network evaluations (NFE)",
    ylabel=metric,
    xlog=True,
    legends=[legend, ("sampler", [(s, (60, 60, 60), dash[s]) for s in samplers])],
    heading=f"Sample quality ({metric}, lower is better) against sampling cost",
  )


def samples_plot(runs: Sequence[RunData], group: str | None = None, cell: int = 200) -> Image.Image:
  """Each run's newest sample grid: a row per panel setting, a column per group value."""
  key, values, _, panels = layout(runs, group)
  f = plots.font(13)
  head_w, head_h = 200 if any(t for t, _ in panels) else 10, 40
  img = Image.new(
    "RGB",
    (head_w + len(values) * (cell + 12) + 10, head_h + 30 + len(panels) * (cell + 30)),
    "white",
  )
  d = ImageDraw.Draw(img)
  d.text((10, 8), "Newest sample grid of each run", fill="black", font=plots.font(15))
  for j, v in enumerate(values):
    label = v if len(v) <= 28 else v[:27] + "…"
    d.text(
      (head_w + j * (cell + 12) + cell / 2, head_h + 22),
      label or "run",
      fill="black",
      font=f,
      anchor="mb",
    )
  for i, (title, prs) in enumerate(panels):
    y = head_h + 30 + i * (cell + 30)
    for n, line in enumerate(title.split(", ")):
      d.text((10, y + cell / 2 - 10 + 16 * n), line, fill="black", font=f)
    for r in prs:
      x = head_w + values.index(r.value(key)) * (cell + 12)
      if not r.samples:
        d.rectangle([x, y, x + cell, y + cell], fill=(235, 235, 235), outline=(180, 180, 180))
        d.text((x + cell / 2, y + cell / 2), "no samples", fill="gray", font=f, anchor="mm")
        continue
      with Image.open(r.samples) as im:
        tile = im.convert("RGB")
      scale = cell / max(tile.size)
      img.paste(
        tile.resize(
          (max(1, round(tile.width * scale)), max(1, round(tile.height * scale))), Image.NEAREST
        ),
        (x, y),
      )
      step = re.search(r"step_(\d+)", os.path.basename(r.samples))
      d.text(
        (x + cell / 2, y + cell + 4),
        f"step {step.group(1) if step else '?'}",
        fill=(90, 90, 90),
        font=f,
        anchor="mt",
      )
  return img
