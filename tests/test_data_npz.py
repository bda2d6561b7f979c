"""data/npz.py: arrays from an .npz file, and the errors that name the fix."""

import os
import pickle
import zipfile

import numpy as np
import pytest
from conftest import data_spec

from diffusion import data


def test_npz_keys_resize_and_errors(tmp_path):
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
  y = np.arange(10) % 3
  np.savez(tmp_path / "d.npz", x=x, y=y)
  ds = data.load(
    data_spec(
      source="npz", path=str(tmp_path / "d.npz"), image_size=16, resize="nearest", eval_fraction=0.0
    )
  )
  assert ds.images.shape == (10, 16, 16, 3) and ds.num_classes == 3
  np.testing.assert_array_equal(ds.images[:, ::2, ::2], x)
  np.testing.assert_array_equal(ds.labels, y)
  np.savez(tmp_path / "nchw.npz", x.transpose(0, 3, 1, 2))  # arr_0, channels first, no labels
  ds = data.load(
    data_spec(source="npz", path=str(tmp_path / "nchw.npz"), image_size=8, eval_fraction=0.0)
  )
  np.testing.assert_array_equal(ds.images, x)
  assert ds.labels is None and ds.num_classes == 0
  np.savez(tmp_path / "bad.npz", pics=x)
  with pytest.raises(
    ValueError,
    match=r"bad.npz has no image array.*'pics'.*np.savez\(path, "
    r"images=images, labels=labels\)",
  ):
    data.load(data_spec(source="npz", path=str(tmp_path / "bad.npz")))
  np.savez(tmp_path / "float.npz", images=x / 255.0)
  with pytest.raises(ValueError, match="uint8"):
    data.load(data_spec(source="npz", path=str(tmp_path / "float.npz")))
  with pytest.raises(FileNotFoundError):
    data.load(data_spec(source="npz", path=str(tmp_path / "none.npz")))


def test_npz_labels_out_of_range_are_clear_errors(tmp_path):
  x = np.zeros((4, 8, 8, 3), np.uint8)

  def load(name, **arrays):
    np.savez(tmp_path / name, images=x, **arrays)
    return data.load(
      data_spec(source="npz", path=str(tmp_path / name), image_size=8, eval_fraction=0.0)
    )

  with pytest.raises(ValueError, match=r"negative labels \(min -1\).*0, 1, \.\.\., num_classes"):
    load("neg.npz", labels=np.array([0, 1, -1, 2]))
  with pytest.raises(ValueError, match=r"label 5 >= num_classes=3.*num_classes=6 or more"):
    load("high.npz", labels=np.array([0, 1, 5, 2]), num_classes=3)
  with pytest.raises(ValueError, match="not all whole numbers"):
    load("float.npz", labels=np.array([0.0, 0.5, 1.0, 2.0]))
  with pytest.raises(ValueError, match="3 labels .* for 4 images"):
    load("short.npz", labels=np.array([0, 1, 2]))
  ds = load("ok.npz", labels=np.array([0, 1, 1, 0]), num_classes=5)  # unused classes are fine
  assert ds.num_classes == 5 and ds.labels.tolist() == [0, 1, 1, 0]
  assert load("whole.npz", labels=np.array([2.0, 0.0, 1.0, 1.0])).num_classes == 3


def test_npz_file_errors_name_the_file_the_cause_and_the_fix(tmp_path):
  """Each broken .npz is one ValueError naming the file, what is wrong and how to save it."""
  x = np.zeros((2, 8, 8, 3), np.uint8)
  fix = r"save it with np\.savez\(path, images=images, labels=labels\)"

  def error(name, match):
    with pytest.raises(ValueError, match=f"{tmp_path / name}.*{match}") as info:
      data.load(data_spec(source="npz", path=str(tmp_path / name), image_size=8, eval_fraction=0.0))
    return str(info.value)

  np.savez(tmp_path / "objects.npz", images=np.array([x[0], None], dtype=object))
  error(
    "objects.npz",
    rf"\['images'\] holds pickled Python objects \(dtype object\), which are "
    rf"never loaded; {fix}",
  )
  np.savez(tmp_path / "object_labels.npz", images=x, labels=np.array(["cat", 1], dtype=object))
  error("object_labels.npz", r"\['labels'\] holds pickled Python objects")
  (tmp_path / "garbage.npz").write_text("hello, not numpy")
  msg = error(
    "garbage.npz",
    rf"not an .npz file \(a zip archive of .npy arrays\): it starts "
    rf"with b'hello, n'; {fix}",
  )
  assert "pickle" not in msg  # not a pickle, whatever np.load would guess
  (tmp_path / "empty.npz").write_bytes(b"")
  error("empty.npz", rf"is empty \(0 bytes\); {fix}")
  (tmp_path / "pickle.npz").write_bytes(pickle.dumps({"images": x}))
  error("pickle.npz", r"a Python pickle, not an .npz archive \(pickles are never loaded\)")
  with open(tmp_path / "single.npz", "wb") as f:
    np.save(f, x)
  error("single.npz", rf"a single .npy array, not an .npz archive of named arrays; {fix}")
  np.savez(tmp_path / "whole.npz", images=x)
  raw = (tmp_path / "whole.npz").read_bytes()
  (tmp_path / "truncated.npz").write_bytes(raw[: len(raw) // 2])
  error("truncated.npz", rf"a damaged zip archive \(BadZipFile: .*\); {fix}")
  flipped = bytearray(raw)
  flipped[len(raw) // 2] ^= 0xFF  # inside the stored image data: a CRC mismatch when read
  (tmp_path / "flipped.npz").write_bytes(bytes(flipped))
  error("flipped.npz", rf"\['images'\] is damaged \(BadZipFile: Bad CRC-32.*\); {fix}")
  with zipfile.ZipFile(tmp_path / "raw.npz", "w") as zf:
    zf.writestr("images", b"not an array")
  error("raw.npz", rf"\['images'\] is not a NumPy array.*{fix}")
  np.savez(tmp_path / "flat.npz", images=np.zeros(5, np.uint8))
  error("flat.npz", r"\['images'\] has shape \(5,\); expected \(N, H, W, C\)")
  np.savez(tmp_path / "five.npz", images=np.zeros((2, 8, 8, 5), np.uint8))
  error("five.npz", r"\['images'\] has shape \(2, 8, 8, 5\); expected .*C = 1, 2, 3 or 4")
  np.savez(tmp_path / "strings.npz", images=np.full((2, 8, 8, 3), "a"))
  error("strings.npz", r"\['images'\] is <U1; expected uint8 in \[0, 255\]")
  np.savez(tmp_path / "classes.npz", images=x, labels=[0, 1], num_classes=[2, 3])
  error("classes.npz", r"\['num_classes'\] is int64 \(2,\); save one whole number")


def test_npz_path_errors_name_the_path_and_the_fix(tmp_path):
  with pytest.raises(
    FileNotFoundError,
    match=f"{tmp_path / 'none.npz'} does not exist; set config.data.path to a .npz",
  ):
    data.load(data_spec(source="npz", path=str(tmp_path / "none.npz")))
  with pytest.raises(
    ValueError, match=f"'{tmp_path}' is a folder, not a .npz file.*source='folder'"
  ):
    data.load(data_spec(source="npz", path=str(tmp_path)))
  with pytest.raises(ValueError, match="config.data.path is empty: set it to a .npz"):
    data.load(data_spec(source="npz", path=""))
  os.mkfifo(tmp_path / "pipe.npz")
  with pytest.raises(ValueError, match="pipe.npz' is not a regular file"):
    data.load(data_spec(source="npz", path=str(tmp_path / "pipe.npz")))
