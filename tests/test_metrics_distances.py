"""diffusion.metrics.distances: FD and KID against their closed forms, the Laplacian pyramid."""

import numpy as np
import pytest
import scipy.linalg
import scipy.ndimage

from diffusion.metrics import distances

RNG = np.random.default_rng(0)


def test_frechet_distance_matches_scipy_sqrtm():
  a = RNG.standard_normal((300, 5)) @ RNG.standard_normal((5, 5))
  b = RNG.standard_normal((200, 5)) @ RNG.standard_normal((5, 5)) + 0.5
  s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  root = scipy.linalg.sqrtm(s_a @ s_b).real
  want = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(s_a + s_b - 2 * root)
  assert distances.frechet_distance(a, b) == pytest.approx(want, rel=1e-6)
  assert abs(distances.frechet_distance(a, a)) < 1e-8
  # Fewer vectors than dimensions (as Inception's 2048 with small sets): the Gram form.
  a, b = RNG.standard_normal((30, 64)), RNG.standard_normal((45, 64)) * 1.5 + 0.2
  s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  r_a = scipy.linalg.sqrtm(s_a).real
  root = scipy.linalg.sqrtm(r_a @ s_b @ r_a).real
  want = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(s_a + s_b - 2 * root)
  assert distances.frechet_distance(a, b) == pytest.approx(want, rel=1e-4)
  assert distances.frechet_distance(b, a) == pytest.approx(want, rel=1e-4)
  with pytest.raises(ValueError, match="FD needs"):
    distances.frechet_distance(a[:1], b)


def test_kernel_distance_is_the_unbiased_mmd():
  a, b = RNG.standard_normal((20, 3)), RNG.standard_normal((20, 3)) + 1.0
  k = lambda x, y: (np.dot(x, y) / 3 + 1) ** 3
  n = 20
  xx = sum(k(a[i], a[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
  yy = sum(k(b[i], b[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
  xy = sum(k(a[i], b[j]) for i in range(n) for j in range(n)) / n**2
  # Subsets of all 20 rows are permutations; the estimate does not depend on the order.
  assert distances.kernel_distance(a, b, num_subsets=3) == pytest.approx(xx + yy - 2 * xy)
  per_subset = distances.kernel_distance(a, b, num_subsets=3, max_kernel=0)  # no full kernel
  assert per_subset == pytest.approx(xx + yy - 2 * xy)
  same = distances.kernel_distance(RNG.standard_normal((400, 3)), RNG.standard_normal((400, 3)))
  assert abs(same) < 0.05 < distances.kernel_distance(a, b)


def test_laplacian_pyramid_reconstructs_the_image():
  x = RNG.uniform(0, 255, (2, 16, 16, 3)).astype(np.float32)
  levels = distances.laplacian_pyramid(x, 3)
  assert [lv.shape[1] for lv in levels] == [16, 8, 4]
  rec = levels[-1]
  for lv in levels[-2::-1]:
    rec = distances.upsample(rec, lv.shape) + lv
  np.testing.assert_allclose(rec, x, atol=1e-3)
  # Reconstruction holds for any filter; the filter itself: Karras's 5-tap binomial, mirrored.
  k = np.outer([1, 4, 6, 4, 1], [1, 4, 6, 4, 1])[None, :, :, None] / 256.0
  blur_down = lambda y: scipy.ndimage.convolve(y, k, mode="mirror")[:, ::2, ::2]
  np.testing.assert_allclose(levels[-1], blur_down(blur_down(x)), rtol=1e-5)
  flat = distances.laplacian_pyramid(np.full((1, 16, 16, 3), 77.0, np.float32), 3)
  assert all(np.abs(lv).max() < 1e-4 for lv in flat[:-1])  # no band-pass content
  np.testing.assert_allclose(flat[-1], 77.0, rtol=1e-6)
  assert [distances.pyramid_depth(s) for s in (7, 8, 16, 28, 32, 64)] == [1, 1, 2, 2, 3, 4]


def test_sliced_wasserstein_levels_and_checks():
  a = RNG.integers(0, 256, (6, 16, 16, 3)).astype(np.uint8)
  out = distances.sliced_wasserstein(a, a[::-1], seed=1)
  assert len(out["levels"]) == 2 and out["swd"] == pytest.approx(np.mean(out["levels"]))
  assert out == distances.sliced_wasserstein(a, a[::-1], seed=1)  # deterministic given the seed
  with pytest.raises(ValueError, match="one shape"):
    distances.sliced_wasserstein(a, a[:, :8])
  with pytest.raises(ValueError, match="at least 7x7"):
    distances.sliced_wasserstein(a[:, :6, :6], a[:, :6, :6])
