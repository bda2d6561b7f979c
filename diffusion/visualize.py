"""Pictures: sample grids, the forward process, the reverse process as a GIF, schedule charts.

Everything works on uint8 arrays (images (N, H, W, C) in [0, 255]), float [-1, 1] sampler states
or Schedules, and returns uint8 (rows, cols, C) pictures; `save_*` functions write PNG / GIF
files. Charts are diffusion/plots.py's (re-exported here: line_plot, loss_curve, quality_plot).
The pictures mode (diffusion/modes/pictures.py) puts them together for a run.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

from diffusion import data, gaussian, plots, schedules, storage
from diffusion.plots import COLORS, line_plot, loss_curve, quality_plot, smooth

__all__ = [
  "COLORS",
  "default_strip_timesteps",
  "forward_strip",
  "frame_indices",
  "grid",
  "line_plot",
  "loss_curve",
  "quality_plot",
  "reverse_frames",
  "save_gif",
  "save_grid",
  "save_image",
  "save_reverse_gif",
  "schedule_plot",
  "smooth",
]


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
  """Writes a uint8 (H, W, C) image as PNG, creating folders; C = 1 is saved as grayscale. `path`
  may be a gs:// URL (diffusion/storage.py)."""
  storage.makedirs(os.path.dirname(path) or ".")
  image = image[..., 0] if image.shape[-1] == 1 else image
  with storage.writing(path) as local:
    Image.fromarray(image).save(local)


def save_grid(path: str, images: np.ndarray, *, ncol: int | None = None) -> None:
  """Saves uint8 images (N, H, W, C) as a PNG grid, upscaled so that cells are >= 64 px."""
  scale = max(1, 64 // images.shape[1])
  save_image(path, grid(images, ncol=ncol, scale=scale))


# ---- the forward process -----------------------------------------------------------------------


def _to_rgb(images: np.ndarray) -> np.ndarray:
  """uint8 (..., C) with C in {1, 3} -> uint8 (..., 3)."""
  return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def default_strip_timesteps(num_timesteps: int, columns: int = 8) -> list[int]:
  """`columns` timesteps evenly spaced over [0, T-1], increasing."""
  return sorted({int(round(v)) for v in np.linspace(0, num_timesteps - 1, columns)})


def forward_strip(
  images: np.ndarray,
  schedule: schedules.Schedule,
  timesteps: Sequence[int],
  *,
  seed: int = 0,
  pad: int = 2,
  min_cell: int = 64,
  decode: Callable[[jax.Array], jax.Array] | None = None,
) -> np.ndarray:
  """The forward process q(x_t | x_0) as a picture: one row per data image, one column per t.

  images: uint8 (N, H, W, C) data, or with `decode` float32 (N, h, w, c) normalised latents
  whose noised states are drawn as decode(x_t), pixels (N, H, W, C) in [-1, 1]; timesteps:
  increasing ints in [0, T). Every row reuses one noise draw across t, so the image visibly
  dissolves. Above each column: "t=..." and the signal fraction "abar=...". Cells are upscaled
  (nearest) to at least `min_cell` px.
  Returns uint8 (header + N (S + pad) + pad, len(timesteps) (S + pad) + pad, 3), S the cell size.
  """
  images = np.asarray(images)
  want = np.float32 if decode else np.uint8
  if images.ndim != 4 or images.dtype != want:
    raise ValueError(
      f"forward_strip wants {np.dtype(want)} (N, H, W, C), got {images.dtype} {images.shape}."
    )
  ts = np.asarray(timesteps, np.int32)
  if ts.ndim != 1 or not len(ts) or ts.min() < 0 or ts.max() >= schedule.num_timesteps:
    raise ValueError(f"timesteps must be in [0, {schedule.num_timesteps}), got {ts.tolist()}.")
  n = len(images)
  x0 = data.normalize(images)
  noise = jax.random.normal(jax.random.PRNGKey(seed), x0.shape)
  to_pixels = decode or (lambda x: x)
  cols = [
    data.to_uint8(to_pixels(gaussian.q_sample(schedule, x0, jnp.full((n,), t), noise))) for t in ts
  ]
  h, w = cols[0].shape[1:3]
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
  draw, font = ImageDraw.Draw(canvas), plots.font(font_px)
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
  storage.makedirs(os.path.dirname(path) or ".")
  pics = [Image.fromarray(f[..., 0] if f.shape[-1] == 1 else f) for f in frames]
  durations = [duration_ms] * (len(pics) - 1) + [hold_ms]
  with storage.writing(path) as local:
    pics[0].save(local, save_all=True, append_images=pics[1:], duration=durations, loop=0)


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


# ---- charts (diffusion/plots.py) --------------------------------------------------------------


def schedule_plot(
  named: Mapping[str, schedules.Schedule],
  *,
  highlight: str | None = None,
  size: tuple[int, int] = (440, 320),
) -> np.ndarray:
  """`plots.schedule_plot` of Schedules: alpha-bar and log-SNR against t / T, one line per name
  (the `highlight` one thicker). Returns uint8 (size[1], 2 size[0], 3)."""
  tables = {k: (np.asarray(s.alphas_cumprod), np.asarray(s.log_snr)) for k, s in named.items()}
  return plots.schedule_plot(tables, highlight=highlight, size=size)
