"""data/cache.py: decoded images written atomically, never raising."""

import numpy as np

from diffusion import data


def test_write_cache_is_atomic_and_never_raises(tmp_path, monkeypatch, caplog):
  path = tmp_path / "sub" / "c.npz"
  data.write_cache(path, images=np.arange(6, dtype=np.uint8).reshape(1, 2, 3))
  with np.load(path) as z:
    np.testing.assert_array_equal(z["images"], np.arange(6).reshape(1, 2, 3))
  assert (path.stat().st_mode & 0o777) == 0o644
  assert sorted(p.name for p in path.parent.iterdir()) == ["c.npz"]  # no temporary left

  def broken_savez(*args, **kwargs):
    raise OSError("disk full")

  monkeypatch.setattr(np, "savez", broken_savez)
  data.write_cache(path, images=np.zeros(3))  # a failed rewrite keeps the old cache and its folder
  assert sorted(p.name for p in path.parent.iterdir()) == ["c.npz"]
  with np.load(path) as z:
    assert z["images"].shape == (1, 2, 3)
  assert "could not write the cache" in caplog.text and "disk full" in caplog.text

  blocker = tmp_path / "file"
  blocker.write_text("x")
  data.write_cache(blocker / "c.npz", images=np.zeros(3))  # parent is a file: a warning, no raise
  assert caplog.text.count("could not write the cache") == 2
