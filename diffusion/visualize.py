"""Pictures: sample grids, the forward process, the reverse process as a GIF, line plots.

Everything works on uint8 arrays (images (N, H, W, C) in [0, 255]) or float [-1, 1] sampler
states, and returns uint8 (rows, cols, C) pictures; `save_*` functions write PNG / GIF files.
Plots are drawn with PIL (no plotting library): schedules, the loss curve, quality vs NFE.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from diffusion import data, gaussian


def grid(
  images: np.ndarray, *, ncol: int | None = None, pad: int = 1, scale: int = 1, pad_value: int = 255
) -> np.ndarray:
  """uint8 images (N, H, W, C) -> one uint8 (rows, cols, C) image, `ncol` per row, padded,
  upscaled by `scale` with nearest neighbour (for small images such as 16x16 sprites)."""
  images = np.asarray(images)
  if images.ndim != 4 or images.dtype != np.uint8:
    raise ValueError(f"grid wants uint8 (N, H, W, C), got {images.dtype} {images.shape}.")
  if scale > 1:
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
  n, h, w, c = images.shape
  ncol = ncol or int(math.ceil(math.sqrt(n)))
  nrow = int(math.ceil(n / ncol))
  out = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), pad_value, np.uint8)
  for i in range(n):
    r, q = divmod(i, ncol)
    y, x = pad + r * (h + pad), pad + q * (w + pad)
    out[y : y + h, x : x + w] = images[i]
  return out


def save_image(path: str, image: np.ndarray) -> None:
  """Writes a uint8 (H, W, C) image as PNG, creating folders; C = 1 is saved as grayscale."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  image = image[..., 0] if image.shape[-1] == 1 else image
  Image.fromarray(image).save(path)


def save_grid(path: str, images: np.ndarray, *, ncol: int | None = None) -> None:
  """Saves uint8 images (N, H, W, C) as a PNG grid, upscaled so that cells are >= 64 px."""
  scale = max(1, 64 // images.shape[1])
  save_image(path, grid(images, ncol=ncol, scale=scale))


# ---- the forward process -----------------------------------------------------------------------


def _font(size: int) -> ImageFont.ImageFont:
  """Pillow's built-in font at `size` px (FreeType), or its bitmap font without FreeType."""
  try:
    return ImageFont.load_default(size=size)
  except (TypeError, OSError, ImportError):
    return ImageFont.load_default()


def _to_rgb(images: np.ndarray) -> np.ndarray:
  """uint8 (..., C) with C in {1, 3} -> uint8 (..., 3)."""
  return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def default_strip_timesteps(num_timesteps: int, columns: int = 8) -> list[int]:
  """`columns` timesteps evenly spaced over [0, T-1], increasing."""
  return sorted({int(round(v)) for v in np.linspace(0, num_timesteps - 1, columns)})


def forward_strip(
  images: np.ndarray,
  schedule: Any,
  timesteps: Sequence[int],
  *,
  seed: int = 0,
  pad: int = 2,
  min_cell: int = 64,
) -> np.ndarray:
  """The forward process q(x_t | x_0) as a picture: one row per data image, one column per t.

  images: uint8 (N, H, W, C) data; timesteps: increasing ints in [0, T). Every row reuses one
  noise draw across t, so the image visibly dissolves. Above each column: "t=..." and the
  signal fraction "abar=...". Cells are upscaled (nearest) to at least `min_cell` px.
  Returns uint8 (header + N (S + pad) + pad, len(timesteps) (S + pad) + pad, 3), S the cell size.
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.dtype != np.uint8:
    raise ValueError(f"forward_strip wants uint8 (N, H, W, C), got {images.dtype} {images.shape}.")
  ts = np.asarray(timesteps, np.int32)
  if ts.ndim != 1 or not len(ts) or ts.min() < 0 or ts.max() >= schedule.num_timesteps:
    raise ValueError(f"timesteps must be in [0, {schedule.num_timesteps}), got {ts.tolist()}.")
  n, h, w, _ = images.shape
  x0 = data.normalize(images)
  noise = jax.random.normal(jax.random.PRNGKey(seed), x0.shape)
  cols = [data.to_uint8(gaussian.q_sample(schedule, x0, jnp.full((n,), t), noise)) for t in ts]
  scale = max(1, -(-min_cell // max(h, w)))
  cell_h, cell_w = h * scale, w * scale
  font_px = max(9, min(14, cell_w // 5))
  header = 2 * (font_px + 3) + pad
  out = np.full(
    (header + n * (cell_h + pad) + pad, len(ts) * (cell_w + pad) + pad, 3), 255, np.uint8
  )
  for j, col in enumerate(cols):
    col = _to_rgb(col).repeat(scale, axis=1).repeat(scale, axis=2)
    x = pad + j * (cell_w + pad)
    for i in range(n):
      y = header + i * (cell_h + pad)
      out[y : y + cell_h, x : x + cell_w] = col[i]
  canvas = Image.fromarray(out)
  draw, font = ImageDraw.Draw(canvas), _font(font_px)
  abar = np.asarray(schedule.alphas_cumprod)
  for j, t in enumerate(ts):
    x = pad + j * (cell_w + pad) + 1
    draw.text((x, 1), f"t={int(t)}", fill=(0, 0, 0), font=font)
    draw.text((x, font_px + 4), f"abar={abar[t]:.2g}", fill=(90, 90, 90), font=font)
  return np.asarray(canvas)


# ---- the reverse process -----------------------------------------------------------------------


def frame_indices(num_states: int, num_frames: int = 30) -> np.ndarray:
  """Increasing indices into a trajectory of `num_states` states: at most `num_frames`, evenly
  spread, always including the first and the last state."""
  k = max(1, min(num_frames, num_states))
  return np.unique(np.round(np.linspace(0, num_states - 1, k)).astype(np.int64))


def reverse_frames(
  trajectory: np.ndarray,
  *,
  num_frames: int = 30,
  ncol: int | None = None,
  x_T: np.ndarray | None = None,
) -> list[np.ndarray]:
  """Grids of the sampler's states, from noise to images.

  trajectory: float (S, N, H, W, C), the states after each of S steps (values in about [-1, 1],
  clipped for display); x_T: optional (N, H, W, C) starting noise, shown first. Returns uint8
  grids (rows, cols, C), at most `num_frames` (+1 with x_T), the last one the final images.
  """
  traj = np.asarray(trajectory, np.float32)
  if traj.ndim != 5:
    raise ValueError(f"trajectory must be (steps, N, H, W, C), got shape {traj.shape}.")
  states = [traj[i] for i in frame_indices(len(traj), num_frames)]
  if x_T is not None:
    states.insert(0, np.asarray(x_T, np.float32))
  scale = max(1, 64 // traj.shape[2])
  return [grid(data.to_uint8(s), ncol=ncol, scale=scale) for s in states]


def save_gif(
  path: str, frames: Sequence[np.ndarray], *, duration_ms: int = 80, hold_ms: int = 2000
) -> None:
  """Writes uint8 frames (H, W, C) as a looping GIF; the last frame stays `hold_ms`."""
  if not frames:
    raise ValueError("save_gif needs at least one frame.")
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  pics = [Image.fromarray(f[..., 0] if f.shape[-1] == 1 else f) for f in frames]
  durations = [duration_ms] * (len(pics) - 1) + [hold_ms]
  pics[0].save(path, save_all=True, append_images=pics[1:], duration=durations, loop=0)


def save_reverse_gif(
  path: str,
  trajectory: np.ndarray,
  *,
  num_frames: int = 30,
  ncol: int | None = None,
  x_T: np.ndarray | None = None,
  duration_ms: int = 80,
  hold_ms: int = 2000,
) -> int:
  """`reverse_frames` written by `save_gif`; returns the number of frames."""
  frames = reverse_frames(trajectory, num_frames=num_frames, ncol=ncol, x_T=x_T)
  save_gif(path, frames, duration_ms=duration_ms, hold_ms=hold_ms)
  return len(frames)


# ---- line plots (PIL, no plotting library) -----------------------------------------------------

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


def _nice_ticks(lo: float, hi: float, target: int = 5) -> np.ndarray:
  """Round tick values (1, 2, 5 x 10^k steps) covering [lo, hi]."""
  if not hi > lo:
    hi = lo + 1.0
  raw = (hi - lo) / target
  mag = 10 ** math.floor(math.log10(raw))
  step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
  return np.arange(math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9) + 1) * step


def _fmt(v: float) -> str:
  """Short tick label: 0.05, 2.5, 300, 2k, 1.5M."""
  if v != 0 and abs(v) >= 1e6:
    return f"{v / 1e6:g}M"
  if v != 0 and abs(v) >= 1e3 and v % 100 == 0:
    return f"{v / 1e3:g}k"
  return f"{v:.3g}"


def _log_ticks(lo: float, hi: float) -> np.ndarray:
  """log10 of 1-2-5 values in [10^lo, 10^hi] (or of linear ticks when that gives fewer than 3)."""
  cands = [m * 10.0**k for k in range(math.floor(lo), math.ceil(hi) + 1) for m in (1, 2, 5)]
  ticks = np.log10([c for c in cands if lo <= math.log10(c) <= hi])
  if len(ticks) > 7:  # many decades: powers of ten only
    ticks = np.arange(math.ceil(lo), math.floor(hi) + 1, dtype=np.float64)
  return ticks if len(ticks) >= 3 else np.log10(_nice_ticks(10**lo, 10**hi))


def line_plot(
  series: dict[str, tuple[Sequence[float], Sequence[float]]],
  *,
  title: str = "",
  xlabel: str = "",
  ylabel: str = "",
  size: tuple[int, int] = (480, 320),
  logy: bool = False,
  ylim: tuple[float, float] | None = None,
  widths: dict[str, int] | None = None,
  markers: bool = False,
) -> np.ndarray:
  """Lines y(x), one per named series, with axes, ticks, grid and a legend.

  series: name -> (x, y); non-finite points (and y <= 0 with `logy`) break the line. ylim clips
  the y range. widths: line width per name (default 2). Returns uint8 (height, width, 3).
  """
  width, height = size
  left, right, top, bottom = 56, 12, 24 if title else 10, 38
  font = _font(11)
  img = Image.new("RGB", size, (255, 255, 255))
  draw = ImageDraw.Draw(img)
  tf = (lambda v: np.log10(v)) if logy else (lambda v: v)
  pts = {}
  for name, (xs, ys) in series.items():
    x, y = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
      y = np.where(y > 0, tf(y), np.nan) if logy else y
    if ylim is not None:
      y = np.clip(y, *(tf(np.asarray(ylim, np.float64))))
    pts[name] = (x, y)
  finite = lambda a: a[np.isfinite(a)]
  allx = np.concatenate([finite(x) for x, _ in pts.values()] or [np.zeros(0)])
  ally = np.concatenate([finite(y) for _, y in pts.values()] or [np.zeros(0)])
  if not allx.size or not ally.size:
    raise ValueError("line_plot has no finite points to draw.")
  x0, x1 = float(allx.min()), float(allx.max())
  y0, y1 = float(ally.min()), float(ally.max())
  if x1 <= x0:
    x0, x1 = x0 - 0.5, x1 + 0.5
  if y1 - y0 < 1e-12:
    y0, y1 = y0 - 0.5, y1 + 0.5
  margin = 0.04 * (y1 - y0)
  y0, y1 = y0 - margin, y1 + margin
  px = lambda v: left + (v - x0) / (x1 - x0) * (width - left - right)
  py = lambda v: height - bottom - (v - y0) / (y1 - y0) * (height - top - bottom)
  xticks = _nice_ticks(x0, x1)
  yticks = _log_ticks(y0, y1) if logy else _nice_ticks(y0, y1)
  for v in xticks[(xticks >= x0) & (xticks <= x1)]:
    draw.line([(px(v), top), (px(v), height - bottom)], fill=(232, 232, 232))
    draw.text((px(v), height - bottom + 3), _fmt(v), fill=(0, 0, 0), font=font, anchor="ma")
  for v in yticks[(yticks >= y0) & (yticks <= y1)]:
    draw.line([(left, py(v)), (width - right, py(v))], fill=(232, 232, 232))
    label = _fmt(10**v) if logy else _fmt(v)
    draw.text((left - 4, py(v)), label, fill=(0, 0, 0), font=font, anchor="rm")
  draw.rectangle([left, top, width - right, height - bottom], outline=(0, 0, 0))
  for k, (name, (x, y)) in enumerate(pts.items()):
    color, lw = COLORS[k % len(COLORS)], (widths or {}).get(name, 2)
    ok = np.isfinite(x) & np.isfinite(y)
    for seg in np.split(np.arange(len(x)), np.flatnonzero(~ok)):
      seg = seg[ok[seg]]
      line = [(px(x[i]), py(y[i])) for i in seg]
      if len(line) > 1:
        draw.line(line, fill=color, width=lw, joint="curve")
      if markers or len(line) == 1:
        for cx, cy in line:
          draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=color)
  if title:
    draw.text((width // 2, 4), title, fill=(0, 0, 0), font=_font(13), anchor="ma")
  draw.text(
    ((left + width - right) // 2, height - 4), xlabel, fill=(0, 0, 0), font=font, anchor="md"
  )
  if ylabel:  # rotated: drawn on its own strip, turned 90 degrees
    tw = int(draw.textlength(ylabel, font=font)) + 4
    strip = Image.new("RGB", (tw, 14), (255, 255, 255))
    ImageDraw.Draw(strip).text((2, 0), ylabel, fill=(0, 0, 0), font=font)
    strip = strip.rotate(90, expand=True)
    img.paste(strip, (2, max(0, (top + height - bottom - tw) // 2)))
  if len(pts) > 1:  # legend, top right
    names = list(pts)
    lw_ = max(int(draw.textlength(n, font=font)) for n in names) + 30
    x_l, y_l = width - right - lw_ - 4, top + 4
    draw.rectangle(
      [x_l, y_l, x_l + lw_, y_l + 14 * len(names) + 4],
      fill=(255, 255, 255),
      outline=(180, 180, 180),
    )
    for k, name in enumerate(names):
      yy = y_l + 9 + 14 * k
      draw.line([(x_l + 4, yy), (x_l + 22, yy)], fill=COLORS[k % len(COLORS)], width=3)
      draw.text((x_l + 26, yy), name, fill=(0, 0, 0), font=font, anchor="lm")
  return np.asarray(img)


COMPARE_SCHEDULES = ("linear", "scaled_linear", "cosine", "sigmoid")


def schedule_plot(
  named: dict[str, Any], *, highlight: str | None = None, size: tuple[int, int] = (440, 320)
) -> np.ndarray:
  """alpha-bar (left) and log-SNR (right, clipped to [-20, 20]) against t / T, one line per
  Schedule in `named` (name -> Schedule; different T are comparable on t / T). The `highlight`
  one is drawn thicker. Returns uint8 (size[1], 2 size[0], 3)."""
  curves_a, curves_l = {}, {}
  for name, s in named.items():
    n = s.num_timesteps
    u = (np.arange(n) + 1.0) / n
    curves_a[name] = (u, np.asarray(s.alphas_cumprod))
    curves_l[name] = (u, np.asarray(s.log_snr))
  widths = {highlight: 4} if highlight else None
  left = line_plot(
    curves_a,
    title="alpha-bar (signal fraction)",
    xlabel="t / T",
    ylabel="alpha-bar",
    size=size,
    widths=widths,
  )
  right = line_plot(
    curves_l,
    title="log-SNR = log(abar / (1 - abar))",
    xlabel="t / T",
    ylabel="log-SNR",
    size=size,
    ylim=(-20.0, 20.0),
    widths=widths,
  )
  return np.concatenate([left, right], axis=1)


def read_metrics(path: str) -> list[dict]:
  """Rows of a metrics.jsonl (unreadable lines, e.g. a torn last line, are skipped)."""
  rows = []
  with open(path) as fh:
    for line in fh:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return rows


def smooth(values: np.ndarray, window: int) -> np.ndarray:
  """Centred moving average over `window` points (shorter at the ends, no lag); NaN ignored."""
  v = np.asarray(values, np.float64)
  ok = np.isfinite(v)
  k = np.ones(max(1, window) | 1)  # odd, so it is centred
  num = np.convolve(np.where(ok, v, 0.0), k, mode="same")
  den = np.convolve(ok.astype(np.float64), k, mode="same")
  with np.errstate(invalid="ignore", divide="ignore"):
    return num / den


def loss_curve(
  metrics_path: str, *, key: str = "loss", size: tuple[int, int] = (560, 320)
) -> np.ndarray:
  """The training loss against step from metrics.jsonl: the logged values and a centred moving
  average over ~1/25 of the run, log-scaled y when all values are positive. Rows of other modes
  (with a "mode" key, e.g. eval) are ignored; a resumed run's repeated steps keep the last row.
  Returns uint8 (size[1], size[0], 3)."""
  rows = {
    int(r["step"]): float(r[key])
    for r in read_metrics(metrics_path)
    if "mode" not in r and key in r and "step" in r
  }
  if not rows:
    raise ValueError(f"no training rows with {key!r} in {metrics_path}; train first.")
  steps = np.array(sorted(rows), np.float64)
  vals = np.array([rows[int(s)] for s in steps])
  series = {key: (steps, vals)}
  window = len(vals) // 25
  if window >= 3:
    series[f"{key}, mean of {window | 1}"] = (steps, smooth(vals, window))
  finite = vals[np.isfinite(vals)]
  return line_plot(
    series,
    title=f"training {key}",
    xlabel="step",
    ylabel=key,
    size=size,
    logy=bool(finite.size and np.all(finite > 0)),
    widths={key: 1},
  )


def quality_plot(
  results: Sequence[dict],
  *,
  metric: str = "fd",
  floor: float | None = None,
  size: tuple[int, int] = (480, 320),
) -> np.ndarray:
  """Sample quality against network evaluations, one line per sampler, from eval results
  ({"sampler", "nfe", metric} dicts); `floor` (held-out real images) as a flat line.
  Returns uint8 (size[1], size[0], 3)."""
  by = {}
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


def write_pictures(config: Any, workdir: str, *, num_images: int = 6) -> dict[str, str]:
  """The run's explanatory pictures into <workdir>/pictures/: forward.png (the forward process
  on `num_images` training images), schedule.png (the configured schedule against the usual
  ones), loss.png (when metrics.jsonl has training rows). Returns name -> path."""
  from diffusion import schedules  # the math only; no model

  out = os.path.join(workdir, "pictures")
  f = config.diffusion
  mine = schedules.make(f.schedule, f.num_timesteps, **f.schedule_params.to_dict())
  ds = data.load(config.data, split="train")
  pick = np.random.default_rng(config.seed).choice(len(ds), min(num_images, len(ds)), replace=False)
  paths = {
    "forward": os.path.join(out, "forward.png"),
    "schedule": os.path.join(out, "schedule.png"),
  }
  save_image(
    paths["forward"],
    forward_strip(
      ds.images[np.sort(pick)], mine, default_strip_timesteps(f.num_timesteps), seed=config.seed
    ),
  )
  named = {f"{f.schedule} (configured)": mine}
  for name in COMPARE_SCHEDULES:
    if name != f.schedule or f.schedule_params.to_dict():
      named[name] = schedules.make(name, f.num_timesteps)
  save_image(paths["schedule"], schedule_plot(named, highlight=f"{f.schedule} (configured)"))
  metrics = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(metrics):
    try:
      image = loss_curve(metrics)
    except ValueError:
      image = None
    if image is not None:
      paths["loss"] = os.path.join(out, "loss.png")
      save_image(paths["loss"], image)
  return paths
