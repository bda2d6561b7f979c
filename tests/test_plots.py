"""diffusion/plots.py, the one chart kit: ticks and labels, limits, the axes' pixel mapping, line
charts (broken at non-finite points), the loss curve, quality against NFE, small multiples;
no JAX."""

import numpy as np
import pytest
from conftest import run_python
from PIL import Image

from diffusion import plots


def colour_pixels(img, c) -> tuple[np.ndarray, np.ndarray]:
  return np.nonzero((np.asarray(img)[..., :3] == c).all(-1))


def test_ticks_are_round_and_inside_the_range():
  assert plots.ticks(0.0, 1.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
  assert plots.ticks(-0.05, 1.05) == [0.0, 0.5, 1.0]
  assert plots.ticks(0.1, 0.35) == [0.1, 0.15, 0.2, 0.25, 0.3, 0.35]  # no 0.30000000000000004
  assert plots.ticks(0.02, 0.3, log=True) == [0.02, 0.05, 0.1, 0.2]
  assert plots.ticks(1e-3, 1e6, log=True) == [10.0**e for e in range(-3, 7)]  # decades only
  assert plots.ticks(3.0, 3.3, log=True) == [3.0, 3.1, 3.2, 3.3]  # narrow: linear ticks
  assert [plots.tick_label(v) for v in (0, 0.05, 2.5, 300, 2000, 1.5e6, 1e-5, 1234)] == [
    "0",
    "0.05",
    "2.5",
    "300",
    "2k",
    "1.5M",
    "1e-05",
    "1.23e+03",
  ]


def test_limits_pad_and_fall_back_to_linear():
  (lo, hi), log = plots.limits([1.0, 3.0], pad=0.05)
  assert not log and lo == pytest.approx(0.9) and hi == pytest.approx(3.1)
  (lo, hi), log = plots.limits([1.0, 100.0, float("nan")], log=True, pad=0.5)
  assert log and lo == pytest.approx(0.1) and hi == pytest.approx(1000.0)
  assert plots.limits([-1.0, 10.0], log=True)[1] is False  # a value <= 0: linear axis
  (lo, hi), _ = plots.limits([2.0, 2.0])
  assert lo < 2.0 < hi
  with pytest.raises(ValueError, match="no finite values"):
    plots.limits([float("inf")])


def test_axes_map_data_to_pixels_and_clamp():
  img = Image.new("RGB", (200, 100), "white")
  ax = plots.Axes(img, (10, 10, 110, 90), (1.0, 100.0), (0.0, 1.0), xlog=True)
  assert ax.xy(1.0, 0.0) == (10, 90) and ax.xy(100.0, 1.0) == (110, 10)
  assert ax.xy(10.0, 0.5) == pytest.approx((60, 50))  # the middle of a log axis is 10
  assert ax.xy(1e6, 2.0) == (110, 10)  # outside: on the edge


def test_line_plot_breaks_lines_at_non_finite_points():
  x = np.arange(10.0)
  y = np.where(x == 5, np.nan, x)
  img = plots.line_plot({"a": (x, y)}, size=(300, 200))
  assert img.shape == (200, 300, 3) and img.dtype == np.uint8
  _, xs = colour_pixels(img, plots.COLORS[0])
  gaps = np.diff(np.unique(xs))  # points are ~24 px apart: one gap of two spacings, at x = 5
  assert (gaps > 30).sum() == 1 and gaps.max() < 60
  with pytest.raises(ValueError, match="no finite points"):
    plots.line_plot({"a": ([0, 1], [np.nan, np.nan])})


def test_loss_curve_draws_raw_and_smoothed_falling_lines():
  steps = np.arange(10, 1001, 10)
  img = plots.loss_curve(steps, 1.0 / steps**0.5, size=(400, 250))
  assert img.shape == (250, 400, 3)
  colors = {tuple(c) for c in img.reshape(-1, 3)}
  assert plots.COLORS[0] in colors and plots.COLORS[1] in colors  # raw and smoothed
  # The curve falls: the raw line's pixels are higher on the left than on the right.
  ys, xs = colour_pixels(img[:, :300], plots.COLORS[0])  # left of the legend
  left, right = ys[xs < np.percentile(xs, 20)].mean(), ys[xs > np.percentile(xs, 80)].mean()
  assert left < right
  few = plots.loss_curve([1, 2, 3], [1.0, 0.5, np.nan])  # too few rows to smooth
  assert plots.COLORS[1] not in {tuple(c) for c in few.reshape(-1, 3)}
  with pytest.raises(ValueError, match="no finite 'loss'"):
    plots.loss_curve([1, 2], [np.nan, np.inf])


def test_smooth_is_centred_and_ignores_nan():
  v = np.array([0.0, 0.0, 3.0, 0.0, 0.0, np.nan, 6.0])
  out = plots.smooth(v, 3)
  np.testing.assert_allclose(out[:5], [0.0, 1.0, 1.0, 1.0, 0.0])
  assert out[5] == pytest.approx(3.0) and out[6] == pytest.approx(6.0)


def test_quality_plot_one_line_per_sampler_and_the_floor():
  res = [
    {"sampler": "ddim", "nfe": 10, "fd": 5.0},
    {"sampler": "ddim", "nfe": 50, "fd": 2.0},
    {"sampler": "heun", "nfe": 19, "fd": 3.0},
    {"sampler": "heun", "nfe": 39, "fd": None},
  ]
  img = plots.quality_plot(res, floor=1.0, size=(320, 240))
  assert img.shape == (240, 320, 3)
  colors = {tuple(c) for c in img.reshape(-1, 3)}
  assert {plots.COLORS[0], plots.COLORS[1], plots.COLORS[2]} <= colors
  # The floor is flat at the bottom: its colour's lowest pixels lie below every sampler's.
  floor_y = colour_pixels(img[:, :200], plots.COLORS[2])[0].max()
  assert floor_y > colour_pixels(img[:, :200], plots.COLORS[0])[0].max()
  with pytest.raises(ValueError, match="no results with 'kid'"):
    plots.quality_plot(res, metric="kid")


def test_small_multiples_grid_legends_and_empty_panels():
  line = plots.Line([1, 10, 100], [3.0, 2.0, 1.0], plots.COLORS[3], plots.DASHES[1])
  img = plots.small_multiples(
    [("a", [line]), ("b", []), ("c", [line])],
    xlabel="NFE",
    ylabel="fd",
    xlog=True,
    heading="h",
    legends=[("sampler", [("ddim", (60, 60, 60), plots.DASHES[1])])],
  )
  assert 2 * 380 < img.width < 3 * 380 and img.height > 2 * 270  # 3 panels: 2 a row
  px = np.asarray(img)
  assert (px == plots.COLORS[3]).all(-1).sum() > 50  # dashed lines and their dots
  assert (px == (60, 60, 60)).all(-1).any()  # the legend's line sample


def test_plots_import_no_jax():
  out = run_python(
    ["-c", "import sys, diffusion.plots; sys.exit('jax' in sys.modules)"], timeout=120
  )
  assert out.returncode == 0, out.stderr
