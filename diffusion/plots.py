"""The one chart kit: line charts drawn with Pillow (no plotting library, no JAX).

Used by the pictures mode through diffusion/visualize.py (schedules, the loss curve, quality
against NFE) and by experiments/report (small multiples of a sweep's runs). Inputs are floats or
NumPy arrays; charts come back as uint8 (H, W, 3) arrays (`line_plot` and its users) or PIL
images (`small_multiples`). Non-finite points break a line; a log axis needs positive values
(it falls back to a linear one otherwise).

    ax = Axes(image, box=(60, 30, 440, 300), xlim=(1, 1000), ylim=(0.1, 2), xlog=True)
    ax.frame("title", "x", "y", font(12)); ax.line(xs, ys, COLORS[0], dash=DASHES[1])
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLORS = (
  (31, 119, 180),
  (255, 127, 14),
  (44, 160, 44),
  (214, 39, 40),
  (148, 103, 189),
  (140, 86, 75),
  (227, 119, 194),
  (127, 127, 127),
  (188, 189, 34),
  (23, 190, 207),
)
DASHES = ((), (8, 5), (2, 4), (10, 4, 2, 4))  # on/off pixel patterns; () is solid
GRID = (232, 232, 232)
Color = tuple[int, int, int] | str


class Line(NamedTuple):
  """One series of a chart: points (xs[i], ys[i]), drawn in `color` with the `dash` pattern."""

  xs: Sequence[float]
  ys: Sequence[float]
  color: Color
  dash: Sequence[int] = ()
  width: int = 2
  marker: bool = False  # a dot at every point


def font(size: int) -> ImageFont.ImageFont:
  """Pillow's built-in font at `size` px (FreeType), or its bitmap font without FreeType."""
  try:
    return ImageFont.load_default(size=size)
  except (TypeError, OSError, ImportError):  # Pillow < 10.1, or no FreeType
    return ImageFont.load_default()


def ticks(lo: float, hi: float, *, log: bool = False, n: int = 5) -> list[float]:
  """Round tick values inside [lo, hi]: 1-2-5 steps, or on a log axis 1, 2, 5 x 10^k (powers of
  ten alone over many decades, round linear ticks over a narrow range)."""
  if log:
    out = [
      m * 10.0**e
      for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
      for m in (1, 2, 5)
    ]
    out = [v for v in out if lo * (1 - 1e-9) <= v <= hi * (1 + 1e-9)]
    if len(out) > 2 * n:
      out = [v for v in out if abs(math.log10(v) - round(math.log10(v))) < 1e-9] or out
    return out if len(out) >= 3 else [v for v in ticks(lo, hi, n=n) if v > 0]
  raw = (hi - lo) / max(n, 1)
  mag = 10.0 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
  step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
  first, last = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
  return [float(f"{k * step:.12g}") for k in range(first, last + 1)]


def tick_label(v: float) -> str:
  """Short tick label: 0.05, 2.5, 300, 2k, 1.5M, 1e-05."""
  a = abs(v)
  if a >= 1e6:
    return f"{v / 1e6:g}M"
  if a >= 1e3 and v % 100 == 0:
    return f"{v / 1e3:g}k"
  return f"{v:.3g}" if a == 0 or a >= 1e-3 else f"{v:.0e}"


def limits(
  values: Sequence[float], *, log: bool = False, pad: float = 0.04
) -> tuple[tuple[float, float], bool]:
  """(lo, hi) around the finite values, padded by `pad` of the range (a factor on a log axis),
  and whether the axis is logarithmic: `log` asked and every value > 0."""
  v = np.asarray(values, np.float64)
  v = v[np.isfinite(v)]
  if not v.size:
    raise ValueError("no finite values to set axis limits from.")
  lo, hi = float(v.min()), float(v.max())
  if log and lo > 0:
    if hi / lo < 1.0001:
      lo, hi = lo / 1.5, hi * 1.5
    f = (hi / lo) ** pad
    return (lo / f, hi * f), True
  if hi - lo < 1e-12:
    lo, hi = lo - (abs(lo) or 1) * 0.5, hi + (abs(hi) or 1) * 0.5
  return (lo - pad * (hi - lo), hi + pad * (hi - lo)), False


def dashed(
  draw: ImageDraw.ImageDraw,
  pts: Sequence[tuple[float, float]],
  color: Color,
  width: int = 2,
  dash: Sequence[int] = (),
) -> None:
  """A polyline through pixel points, dashed with the on/off pattern `dash` (empty: solid)."""
  if len(pts) < 2:
    return
  if not dash:
    draw.line(list(pts), fill=color, width=width, joint="curve")
    return
  k, left, on = 0, dash[0], True
  for (x0, y0), (x1, y1) in zip(pts[:-1], pts[1:], strict=True):
    seg, pos = math.hypot(x1 - x0, y1 - y0), 0.0
    while pos < seg:
      d = min(left, seg - pos)
      if on:
        a, b = pos / seg, (pos + d) / seg
        draw.line(
          [(x0 + a * (x1 - x0), y0 + a * (y1 - y0)), (x0 + b * (x1 - x0), y0 + b * (y1 - y0))],
          fill=color,
          width=width,
        )
      pos, left = pos + d, left - d
      if left <= 1e-9:
        k = (k + 1) % len(dash)
        left, on = dash[k], not on


def legend(
  draw: ImageDraw.ImageDraw,
  x: float,
  y: float,
  entries: Sequence[tuple[str, Color, Sequence[int]]],
  f: ImageFont.ImageFont,
  *,
  title: str = "",
  framed: bool = False,
  right: bool = False,
) -> float:
  """Entries (label, colour, dash) listed from (x, y) down (from the top right corner at x when
  `right`), on a white framed box when `framed`; returns the y below the last entry."""
  width = 32 + max(
    [int(draw.textlength(s, font=f)) for s, _, _ in entries]
    + [int(draw.textlength(title, font=f)) - 32]
  )
  x = x - width - 8 if right else x
  if framed:
    rows = len(entries) + bool(title)
    draw.rectangle(
      [x - 4, y - 2, x + width + 4, y + 16 * rows + 2], fill="white", outline=(180, 180, 180)
    )
  if title:
    draw.text((x, y), title, fill="black", font=f)
    y += 16
  for label, color, dash in entries:
    dashed(draw, [(x, y + 7), (x + 24, y + 7)], color, 3, dash)
    draw.text((x + 30, y), label, fill="black", font=f)
    y += 16
  return y


@dataclasses.dataclass
class Axes:
  """One panel of a line chart on a PIL image: data limits, optional log axes, ticks, frame."""

  image: Image.Image
  box: tuple[float, float, float, float]  # plot area (left, top, right, bottom) in pixels
  xlim: tuple[float, float]
  ylim: tuple[float, float]
  xlog: bool = False
  ylog: bool = False

  def __post_init__(self):
    self.draw = ImageDraw.Draw(self.image)

  @staticmethod
  def _frac(v: float, lim: tuple[float, float], log: bool) -> float:
    lo, hi = (math.log10(lim[0]), math.log10(lim[1])) if log else lim
    v = math.log10(v) if log else v
    return 0.5 if hi == lo else min(1.0, max(0.0, (v - lo) / (hi - lo)))

  def xy(self, x: float, y: float) -> tuple[float, float]:
    """Pixel position of the data point (x, y), clamped to the plot area."""
    x0, y0, x1, y1 = self.box
    fx, fy = self._frac(x, self.xlim, self.xlog), self._frac(y, self.ylim, self.ylog)
    return x0 + fx * (x1 - x0), y1 - fy * (y1 - y0)

  def frame(self, title: str, xlabel: str, ylabel: str, f: ImageFont.ImageFont) -> None:
    """Grid lines, tick labels, the box, the title above it, axis labels (y turned 90 degrees)."""
    d, (x0, y0, x1, y1) = self.draw, self.box
    for v in ticks(*self.xlim, log=self.xlog):
      x, _ = self.xy(v, self.ylim[0])
      d.line([(x, y0), (x, y1)], fill=GRID)
      d.line([(x, y1), (x, y1 + 3)], fill="black")
      d.text((x, y1 + 4), tick_label(v), fill="black", font=f, anchor="ma")
    label_w = 0
    for v in ticks(*self.ylim, log=self.ylog):
      _, y = self.xy(self.xlim[0], v)
      d.line([(x0, y), (x1, y)], fill=GRID)
      d.line([(x0 - 3, y), (x0, y)], fill="black")
      d.text((x0 - 5, y), tick_label(v), fill="black", font=f, anchor="rm")
      label_w = max(label_w, int(d.textlength(tick_label(v), font=f)))
    d.rectangle(self.box, outline="black")
    d.text(((x0 + x1) / 2, y0 - 4), title, fill="black", font=f, anchor="md")
    d.text(((x0 + x1) / 2, y1 + 18), xlabel, fill="black", font=f, anchor="ma")
    if ylabel:  # drawn on a strip of its own, turned 90 degrees
      tw = int(d.textlength(ylabel, font=f)) + 4
      strip = Image.new("RGB", (tw, 16), "white")
      ImageDraw.Draw(strip).text((2, 1), ylabel, fill="black", font=f)
      self.image.paste(
        strip.rotate(90, expand=True),
        (max(0, int(x0) - label_w - 24), max(0, int((y0 + y1 - tw) / 2))),
      )

  def line(
    self,
    xs: Sequence[float],
    ys: Sequence[float],
    color: Color,
    *,
    width: int = 2,
    dash: Sequence[int] = (),
    marker: bool = False,
  ) -> None:
    """The points as a line, broken at non-finite points (and at values <= 0 on a log axis);
    dots at the points with `marker`, and at points with no neighbour always."""
    x, y = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    ok &= (x > 0 if self.xlog else True) & (y > 0 if self.ylog else True)
    for seg in np.split(np.arange(len(x)), np.flatnonzero(~ok)):
      pts = [self.xy(x[i], y[i]) for i in seg[ok[seg]]]
      dashed(self.draw, pts, color, width, dash)
      if marker or len(pts) == 1:
        for cx, cy in pts:
          self.draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=color)


def panel(
  image: Image.Image,
  box: tuple[float, float, float, float],
  lines: Sequence[Line],
  *,
  title: str = "",
  xlabel: str = "",
  ylabel: str = "",
  xlog: bool = False,
  ylog: bool = False,
  ylim: tuple[float, float] | None = None,
  markers: bool = False,
  f: ImageFont.ImageFont | None = None,
) -> Axes | None:
  """One chart in `box`: limits from the lines' finite points (y clipped to `ylim`), frame and
  lines. Without a finite point it draws "no data" and returns None."""
  f, draw = f or font(12), ImageDraw.Draw(image)
  if ylim is not None:
    lines = [ln._replace(ys=np.clip(np.asarray(ln.ys, np.float64), *ylim)) for ln in lines]
  xy = [(np.asarray(ln.xs, np.float64), np.asarray(ln.ys, np.float64)) for ln in lines]
  xs = np.concatenate([x[np.isfinite(x) & np.isfinite(y)] for x, y in xy] or [np.zeros(0)])
  ys = np.concatenate([y[np.isfinite(x) & np.isfinite(y)] for x, y in xy] or [np.zeros(0)])
  if not xs.size:
    draw.rectangle(box, outline=(180, 180, 180))
    draw.text(
      ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), "no data", fill="gray", font=f, anchor="mm"
    )
    return None
  (xl, xlog), (yl, ylog) = limits(xs, log=xlog), limits(ys, log=ylog)
  ax = Axes(image, box, xl, yl, xlog, ylog)
  ax.frame(title, xlabel, ylabel, f)
  for ln in lines:
    ax.line(ln.xs, ln.ys, ln.color, width=ln.width, dash=ln.dash, marker=markers or ln.marker)
  return ax


def line_plot(
  series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
  *,
  title: str = "",
  xlabel: str = "",
  ylabel: str = "",
  size: tuple[int, int] = (480, 320),
  logy: bool = False,
  logx: bool = False,
  ylim: tuple[float, float] | None = None,
  widths: Mapping[str, int] | None = None,
  markers: bool = False,
) -> np.ndarray:
  """Lines y(x), one per named series in COLORS order, with axes, ticks, grid and (for several
  series) a legend in the top right corner.

  series: name -> (x, y); non-finite points break a line. ylim clips the y range; widths: line
  width per name (default 2). Returns uint8 (size[1], size[0], 3).
  """
  width, height = size
  img = Image.new("RGB", size, "white")
  draw, f = ImageDraw.Draw(img), font(11)
  lines = [
    Line(x, y, COLORS[k % len(COLORS)], width=(widths or {}).get(name, 2))
    for k, (name, (x, y)) in enumerate(series.items())
  ]
  box = (58, 24 if title else 10, width - 12, height - 36)
  if (
    panel(
      img,
      box,
      lines,
      xlabel=xlabel,
      ylabel=ylabel,
      xlog=logx,
      ylog=logy,
      ylim=ylim,
      markers=markers,
      f=f,
    )
    is None
  ):
    raise ValueError("line_plot has no finite points to draw.")
  if title:
    draw.text((width // 2, 4), title, fill="black", font=font(13), anchor="ma")
  if len(lines) > 1:
    entries = [(name, ln.color, ()) for name, ln in zip(series, lines, strict=True)]
    legend(draw, box[2] - 4, box[1] + 6, entries, f, framed=True, right=True)
  return np.asarray(img)


def small_multiples(
  panels: Sequence[tuple[str, Sequence[Line]]],
  *,
  xlabel: str,
  ylabel: str,
  xlog: bool = False,
  ylog: bool = False,
  heading: str = "",
  legends: Sequence[tuple[str, Sequence[tuple[str, Color, Sequence[int]]]]] = (),
  panel_size: tuple[int, int] = (380, 270),
) -> Image.Image:
  """A grid of panels (title, lines) sharing axis labels, with legends (title, entries of
  (label, colour, dash)) stacked on the right; a line of up to 12 points gets dots. Returns
  the image, sized to the grid (2, 3 or 4 panels a row)."""
  f = font(12)
  cols = min(len(panels), 2 if len(panels) <= 4 else 3 if len(panels) <= 9 else 4)
  nrows = math.ceil(len(panels) / max(cols, 1))
  (pw, ph), left, top, gap = panel_size, 70, 50, 60
  labels = [s for _, entries in legends for s, _, _ in entries] + [t for t, _ in legends]
  img = Image.new(
    "RGB",
    (
      left + cols * (pw + gap) + 40 + 8 * max(map(len, labels), default=0),
      top + nrows * (ph + 70) + 10,
    ),
    "white",
  )
  draw = ImageDraw.Draw(img)
  draw.text((10, 8), heading, fill="black", font=font(15))
  for i, (title, lines) in enumerate(panels):
    r, c = divmod(i, cols)
    x, y = left + c * (pw + gap), top + 20 + r * (ph + 70)
    lines = [ln._replace(marker=ln.marker or len(ln.xs) <= 12) for ln in lines]
    panel(
      img,
      (x, y, x + pw, y + ph),
      lines,
      title=title,
      xlabel=xlabel,
      ylabel=ylabel,
      xlog=xlog,
      ylog=ylog,
      f=f,
    )
  y = top + 20
  for title, entries in legends:
    y = legend(draw, left + cols * (pw + gap) - 20, y, entries, f, title=title) + 12
  return img


# ---- the library's charts ------------------------------------------------------------------------


def smooth(values: Sequence[float], window: int) -> np.ndarray:
  """Centred moving average over `window` points (shorter at the ends, no lag); NaN ignored."""
  v = np.asarray(values, np.float64)
  ok = np.isfinite(v)
  k = np.ones(max(1, window) | 1)  # odd, so it is centred
  num = np.convolve(np.where(ok, v, 0.0), k, mode="same")
  den = np.convolve(ok.astype(np.float64), k, mode="same")
  with np.errstate(invalid="ignore", divide="ignore"):
    return num / den


def schedule_plot(
  tables: Mapping[str, tuple[np.ndarray, np.ndarray]],
  *,
  highlight: str | None = None,
  size: tuple[int, int] = (440, 320),
) -> np.ndarray:
  """alpha-bar (left) and log-SNR (right, clipped to [-20, 20]) against t / T, one line per
  name -> (alpha-bar (T,), log-SNR (T,)) tables (different T are comparable on t / T); the
  `highlight` one drawn thicker. Returns uint8 (size[1], 2 size[0], 3)."""
  u = {name: (np.arange(len(a)) + 1.0) / len(a) for name, (a, _) in tables.items()}
  widths = {highlight: 4} if highlight else None
  left = line_plot(
    {n: (u[n], a) for n, (a, _) in tables.items()},
    title="alpha-bar (signal fraction)",
    xlabel="t / T",
    ylabel="alpha-bar",
    size=size,
    widths=widths,
  )
  right = line_plot(
    {n: (u[n], s) for n, (_, s) in tables.items()},
    title="log-SNR = log(abar / (1 - abar))",
    xlabel="t / T",
    ylabel="log-SNR",
    size=size,
    ylim=(-20.0, 20.0),
    widths=widths,
  )
  return np.concatenate([left, right], axis=1)


def loss_curve(
  steps: Sequence[float],
  values: Sequence[float],
  *,
  key: str = "loss",
  size: tuple[int, int] = (560, 320),
) -> np.ndarray:
  """A training curve: the logged values against step and a centred moving average over ~1/25
  of the run (COLORS[0], COLORS[1]); log-scaled y when every value is positive. Returns uint8
  (size[1], size[0], 3); ValueError without a finite value."""
  steps, vals = np.asarray(steps, np.float64), np.asarray(values, np.float64)
  finite = vals[np.isfinite(vals)]
  if not finite.size:
    raise ValueError(f"no finite {key!r} values to plot.")
  series = {key: (steps, vals)}
  window = len(vals) // 25
  if window >= 3:
    series[f"{key}, mean of {window | 1}"] = (steps, smooth(vals, window))
  return line_plot(
    series,
    title=f"training {key}",
    xlabel="step",
    ylabel=key,
    size=size,
    logy=bool(np.all(finite > 0)),
    widths={key: 1},
  )


def quality_plot(
  results: Sequence[Mapping[str, Any]],
  *,
  metric: str = "fd",
  floor: float | None = None,
  size: tuple[int, int] = (480, 320),
) -> np.ndarray:
  """Sample quality against network evaluations, one line per sampler, from eval results
  ({"sampler", "nfe", metric} dicts); `floor` (held-out real images) as a flat line.
  Returns uint8 (size[1], size[0], 3)."""
  by: dict[str, list] = {}
  for r in results:
    if r.get(metric) is not None:
      by.setdefault(r["sampler"], []).append((r["nfe"], r[metric]))
  if not by:
    raise ValueError(f"no results with {metric!r} to plot.")
  series = {k: tuple(zip(*sorted(v), strict=True)) for k, v in by.items()}
  if floor is not None:
    nfes = [n for v in by.values() for n, _ in v]
    series["held-out floor"] = ((min(nfes), max(nfes)), (floor, floor))
  return line_plot(
    series,
    title=f"{metric} vs network evaluations",
    xlabel="NFE",
    ylabel=metric,
    size=size,
    markers=True,
  )
