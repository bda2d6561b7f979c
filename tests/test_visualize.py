"""Pictures: grids, the forward strip, the reverse GIF, schedule and loss plots, pictures mode."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from diffusion import schedules, visualize

RNG = np.random.default_rng(0)


def test_grid_layout_and_save_grid(tmp_path):
  images = RNG.integers(0, 256, (5, 4, 6, 3), dtype=np.uint8)
  g = visualize.grid(images, ncol=2, pad=1)
  assert g.shape == (3 * 5 + 1, 2 * 7 + 1, 3)
  np.testing.assert_array_equal(g[1:5, 8:14], images[1])  # row 0, column 1
  assert (g[0] == 255).all() and (g[-5:, 8:] == 255).all()  # padding and the empty last cell
  visualize.save_grid(str(tmp_path / "g.png"), images, ncol=5)
  with Image.open(tmp_path / "g.png") as im:  # upscaled 16x: 4x6 cells -> 64x96
    assert im.size == (5 * 97 + 1, 65 + 1)


def test_forward_strip_rows_columns_and_noise():
  sch = schedules.make("linear", 100)
  images = RNG.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
  ts = [0, 10, 50, 99]
  strip = visualize.forward_strip(images, sch, ts, pad=2, min_cell=32)
  cell = 32  # 8 px upscaled 4x
  header = strip.shape[0] - 3 * (cell + 2) - 2
  assert strip.shape[1] == 4 * (cell + 2) + 2 and strip.dtype == np.uint8
  assert 10 < header < 60
  assert (strip[:header] < 128).any()  # the t / abar labels are drawn
  cell_at = lambda r, c: strip[
    header + r * (cell + 2) : header + r * (cell + 2) + cell,
    2 + c * (cell + 2) : 2 + c * (cell + 2) + cell,
  ]
  data = [img.repeat(4, 0).repeat(4, 1).astype(float) for img in images]
  err = [[np.abs(cell_at(r, c) - data[r]).mean() for c in range(4)] for r in range(3)]
  for r in range(3):
    assert err[r][0] < 6  # t = 0: abar ~ 1 (noise std ~4 of 255), the data itself
    assert err[r][0] < err[r][1] < err[r][3]  # dissolving as t grows
    assert err[r][3] > 40  # t = T-1: noise
  with pytest.raises(ValueError, match="timesteps"):
    visualize.forward_strip(images, sch, [0, 100])


def test_reverse_gif_frames_size_and_hold(tmp_path):
  traj = RNG.normal(size=(50, 6, 8, 8, 3)).astype(np.float32)
  path = str(tmp_path / "rev.gif")
  n = visualize.save_reverse_gif(path, traj, num_frames=20, ncol=3, duration_ms=50, hold_ms=1500)
  assert n == 20
  with Image.open(path) as im:
    assert im.n_frames == 20 and im.size == (3 * 65 + 1, 2 * 65 + 1)
    durations = []
    for i in range(im.n_frames):
      im.seek(i)
      durations.append(im.info["duration"])
    final = np.asarray(im.convert("RGB"))
  assert durations[:-1] == [50] * 19 and durations[-1] == 1500  # the last frame is held
  expect = visualize.grid(
    np.clip(np.round((traj[-1] + 1) * 127.5), 0, 255).astype(np.uint8), ncol=3, scale=8
  )
  assert np.abs(final.astype(int) - expect).mean() < 12  # the final images (GIF palette)
  # Fewer states than frames: every state once, first and last included.
  np.testing.assert_array_equal(visualize.frame_indices(7, 30), np.arange(7))
  idx = visualize.frame_indices(1000, 30)
  assert len(idx) == 30 and idx[0] == 0 and idx[-1] == 999


def test_schedule_plot_draws_every_schedule():
  named = {n: schedules.make(n, 1000) for n in ("linear", "cosine")}
  named["sigmoid"] = schedules.make("sigmoid", 200)  # another T on the same t / T axis
  img = visualize.schedule_plot(named, highlight="cosine", size=(300, 200))
  assert img.shape == (200, 600, 3)
  colors = {tuple(c) for c in img.reshape(-1, 3)}
  for c in visualize.COLORS[:3]:
    assert c in colors  # one line colour per schedule
  assert visualize.COLORS[3] not in colors


def test_loss_curve_reads_training_rows_only(tmp_path):
  path = tmp_path / "metrics.jsonl"
  with open(path, "w") as fh:
    for s in range(10, 1001, 10):
      fh.write(json.dumps({"step": s, "loss": 1.0 / s**0.5, "learning_rate": 1e-4}) + "\n")
    fh.write(json.dumps({"step": 1000, "mode": "eval", "sampler": "ddim", "fd": 3.0}) + "\n")
    fh.write('{"step": 1010, "lo')  # a torn last line
  img = visualize.loss_curve(str(path), size=(400, 250))
  assert img.shape == (250, 400, 3)
  colors = {tuple(c) for c in img.reshape(-1, 3)}
  assert visualize.COLORS[0] in colors and visualize.COLORS[1] in colors  # raw and smoothed
  # The curve falls: the raw line's pixels are higher on the left than on the right.
  ys, xs = np.nonzero((img == visualize.COLORS[0]).all(-1))
  left, right = ys[xs < np.percentile(xs, 20)].mean(), ys[xs > np.percentile(xs, 80)].mean()
  assert left < right
  with open(tmp_path / "eval_only.jsonl", "w") as fh:
    fh.write(json.dumps({"step": 5, "mode": "eval", "fd": 1.0}) + "\n")
  with pytest.raises(ValueError, match="no training rows"):
    visualize.loss_curve(str(tmp_path / "eval_only.jsonl"))


def test_quality_plot_and_line_plot_errors():
  res = [
    {"sampler": "ddim", "nfe": 10, "fd": 5.0},
    {"sampler": "ddim", "nfe": 50, "fd": 2.0},
    {"sampler": "heun", "nfe": 19, "fd": 3.0},
  ]
  img = visualize.quality_plot(res, floor=1.0, size=(320, 240))
  assert img.shape == (240, 320, 3)
  colors = {tuple(c) for c in img.reshape(-1, 3)}
  assert {visualize.COLORS[0], visualize.COLORS[1], visualize.COLORS[2]} <= colors
  with pytest.raises(ValueError, match="no finite points"):
    visualize.line_plot({"a": ([0, 1], [np.nan, np.nan])})


def test_pictures_mode_writes_pictures(tmp_path):
  from test_train import tiny_config

  c = tiny_config()
  c.diffusion.num_timesteps = 100
  with open(tmp_path / "metrics.jsonl", "w") as fh:
    for s in (2, 4, 6):
      fh.write(json.dumps({"step": s, "loss": 1.0 / s}) + "\n")
  paths = visualize.write_pictures(c, str(tmp_path), num_images=4)
  assert set(paths) == {"forward", "schedule", "loss"}
  for p in paths.values():
    assert os.path.getsize(p) < 500_000
  with Image.open(paths["forward"]) as im:  # 8 columns of 64 px cells (8x8 sprites, 8x)
    assert im.size == (8 * 66 + 2, im.size[1]) and im.size[1] > 4 * 66
