"""Shard folders: prepare (folder, classfolders, npz), the streamed source, resume, the split over
processes, flat memory, and one-line errors for damaged or empty folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffusion import data
from diffusion.data import prepare, shards
from tests.conftest import ROOT, launch


def _ids(n: int, size: int = 8) -> np.ndarray:
  """uint8 (n, size, size, 3) random images whose top corners hold the index i (flips keep it)."""
  images = np.random.default_rng(n).integers(0, 256, (n, size, size, 3), np.uint8)
  for x in (0, -1):
    images[:, 0, x, 0], images[:, 0, x, 1] = np.arange(n) // 256, np.arange(n) % 256
  return images


def _id_of(images: np.ndarray) -> np.ndarray:
  """(..., H, W, 3) images from `_ids` -> their indices (...)."""
  return images[..., 0, 0, 0].astype(int) * 256 + images[..., 0, 0, 1]


def _npz(tmp: Path, n: int = 300, size: int = 8) -> tuple[Path, np.ndarray, np.ndarray]:
  images, labels = _ids(n, size), np.random.default_rng(1).integers(0, 7, n)
  np.savez(tmp / "x.npz", images=images, labels=labels)
  return tmp / "x.npz", images, labels


def _spec(path: Path, **kw) -> data.DataSpec:
  return data.DataSpec(**{"source": "shards", "path": str(path), "image_size": 8, **kw})


def _stream(ds, start: int, steps: int, **kw) -> list[dict]:
  it = data.train_iterator(ds, global_batch=32, seed=5, start_step=start, random_flip=True, **kw)
  with it:
    return [next(it) for _ in range(steps)]


# --- prepare --------------------------------------------------------------------------------


def test_prepare_npz_round_trips_pixels_labels_and_fingerprint(tmp_path):
  path, images, labels = _npz(tmp_path)
  m = prepare.prepare("npz", str(path), str(tmp_path / "a"), image_size=8, shard_size=64)
  assert m.count == 300 and m.image_shape == (8, 8, 3) and m.num_classes == 7
  assert [c for _, c, _ in m.shards] == [64, 64, 64, 64, 44]
  assert sorted(os.listdir(tmp_path)) == ["a", "x.npz"]  # no temporary folder left
  back = data.load(_spec(tmp_path / "a", eval_fraction=0))
  np.testing.assert_array_equal(back.images, images)
  np.testing.assert_array_equal(back.labels, labels)
  assert back.labels.dtype == np.int32 and back.num_classes == 7
  # The fingerprint hashes the content: equal for the same data, other for one changed pixel.
  again = prepare.prepare("npz", str(path), str(tmp_path / "b"), image_size=8, shard_size=100)
  images[7, 3, 3, 2] ^= 1
  np.savez(path, images=images, labels=labels)
  other = prepare.prepare("npz", str(path), str(tmp_path / "c"), image_size=8)
  assert again.fingerprint == m.fingerprint != other.fingerprint
  # Resized as the npz source resizes (the same conversion code).
  big, _, _ = _npz(tmp_path, n=40, size=13)
  prepare.prepare("npz", str(big), str(tmp_path / "d"), image_size=8, channels=1)
  want = data.load(data.DataSpec(source="npz", path=str(big), image_size=8, channels=1))
  got = data.load(_spec(tmp_path / "d", channels=1))
  assert got.images.shape == (39, 8, 8, 1)
  np.testing.assert_array_equal(got.images, want.images)


def _image_tree(root: Path) -> None:
  """root/<class>/[sub/]NN.png in three classes, 10x12 RGB, and one truncated file."""
  rng = np.random.default_rng(0)
  for c, name in enumerate(["cat", "dog", "emu"]):
    for i in range(7 + c):
      folder = root / name / ("sub" if i % 3 == 0 else "")
      folder.mkdir(parents=True, exist_ok=True)
      pixels = rng.integers(0, 256, (10, 12, 3), np.uint8)
      Image.fromarray(pixels).save(folder / f"{i:02d}.png")
  (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)


def test_prepare_class_folders_and_folders_match_the_folder_source(tmp_path):
  _image_tree(tmp_path / "img")
  m = prepare.prepare("classfolders", str(tmp_path / "img"), str(tmp_path / "s"), image_size=8)
  assert m.count == 24 and m.class_names == ("cat", "dog", "emu") and m.source["skipped"] == 1
  folder_spec = dict(path=str(tmp_path / "img"), image_size=8, eval_fraction=0)
  want = data.load(data.DataSpec(source="folder", cache_dir=str(tmp_path / "c"), **folder_spec))
  got = data.load(_spec(tmp_path / "s", eval_fraction=0))
  np.testing.assert_array_equal(got.images, want.images)  # same decoding, resizing and order
  np.testing.assert_array_equal(got.labels, want.labels)
  assert got.class_names == want.class_names and np.bincount(got.labels).tolist() == [7, 8, 9]
  prepare.prepare("folder", str(tmp_path / "img"), str(tmp_path / "u"), image_size=8)
  flat = data.load(_spec(tmp_path / "u", eval_fraction=0))
  assert flat.labels is None and flat.num_classes == 0
  np.testing.assert_array_equal(flat.images, want.images)
  # Images directly in the root cannot have a class.
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "img" / "top.png")
  with pytest.raises(ValueError, match="lie directly in .*--source folder"):
    prepare.prepare("classfolders", str(tmp_path / "img"), str(tmp_path / "t"), image_size=8)


def test_prepare_reads_a_prepared_tfds_dataset_like_the_tfds_source(tmp_path):
  """tfds.data_source on mock data (this environment has no TensorFlow)."""
  import tensorflow_datasets as tfds

  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    m = prepare.prepare("tfds", "mnist", str(tmp_path / "s"), image_size=16, channels=1)
    spec = dict(name="mnist", image_size=16, channels=1, eval_fraction=0)
    want = data.load(data.DataSpec(source="tfds", cache_dir=str(tmp_path / "c"), **spec))
  assert m.count == 12 and m.class_names == tuple(str(i) for i in range(10))
  got = data.load(_spec(tmp_path / "s", image_size=16, channels=1, eval_fraction=0))
  np.testing.assert_array_equal(got.images, want.images)
  np.testing.assert_array_equal(got.labels, want.labels)
  with pytest.raises(FileNotFoundError, match="is not prepared in .*--file_format array_record"):
    prepare.prepare("tfds", "mnist", str(tmp_path / "t"), image_size=8, data_dir=str(tmp_path))


def test_prepare_is_atomic_and_refuses_to_clobber(tmp_path, monkeypatch):
  path, images, _ = _npz(tmp_path)
  out = tmp_path / "out"
  first = prepare.prepare("npz", str(path), str(out), image_size=8, shard_size=50)
  with pytest.raises(ValueError, match="exists and is not empty"):
    prepare.prepare("npz", str(path), str(out), image_size=8)
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "notes.txt").write_text("keep")
  with pytest.raises(ValueError, match="replaces only a shard folder"):
    prepare.prepare("npz", str(path), str(tmp_path / "mine"), image_size=8, overwrite=True)
  assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"

  # Killed half-way (after two shards): the previous folder is intact and no partial one shows.
  def interrupted(done, total):
    if done >= 100:
      raise KeyboardInterrupt

  monkeypatch.setattr(prepare, "_CHUNK", 50)
  with pytest.raises(KeyboardInterrupt):
    prepare.prepare(
      "npz", str(path), str(out), image_size=8, shard_size=50, overwrite=True, progress=interrupted
    )
  with pytest.raises(KeyboardInterrupt):
    prepare.prepare("npz", str(path), str(tmp_path / "new"), image_size=8, progress=interrupted)
  assert sorted(os.listdir(tmp_path)) == ["mine", "out", "x.npz"]
  assert shards.read_manifest(str(out))[1] == first
  np.testing.assert_array_equal(data.load(_spec(out, eval_fraction=0)).images, images)


def test_prepare_command_line(tmp_path, capsys):
  path, _, _ = _npz(tmp_path, n=20)
  args = ["--source", "npz", "--input", str(path), "--output", str(tmp_path / "s")]
  r = subprocess.run(
    [sys.executable, "-m", "diffusion.data.prepare", *args, "--image_size", "8"],
    cwd=ROOT,
    capture_output=True,
    text=True,
  )
  assert r.returncode == 0 and "--config.data.source=shards" in r.stderr, r.stderr
  assert json.loads((tmp_path / "s" / shards.MANIFEST).read_text())["count"] == 20
  assert prepare.main([*args, "--image_size", "0"]) == 2
  lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert lines == ["error: --image_size must be positive, got 0."]
  assert prepare.main([*args, "--image_size", "8"]) == 2
  assert "exists and is not empty" in capsys.readouterr().err
  fresh = ["--source", "npz", "--input", str(path), "--output", str(tmp_path / "t")]
  assert prepare.main([*fresh, "--image_size", "8", "--channels", "2"]) == 2
  assert "error: --channels must be 1 (grayscale) or 3" in capsys.readouterr().err
  assert prepare.main([*fresh, "--image_size", "8", "--background", "red"]) == 2
  assert "error: --background 'red': give R,G,B" in capsys.readouterr().err
  assert prepare.main([*fresh[:-1], str(path), "--image_size", "8"]) == 2
  assert f"error: --output {path} is a file" in capsys.readouterr().err
  # A run killed with -9 left its hidden temporary folder: the next run deletes it and says so.
  dead = subprocess.run(
    [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True
  )
  leftover = tmp_path / f".t.tmp-{int(dead.stdout)}"
  (leftover / "shards").mkdir(parents=True)
  assert prepare.main([*fresh, "--image_size", "8"]) == 0
  assert f"removed {leftover}" in capsys.readouterr().err and not leftover.exists()


def test_prepare_stopped_by_ctrl_c_exits_75_without_a_traceback(tmp_path, capsys, monkeypatch):
  path, _, _ = _npz(tmp_path, n=20)

  def stop(done, total):
    raise KeyboardInterrupt

  real = prepare.prepare
  monkeypatch.setattr(prepare, "prepare", lambda *a, **k: real(*a, **{**k, "progress": stop}))
  args = ["--source", "npz", "--input", str(path), "--output", str(tmp_path / "s")]
  assert prepare.main([*args, "--image_size", "8"]) == 75
  assert "stopped; nothing was written" in capsys.readouterr().err
  assert sorted(os.listdir(tmp_path)) == ["x.npz"]  # no output, no temporary folder


# --- the streamed source --------------------------------------------------------------------


def test_stream_gives_the_in_ram_batches_and_resumes_exactly(tmp_path):
  path, _, _ = _npz(tmp_path)
  prepare.prepare("npz", str(path), str(tmp_path / "s"), image_size=8, shard_size=64)
  streamed = data.load(_spec(tmp_path / "s"), stream=True)
  assert isinstance(streamed, data.ShardDataset) and len(streamed) == 294  # 2% held out
  whole = _stream(streamed, 0, 30, local_devices=2)  # ~3 epochs
  resumed = _stream(streamed, 17, 13, local_devices=2)  # a fresh iterator started at step 17
  in_ram = data.load(data.DataSpec(source="npz", path=str(path), image_size=8))
  for k, batch in enumerate(whole):
    assert batch["image"].shape == (2, 16, 8, 8, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].shape == (2, 16) and batch["label"].dtype == np.int32
    want = data.batch_at(in_ram, k, global_batch=32, seed=5, local_devices=2, random_flip=True)
    for key in ("image", "label"):
      np.testing.assert_array_equal(batch[key], want[key])
      if k >= 17:
        np.testing.assert_array_equal(resumed[k - 17][key], batch[key])
  assert len({tuple(_id_of(b["image"]).ravel()) for b in whole}) == 30  # the batches differ


def test_stream_resume_reads_no_earlier_batch(tmp_path, monkeypatch):
  path, _, _ = _npz(tmp_path)
  prepare.prepare("npz", str(path), str(tmp_path / "s"), image_size=8)
  ds = data.load(_spec(tmp_path / "s"), stream=True)
  read, real = [], shards.ShardDataset.read
  monkeypatch.setattr(shards.ShardDataset, "read", lambda s, i: read.append(len(i)) or real(s, i))
  first = _stream(ds, 1000, 1, local_devices=1, prefetch=3)[0]  # step 1000: epoch ~108
  assert sum(read) <= 32 * 10  # the batch and at most max(prefetch, readers <= 8) ahead
  want = data.batch_at(ds, 1000, global_batch=32, seed=5, local_devices=1, random_flip=True)
  np.testing.assert_array_equal(first["image"], want["image"])


def test_two_processes_read_disjoint_halves_of_the_global_batch(tmp_path, monkeypatch):
  path, _, _ = _npz(tmp_path, n=320)  # 10 batches an epoch: no batch spans two epochs
  prepare.prepare("npz", str(path), str(tmp_path / "s"), image_size=8)
  ds = data.load(_spec(tmp_path / "s", eval_fraction=0), stream=True)
  # prefetch 0 here too: grain's close() does not wait for reader threads, which could still
  # be reading ahead when `read` is patched below (seen on a loaded machine).
  one = _stream(ds, 3, 10, local_devices=4, process_index=0, process_count=1, prefetch=0)
  read, real = [], shards.ShardDataset.read
  monkeypatch.setattr(shards.ShardDataset, "read", lambda s, i: read.append(i.copy()) or real(s, i))
  parts = [
    _stream(ds, 3, 10, local_devices=2, process_index=p, process_count=2, prefetch=0)
    for p in (0, 1)
  ]
  ids = [[_id_of(b["image"]).ravel() for b in part] for part in parts]
  for k in range(10):
    assert not set(ids[0][k]) & set(ids[1][k]) and len(set(ids[0][k])) == 16
    union = np.concatenate([parts[0][k]["image"], parts[1][k]["image"]])
    np.testing.assert_array_equal(union, one[k]["image"])  # (4, 8, ...) = process 0 then 1
    np.testing.assert_array_equal(
      np.concatenate([parts[0][k]["label"], parts[1][k]["label"]]), one[k]["label"]
    )
  # Each process read exactly its own 16 examples per step (prefetch 0: nothing ahead).
  assert [len(i) for i in read] == [16] * 20
  for k in range(10):  # the records read = the ids of the images returned
    assert set(read[k]) == set(ids[0][k]) and set(read[10 + k]) == set(ids[1][k])


_SIZE, _SMALL, _LARGE = 64, 500, 20_000  # 6 MiB and 234 MiB of pixels
_RSS = textwrap.dedent(
  f"""
  import sys
  from diffusion import data

  def hwm_mb():
    for line in open("/proc/self/status"):
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024

  out = []
  for path in sys.argv[2:]:
    spec = data.DataSpec(source="shards", path=path, image_size={_SIZE}, eval_fraction=0)
    if sys.argv[1] == "stream":
      ds = data.load(spec, stream=True)
      it = data.train_iterator(ds, global_batch=64, seed=0, local_devices=1, prefetch=4)
      for _ in range({_LARGE} // 64):  # a full epoch of the large set, many of the small one
        next(it)
      it.close()
    else:
      ds = data.load(spec)
      for k in range(len(ds) // 64):
        data.batch_at(ds, k, global_batch=64, seed=0, local_devices=1)
    out.append(hwm_mb())
    del ds
  print(*out)
  """
)


def _write(folder: Path, n: int) -> None:
  """n random (_SIZE, _SIZE, 3) examples as a shard folder, written a chunk at a time."""
  folder.mkdir()
  shape = (_SIZE, _SIZE, 3)
  writer = shards.ShardWriter(folder, shape, 5000)
  chunk = np.random.default_rng(n).integers(0, 256, (2000, *shape), np.uint8)  # reused: faster
  for start in range(0, n, 2000):
    m = min(2000, n - start)
    writer.add(chunk[:m], np.arange(start, start + m) % 10)
  fingerprint = writer.close()
  classes = tuple("0123456789")
  manifest = shards.Manifest(n, shape, True, 10, classes, tuple(writer.shards), fingerprint)
  (folder / shards.MANIFEST).write_text(manifest.to_json())


def test_streaming_memory_stays_flat_in_the_dataset_size(tmp_path):
  """Peak RSS (VmHWM) after a small set, then after one 40x larger (234 MiB, more than the whole
  streaming process): flat when streamed, up by at least the dataset's size in RAM (which shows
  that the measurement can fail)."""
  _write(tmp_path / "small", _SMALL)
  _write(tmp_path / "large", _LARGE)
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  args = [str(tmp_path / "small"), str(tmp_path / "large")]
  procs = {
    mode: subprocess.Popen(
      [sys.executable, "-c", _RSS, mode, *args],
      env=env,
      cwd=ROOT,
      stdout=subprocess.PIPE,
      text=True,
    )
    for mode in ("stream", "ram")
  }
  (s_small, s_large), (r_small, r_large) = (
    [float(v) for v in procs[m].communicate(timeout=120)[0].split()] for m in ("stream", "ram")
  )
  size_mb = (_LARGE - _SMALL) * _SIZE * _SIZE * 3 / 2**20
  print(f"VmHWM MiB: stream {s_small:.0f} -> {s_large:.0f}, in RAM {r_small:.0f} -> {r_large:.0f}")
  assert s_large - s_small < 0.1 * size_mb  # flat: < 23 MiB for 228 MiB more data
  assert r_large - r_small > 0.9 * size_mb  # the in-RAM path holds it all


# --- errors ---------------------------------------------------------------------------------


def test_damaged_empty_or_wrong_shard_folders_are_one_line_errors(tmp_path):
  path, _, _ = _npz(tmp_path, n=100)
  good = tmp_path / "good"
  prepare.prepare("npz", str(path), str(good), image_size=8, shard_size=40)

  def copy(name: str) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    for f in good.iterdir():
      (folder / f.name).write_bytes(f.read_bytes())
    return folder

  (tmp_path / "empty").mkdir()
  unfinished = copy("unfinished")
  (unfinished / shards.MANIFEST).unlink()
  garbled = copy("garbled")
  (garbled / shards.MANIFEST).write_text("{not json")
  missing = copy("missing")
  (missing / "shard-00001.array_record").unlink()
  truncated = copy("truncated")
  with open(truncated / "shard-00002.array_record", "r+b") as f:
    f.truncate(1000)
  cases = {
    "": (ValueError, "config.data.path is empty"),
    str(tmp_path / "nope"): (FileNotFoundError, "does not exist"),
    str(path): (ValueError, "is a file, not a shard folder"),
    str(tmp_path / "empty"): (ValueError, "no manifest.json and no shards"),
    str(unfinished): (ValueError, "3 shard file(s) but no manifest.json: an unfinished"),
    str(garbled): (ValueError, "damaged: manifest.json is unreadable"),
    str(missing): (ValueError, "damaged: shard-00001.array_record is missing"),
    str(truncated): (ValueError, "shard-00002.array_record has 1000 bytes"),
  }
  for where, (kind, message) in cases.items():
    with pytest.raises(kind) as e:
      data.load(data.DataSpec(source="shards", path=where, image_size=8), stream=True)
    text = str(e.value)
    assert message in text and "\n" not in text and (where in text or not where), text
    assert "diffusion.data.prepare" in text or kind is FileNotFoundError or where == str(path)
  with pytest.raises(ValueError, match=r"hold 8x8x3 images .*image_size=8 .*--image_size 16"):
    data.load(_spec(good, image_size=16))
  # Damage inside a shard that keeps its size shows when read, naming the folder.
  damaged = copy("damaged")
  raw = bytearray((damaged / "shard-00000.array_record").read_bytes())
  raw[:2000] = bytes(2000)
  (damaged / "shard-00000.array_record").write_bytes(bytes(raw))
  with pytest.raises(ValueError, match=f"{damaged} is damaged: reading records failed"):
    data.load(_spec(damaged))


def test_launch_with_an_empty_shard_folder_is_one_line_exit_2(tmp_path):
  (tmp_path / "empty").mkdir()
  r = launch(
    tmp_path / "run", "--config.data.source=shards", f"--config.data.path={tmp_path}/empty"
  )
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
  errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and f"{tmp_path}/empty has no manifest.json" in errors[0], r.stderr
  assert not (tmp_path / "run").exists()
