"""diffusion.metrics.reference: the published (mu, sigma) .npz format, feature moments over
shards against np.cov in float64, partial moments saved and resumed, one-line errors."""

import pickle
import zipfile

import numpy as np
import pytest

from diffusion.metrics import reference

RNG = np.random.default_rng(0)


def features(n, d=6, shift=0.0):
  """Correlated features with a non-zero mean (as pool3 features are)."""
  return RNG.standard_normal((n, d)) @ RNG.standard_normal((d, d)) + 3.0 + shift


def one_line(err):
  text = str(err.value)
  assert "\n" not in text, text
  return text


def test_reference_npz_is_the_published_format(tmp_path):
  f = features(50)
  mu, sigma = f.mean(0), np.cov(f, rowvar=False)
  path = str(tmp_path / "cifar10-32x32.npz")
  reference.save_npz(path, mu.astype(np.float32), sigma, num_images=np.int64(50))
  # Read as the guided-diffusion and EDM evaluators read theirs: plain np.load, keys mu, sigma.
  with np.load(path, allow_pickle=False) as z:
    assert set(z.files) == {"mu", "sigma", "num_images"}
    assert z["mu"].dtype == z["sigma"].dtype == np.float64 and int(z["num_images"]) == 50
    np.testing.assert_array_equal(z["sigma"], sigma)
  got_mu, got_sigma = reference.load_npz(path)
  np.testing.assert_allclose(got_mu, mu, rtol=1e-7)  # saved from float32
  np.testing.assert_array_equal(got_sigma, sigma)
  # A file written by np.savez directly with other entries too (guided-diffusion's reference
  # batches hold the images as arr_0, and mu_s/sigma_s).
  np.savez(tmp_path / "VIRTUAL.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8), mu=mu, sigma=sigma)
  np.testing.assert_array_equal(reference.load_npz(str(tmp_path / "VIRTUAL.npz"))[1], sigma)
  # Written atomically: nothing else is left in the folder.
  assert sorted(p.name for p in tmp_path.iterdir()) == ["VIRTUAL.npz", "cifar10-32x32.npz"]


def test_reference_npz_errors_are_one_line(tmp_path):
  mu, sigma = np.zeros(4), np.eye(4)
  np.savez(tmp_path / "keys.npz", m=mu, s=sigma)
  with pytest.raises(ValueError, match="has no mu, sigma") as err:
    reference.load_npz(str(tmp_path / "keys.npz"))
  assert "it holds m, s" in one_line(err)
  np.savez(tmp_path / "shape.npz", mu=mu, sigma=np.eye(5))
  with pytest.raises(ValueError, match=r"mu \(4,\) and sigma \(5, 5\)") as err:
    reference.load_npz(str(tmp_path / "shape.npz"))
  one_line(err)
  np.savez(tmp_path / "nan.npz", mu=mu + np.nan, sigma=sigma)
  with pytest.raises(ValueError, match="NaN"):
    reference.load_npz(str(tmp_path / "nan.npz"))
  (tmp_path / "pickled.npz").write_bytes(pickle.dumps({"mu": mu, "sigma": sigma}))
  np.savez(tmp_path / "objects.npz", mu=np.array([None], dtype=object), sigma=sigma)
  np.save(tmp_path / "array.npy", mu)
  for name in ("pickled.npz", "objects.npz", "array.npy"):
    with pytest.raises(ValueError, match="not an .npz of plain arrays") as err:
      reference.load_npz(str(tmp_path / name))
    one_line(err)
  (tmp_path / "garbage.npz").write_bytes(b"not a zip at all" * 4)
  with pytest.raises(ValueError, match="not a valid .npz file .*starts with b'not a zi'") as err:
    reference.load_npz(str(tmp_path / "garbage.npz"))
  assert "pickle" not in one_line(err)  # numpy's own message blames pickling
  with pytest.raises(FileNotFoundError, match="does not exist"):
    reference.load_npz(str(tmp_path / "none.npz"))
  with pytest.raises(ValueError, match="object array"):
    reference.save_npz(str(tmp_path / "x.npz"), mu, sigma, note=np.array([{}], dtype=object))
  assert not (tmp_path / "x.npz").exists()


def test_feature_moments_merge_equals_the_whole(tmp_path):
  f = features(301, shift=100.0)  # a large mean: the covariance survives the cancellation
  want_mu, want_sigma = f.mean(0), np.cov(f, rowvar=False)
  halves = reference.FeatureMoments.of(f[:140]).merge(reference.FeatureMoments.of(f[140:]))
  batches = reference.FeatureMoments.zeros(6)
  for i in range(0, 301, 64):  # batches of 64, the last one short, and an empty one
    batches = batches.add(f[i : i + 64])
  batches = batches.add(f[:0])
  for m in (halves, batches):
    mu, sigma = m.mean_cov()
    assert m.count == 301
    np.testing.assert_allclose(mu, want_mu, rtol=1e-12)
    np.testing.assert_allclose(sigma, want_sigma, rtol=1e-9, atol=1e-9 * np.abs(want_sigma).max())
  # Partial moments saved and loaded (an interrupted evaluation), then completed.
  part = reference.FeatureMoments.of(f[:100])
  part.save(str(tmp_path / "partial.npz"), next_batch=np.int64(2))
  resumed = reference.FeatureMoments.load(str(tmp_path / "partial.npz")).add(f[100:])
  assert resumed.count == 301
  np.testing.assert_allclose(resumed.mean_cov()[1], want_sigma, rtol=1e-9)
  # The frozen object is not changed by add or merge.
  assert part.count == 100 and part.add(f).count == 401 and part.count == 100


def test_feature_moments_errors(tmp_path):
  m = reference.FeatureMoments.of(features(3))
  with pytest.raises(ValueError, match="dimension 6 cannot add features"):
    m.add(np.zeros((2, 5)))
  with pytest.raises(ValueError, match="dimensions 6 and 5"):
    m.merge(reference.FeatureMoments.zeros(5))
  with pytest.raises(ValueError, match="at least 2"):
    reference.FeatureMoments.of(features(1)).mean_cov()
  np.savez(tmp_path / "stats.npz", mu=np.zeros(6), sigma=np.eye(6))
  with pytest.raises(ValueError, match="has no count, sum, sum_outer") as err:
    reference.FeatureMoments.load(str(tmp_path / "stats.npz"))
  one_line(err)
  np.savez(tmp_path / "bad.npz", count=np.int64(3), sum=np.zeros(6), sum_outer=np.zeros((6, 5)))
  with pytest.raises(ValueError, match=r"got \(6,\) and \(6, 5\)") as err:
    reference.FeatureMoments.load(str(tmp_path / "bad.npz"))
  one_line(err)
  # A truncated file (a crash mid-write of something that was not atomic).
  m.save(str(tmp_path / "m.npz"))
  data = (tmp_path / "m.npz").read_bytes()
  (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
  assert not zipfile.is_zipfile(tmp_path / "cut.npz")
  with pytest.raises(ValueError, match="not an .npz of plain arrays") as err:
    reference.FeatureMoments.load(str(tmp_path / "cut.npz"))
  one_line(err)
