"""diffusion/visualize.py: grids, the forward strip, the reverse GIF, the schedule chart of
Schedules, and the charts it re-exports from diffusion/plots.py (tested in test_plots.py)."""

import numpy as np
import pytest
from PIL import Image

from diffusion import plots, schedules, visualize

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
  for half in (img[:, :300], img[:, 300:]):  # alpha-bar and log-SNR
    colors = {tuple(c) for c in half.reshape(-1, 3)}
    for c in visualize.COLORS[:3]:
      assert c in colors  # one line colour per schedule
    assert visualize.COLORS[3] not in colors
  # The highlighted schedule is drawn thicker: the same pair of curves, highlighted in turn.
  pair = {n: named[n] for n in ("linear", "cosine")}
  count = lambda img, c: int((img[:, :300] == c).all(-1).sum())
  a, b = (visualize.schedule_plot(pair, highlight=h, size=(300, 200)) for h in pair)
  assert count(a, visualize.COLORS[0]) > 1.5 * count(b, visualize.COLORS[0])
  assert count(b, visualize.COLORS[1]) > 1.5 * count(a, visualize.COLORS[1])


def test_charts_are_the_one_kit():
  for name in ("COLORS", "line_plot", "loss_curve", "quality_plot", "smooth"):
    assert getattr(visualize, name) is getattr(plots, name)
