"""diffusion.metrics.distances: FD (of features and of (mu, sigma)), KID, precision/recall and the
Inception Score against closed forms and independent float64 computations; the Laplacian pyramid."""

import numpy as np
import pytest
import scipy.linalg
import scipy.ndimage
import scipy.spatial.distance
import scipy.special

from diffusion.metrics import distances, reference

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


def test_frechet_distance_of_gaussians_closed_form_and_reference_stats(tmp_path):
  # Commuting covariances Q diag(a) Q^T, Q diag(b) Q^T: FD = |mu_a - mu_b|^2 + sum (a^.5 - b^.5)^2.
  q = np.linalg.qr(RNG.standard_normal((6, 6)))[0]
  va, vb = RNG.uniform(0.1, 3.0, 6), RNG.uniform(0.1, 3.0, 6)
  mu_a, mu_b = RNG.standard_normal(6), RNG.standard_normal(6)
  s_a, s_b = (q * va) @ q.T, (q * vb) @ q.T
  want = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(va) - np.sqrt(vb)) ** 2)
  assert distances.frechet_distance((mu_a, s_a), (mu_b, s_b)) == pytest.approx(want, rel=1e-10)
  assert abs(distances.frechet_distance((mu_a, s_a), (mu_a, s_a))) < 1e-10
  # Features against statistics loaded from the published format: as features against features.
  a = RNG.standard_normal((300, 5)) @ RNG.standard_normal((5, 5))
  b = RNG.standard_normal((200, 5)) @ RNG.standard_normal((5, 5)) + 0.5
  reference.save_npz(str(tmp_path / "ref.npz"), b.mean(0), np.cov(b, rowvar=False))
  ref = reference.load_npz(str(tmp_path / "ref.npz"))
  s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  want = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(
    s_a + s_b - 2 * scipy.linalg.sqrtm(s_a @ s_b).real
  )
  assert distances.frechet_distance(a, ref) == pytest.approx(want, rel=1e-8)
  assert distances.frechet_distance(ref, a) == pytest.approx(want, rel=1e-8)
  with pytest.raises(ValueError, match="one dimension"):
    distances.frechet_distance(ref, (np.zeros(4), np.eye(4)))
  with pytest.raises(ValueError, match=r"sigma \(D, D\)"):
    distances.frechet_distance(ref, (np.zeros(5), np.eye(4)))


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


def on_a_line(positions, dim=4, seed=1):
  """Points at `positions` along a random direction of R^dim, shifted: pairwise distances are the
  differences of the positions."""
  rng = np.random.default_rng(seed)
  u = rng.standard_normal(dim)
  return np.outer(positions, u / np.linalg.norm(u)) + rng.standard_normal(dim)


@pytest.mark.parametrize("batch", [1, 3, 2048])
def test_precision_recall_known_answers(batch):
  x = RNG.standard_normal((60, 8))
  assert distances.precision_recall(x, x.copy(), batch=batch) == (1.0, 1.0)
  assert distances.precision_recall(x, x + 100.0, batch=batch) == (0.0, 0.0)
  # By hand (k = 3). Real: 0, 1, ..., 9; radii (3rd nearest other point) 3 at the ends, else 2.
  # Fake: 0, 1, 2, 3.4 and four far points 100..103; fake radii 3.4, 2.4, 2, 3.4 (and 3 far).
  # Precision: 0, 1, 2 are real points, 3.4 is 0.4 from real 3 (radius 2); the far four are out:
  # 4/8. Recall: the ball of radius 3.4 around 3.4 reaches 6.8, so reals 0..6 are in, 7..9 out
  # (7 is 3.6 away): 7/10.
  real = on_a_line(np.arange(10.0))
  fake = on_a_line(np.array([0, 1, 2, 3.4, 100, 101, 102, 103]))
  precision, recall = distances.precision_recall(real, fake, batch=batch)
  assert precision == pytest.approx(0.5, abs=1e-12) and recall == pytest.approx(0.7, abs=1e-12)


def test_precision_recall_matches_brute_force():
  """Against all distances at once (scipy's cdist, float64), on overlapping Gaussians."""
  real, fake = RNG.standard_normal((150, 5)), RNG.standard_normal((110, 5)) + 0.8
  k = 3

  def radii(x):
    d = scipy.spatial.distance.cdist(x, x)
    return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

  inside = lambda x, c: (scipy.spatial.distance.cdist(x, c) <= radii(c)[None]).any(1).mean()
  want = (inside(fake, real), inside(real, fake))
  assert 0.2 < want[0] < 0.95 and 0.2 < want[1] < 0.95  # a case that discriminates
  for batch in (7, 64, 4096):
    got = distances.precision_recall(real, fake, k=k, batch=batch)
    assert got == pytest.approx(want, abs=1e-12)
  with pytest.raises(ValueError, match="more than k vectors"):
    distances.precision_recall(real, fake[:3])
  with pytest.raises(ValueError, match="one size"):
    distances.precision_recall(real, fake[:, :4])


def test_inception_score_closed_forms_and_scipy():
  # Uniform predictions: p(y|x) = p(y), IS 1 on every split.
  assert distances.inception_score(np.zeros((100, 10))) == pytest.approx((1.0, 0.0), abs=1e-12)
  # Confident predictions spread evenly over 5 classes within each of the 10 splits: IS 5.
  labels = np.arange(200) % 5
  mean, std = distances.inception_score(60.0 * np.eye(1008)[labels], splits=10)
  assert mean == pytest.approx(5.0, rel=1e-12) and std < 1e-10
  # Two splits: one class only (IS 1), then 4 classes evenly (IS 4): mean 2.5, std 1.5.
  labels = np.concatenate([np.zeros(8, int), np.arange(8) % 4])
  mean, std = distances.inception_score(60.0 * np.eye(10)[labels], splits=2)
  assert (mean, std) == pytest.approx((2.5, 1.5), rel=1e-12)
  # Random logits against scipy (softmax, KL as entropy(p, q)), uneven consecutive splits.
  import scipy.stats  # here: a slow import for every worker collecting the suite

  logits = RNG.standard_normal((103, 7)) * 3
  p = scipy.special.softmax(logits, axis=1)
  scores = []
  bounds = [0, 25, 51, 77, 103]  # consecutive parts i N // splits .. (i + 1) N // splits
  for part in (p[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)):
    py = part.mean(0)
    scores.append(np.exp(np.mean([scipy.stats.entropy(q, py) for q in part])))
  assert distances.inception_score(logits, splits=4) == pytest.approx(
    (np.mean(scores), np.std(scores)), rel=1e-10
  )
  with pytest.raises(ValueError, match="N >= splits"):
    distances.inception_score(logits[:5], splits=10)
