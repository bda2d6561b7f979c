"""Data sources (folder, npz, sprites) and the batch pipeline."""

import ast
import dataclasses
import importlib
import json
import os
import pickle
import threading
import zipfile
from pathlib import Path

import jax
import numpy as np
import PIL.features
import PIL.Image
import pytest

from configs.default import get_config
from diffusion import data
from diffusion.data import folder as folder_lib
from diffusion.data import sprites


def _cfg(**overrides) -> data.DataSpec:
  """config.data with `overrides`, as callers pass it: DataSpec(**config.data.to_dict())."""
  cfg = get_config().data
  cfg.update(overrides)
  return data.DataSpec(**cfg.to_dict())


# --- DataSpec and the module layout ---------------------------------------------------------

_DATA_DIR = Path(data.__file__).parent


def test_data_spec_mirrors_config_data():
  cfg = get_config().data
  assert {f.name for f in dataclasses.fields(data.DataSpec)} == set(cfg.keys())
  assert data.DataSpec(**cfg.to_dict()) == data.DataSpec()  # same defaults
  # config.json gives lists: background becomes one hashable tuple of ints again.
  spec = data.DataSpec(**json.loads(json.dumps(cfg.to_dict())))
  assert spec == data.DataSpec() and spec.background == (255, 255, 255) and hash(spec)
  assert data.DataSpec(background=[0, 1.0, np.uint8(2)]).background == (0, 1, 2)
  for name in ("cifar10", "fashion_mnist", "folder", "mnist", "sprites"):  # every shipped config
    config = importlib.import_module(f"configs.{name}").get_config()
    assert data.DataSpec(**config.data.to_dict()).source == config.data.source
  with pytest.raises(TypeError, match="image_sise"):
    data.DataSpec(**cfg.to_dict(), image_sise=32)
  with pytest.raises(ValueError, match="background must be 3"):
    data.DataSpec(background=(0, 0))
  with pytest.raises(ValueError, match=r"\[0, 255\]"):
    data.DataSpec(background=(0, 0, 256))
  with pytest.raises(dataclasses.FrozenInstanceError):
    spec.path = "x"  # type: ignore[misc]
  with pytest.raises(TypeError, match=r"DataSpec\(\*\*config.data.to_dict\(\)\)"):
    data.load(cfg)  # a ConfigDict is refused


def _data_imports(path: Path) -> set[str]:
  """Names of the diffusion.data modules `path` imports, at any depth (lazy imports too), and
  the top-level names of every other import."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    names = (
      [a.name for a in node.names]
      if isinstance(node, ast.Import)
      else [node.module]
      if isinstance(node, ast.ImportFrom) and node.module
      else []
    )
    if isinstance(node, ast.ImportFrom) and node.module == "diffusion.data":
      names = [f"diffusion.data.{a.name}" for a in node.names]
    for name in names:
      found.add(name.split(".")[2] if name.startswith("diffusion.data.") else name.split(".")[0])
  return found


def test_data_modules_depend_one_way_and_never_see_a_config_dict():
  modules = {p.stem: _data_imports(p) for p in _DATA_DIR.glob("*.py") if p.stem != "__init__"}
  graph = {m: deps & set(modules) for m, deps in modules.items()}
  assert not graph["dataset"] and not graph["cache"] and not graph["images"]  # the bottom
  for source in ("folder", "npz", "sprites", "tfds_source"):
    assert "loader" not in graph[source] and not graph[source] & {"folder", "npz", "tfds_source"}
  done: set[str] = set()

  def visit(m: str, path: tuple[str, ...]) -> None:
    assert m not in path, f"import cycle: {' -> '.join((*path, m))}"
    if m not in done:
      for dep in graph[m]:
        visit(dep, (*path, m))
      done.add(m)

  for m in graph:
    visit(m, ())
  assert not any("ml_collections" in deps for deps in modules.values())
  assert "ml_collections" not in _data_imports(_DATA_DIR / "__init__.py")
  assert set(data.__all__) == {
    "SOURCES",
    "DataSpec",
    "Dataset",
    "Prefetcher",
    "ShardDataset",
    "batch_at",
    "check_batch",
    "holdout_indices",
    "load",
    "normalize",
    "to_uint8",
    "train_iterator",
    "write_cache",
  }
  assert all(hasattr(data, name) for name in data.__all__)
  assert sorted(data.SOURCES) == ["folder", "latents", "npz", "shards", "sprites", "tfds"]


def test_every_np_load_refuses_pickles():
  """Every np.load under diffusion/data says allow_pickle=False itself (no reliance on the
  default), so no file is ever unpickled."""
  calls = []
  for path in _DATA_DIR.glob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "load"
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id in ("np", "numpy")
      ):
        kw = {k.arg: k.value for k in node.keywords}
        ok = isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value is False
        calls.append((f"{path.name}:{node.lineno}", ok))
  assert calls and all(ok for _, ok in calls), calls


# --- sprites -------------------------------------------------------------------------------


def test_sprites_deterministic_per_seed():
  a, la = sprites.generate(400, seed=0)
  b, lb = sprites.generate(400, seed=0)
  c, _ = sprites.generate(400, seed=1)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(la, lb)
  assert (a != c).any(axis=(1, 2, 3)).mean() > 0.95  # a new seed redraws (nearly) every sprite


def test_sprites_varied_balanced_pixel_art():
  imgs, labels = sprites.generate(2000, seed=0)
  assert imgs.shape == (2000, 16, 16, 3) and imgs.dtype == np.uint8 and labels.dtype == np.int32
  counts = np.bincount(labels, minlength=len(sprites.CLASSES))
  assert len(counts) == len(sprites.CLASSES) >= 6 and counts.max() - counts.min() <= 1
  assert len(np.unique(imgs.reshape(len(imgs), -1), axis=0)) >= 1990  # nearly all distinct
  packed = imgs.astype(np.int32) @ np.array([1 << 16, 1 << 8, 1])  # (n, 16, 16) colour codes
  colours = np.array([len(np.unique(p)) for p in packed])
  assert np.median(colours) >= 6 and colours.max() <= 16  # several colours, a limited palette
  # A plain background: the four corners share its colour and it fills most of the border.
  bg = packed[:, :1, :1]
  corners = packed[:, [0, 0, -1, -1], [0, -1, 0, -1]]
  assert (corners == bg[:, 0]).all()
  border = np.concatenate([packed[:, 0], packed[:, -1], packed[:, :, 0], packed[:, :, -1]], 1)
  assert (border == bg[:, 0]).mean(1).min() > 0.6 and (border == bg[:, 0]).mean() > 0.9
  coverage = (packed != bg).mean(axis=(1, 2))
  assert 0.1 < coverage.min() and coverage.max() < 0.9  # the sprite is neither tiny nor full
  # Classes differ in shape: their mean foreground masks are far apart.
  masks = np.stack(
    [(packed[labels == k] != bg[labels == k]).mean(0) for k in range(len(sprites.CLASSES))]
  )
  dists = np.abs(masks[:, None] - masks[None]).mean(axis=(2, 3))
  assert dists[~np.eye(len(masks), dtype=bool)].min() > 0.05


def test_sprites_source_resizes_nearest_and_holds_out_eval():
  cfg = _cfg(source="sprites", num_sprites=300, image_size=32, channels=1, eval_fraction=0.1)
  train, held = data.load(cfg), data.load(cfg, split="eval")
  assert train.images.shape == (270, 32, 32, 1) and held.images.shape == (30, 32, 32, 1)
  assert train.num_classes == len(sprites.CLASSES)
  np.testing.assert_array_equal(train.images[:, ::2, ::2], train.images[:, 1::2, 1::2])
  full = sprites.generate(300, 0)[0]
  gray = np.asarray(PIL.Image.fromarray(full[0]).convert("L"))  # reference for example 0
  idx_train, idx_eval = data.holdout_indices(300, 0.1)
  assert not set(idx_train) & set(idx_eval)
  where = train if 0 in idx_train else held
  pos = list(idx_train if 0 in idx_train else idx_eval).index(0)
  np.testing.assert_array_equal(where.images[pos, ::2, ::2, 0], gray)


def test_unknown_source_and_bad_split():
  with pytest.raises(ValueError, match="folder.*npz.*sprites.*tfds"):
    data.load(_cfg(source="lmdb"))
  with pytest.raises(ValueError, match="eval_fraction"):
    data.load(_cfg(num_sprites=50, eval_fraction=0.0), split="eval")


# --- folder --------------------------------------------------------------------------------


def _write_folder(root):
  """cats/: RGB png, JPEG in a nested folder; dogs/: RGBA, palette GIF with a transparent
  index, grayscale, a truncated PNG, a text file named .webp; plus a README.txt."""
  (root / "cats" / "sub").mkdir(parents=True)
  (root / "dogs").mkdir()
  rgb = np.zeros((30, 40, 3), np.uint8)
  rgb[:, :20] = (255, 0, 0)
  rgb[:, 20:] = (0, 255, 0)
  PIL.Image.fromarray(rgb).save(root / "cats" / "a.png")
  PIL.Image.new("RGB", (20, 20), (10, 200, 30)).save(root / "cats" / "sub" / "b.jpg", quality=95)
  rgba = np.zeros((16, 16, 4), np.uint8)
  rgba[:, 8:] = (0, 255, 0, 255)  # left half fully transparent
  PIL.Image.fromarray(rgba).save(root / "dogs" / "c.png")
  pal = PIL.Image.new("P", (16, 16), 0)
  pal.putpalette([0, 0, 0, 255, 255, 0] + [0] * 762)
  pal.paste(1, (0, 8, 16, 16))  # bottom half yellow, top half index 0 = transparent
  pal.save(root / "dogs" / "d.gif", transparency=0)
  PIL.Image.fromarray(np.full((64, 64), 77, np.uint8), "L").save(root / "dogs" / "e.png")
  PIL.Image.new("RGB", (64, 64), (1, 2, 3)).save(root / "dogs" / "broken.png")
  raw = (root / "dogs" / "broken.png").read_bytes()
  (root / "dogs" / "broken.png").write_bytes(raw[: len(raw) // 2])  # truncated
  (root / "dogs" / "fake.webp").write_text("not an image")
  (root / "README.txt").write_text("hello")


def test_folder_modes_labels_and_skips(tmp_path, caplog):
  caplog.set_level("INFO")
  _write_folder(tmp_path)
  cfg = _cfg(source="folder", path=str(tmp_path), background=(0, 0, 255), eval_fraction=0.0)
  ds = data.load(cfg)
  # Sorted: cats/a.png, cats/sub/b.jpg, dogs/c.png, dogs/d.gif, dogs/e.png (2 skipped).
  assert ds.images.shape == (5, 16, 16, 3) and ds.images.dtype == np.uint8
  np.testing.assert_array_equal(ds.labels, [0, 0, 1, 1, 1])
  assert ds.num_classes == 2 and ds.class_names == ("cats", "dogs")
  a, b, c, d, e = ds.images.astype(int)
  assert (a[:, 0] == (255, 0, 0)).all() and (a[:, -1] == (0, 255, 0)).all()  # centre crop
  assert np.abs(b - (10, 200, 30)).max() <= 3  # JPEG
  assert (c[:, :8] == (0, 0, 255)).all() and (c[:, 8:] == (0, 255, 0)).all()  # RGBA on blue
  assert (d[:8] == (0, 0, 255)).all() and (d[8:] == (255, 255, 0)).all()  # palette transparency
  assert (e == 77).all()  # grayscale -> RGB
  assert "skipped 2 unreadable" in caplog.text
  assert "broken.png" in caplog.text and "fake.webp" in caplog.text
  gray = data.load(
    _cfg(
      source="folder", path=str(tmp_path), channels=1, labels=False, image_size=8, eval_fraction=0.0
    )
  )
  assert gray.images.shape == (5, 8, 8, 1) and gray.labels is None and gray.num_classes == 0


def test_folder_cache_skips_decoding_and_tracks_changes(tmp_path, monkeypatch):
  _write_folder(tmp_path)
  cfg = _cfg(source="folder", path=str(tmp_path), eval_fraction=0.0)
  first = data.load(cfg)
  assert list((tmp_path / ".diffusion_cache").glob("folder-*.npz"))
  assert not list((tmp_path / ".diffusion_cache").glob(".tmp-*"))  # renamed into place

  def no_open(*args, **kwargs):
    raise AssertionError("decoded again")

  monkeypatch.setattr(PIL.Image, "open", no_open)
  second = data.load(cfg)  # from the cache: PIL is never asked
  np.testing.assert_array_equal(first.images, second.images)
  np.testing.assert_array_equal(first.labels, second.labels)
  assert second.class_names == first.class_names
  (tmp_path / "cats" / "a.png").touch()  # a changed file (mtime) invalidates the cache:
  with pytest.raises(ValueError, match="no readable image"):  # decoding now fails everywhere
    data.load(cfg)
  monkeypatch.undo()
  third = data.load(_cfg(source="folder", path=str(tmp_path), eval_fraction=0.0, image_size=8))
  assert third.images.shape == (5, 8, 8, 3)  # other options: another cache entry


def test_folder_errors_name_the_folder(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    data.load(_cfg(source="folder", path=str(tmp_path / "missing")))
  with pytest.raises(ValueError, match=f"no readable image in {tmp_path}.*no file with an image"):
    data.load(_cfg(source="folder", path=str(tmp_path)))
  (tmp_path / "notes.txt").write_text("x")
  with pytest.raises(ValueError, match="notes.txt.*config.data.path"):
    data.load(_cfg(source="folder", path=str(tmp_path)))
  with pytest.raises(ValueError, match="config.data.path is empty"):
    data.load(_cfg(source="folder", path=""))


def test_folder_top_level_images_are_unlabelled(tmp_path):
  (tmp_path / "x").mkdir()
  for p in (tmp_path / "top.png", tmp_path / "x" / "in.png"):
    PIL.Image.new("RGB", (8, 8)).save(p)
  ds = folder_lib.load_folder(_cfg(source="folder", path=str(tmp_path), image_size=8))
  assert len(ds) == 2 and ds.labels is None and ds.num_classes == 0


def test_folder_16bit_png_is_scaled_by_its_bit_depth_not_its_values(tmp_path):
  """A 16-bit PNG whose values are all <= 255 is a nearly black image, not an 8-bit one."""
  dark = np.array([[0, 100], [200, 255]], np.uint16)  # max <= 255, as 16-bit: all below 1/256
  bright = np.array([[0, 0x8000], [0xFF00, 65535]], np.uint16)
  PIL.Image.fromarray(dark).save(tmp_path / "a_dark.png")
  PIL.Image.fromarray(bright).save(tmp_path / "b_bright.png")
  # A tRNS entry in a 16-bit PNG marks one 16-bit gray value transparent.
  PIL.Image.fromarray(bright).save(tmp_path / "c_keyed.png", transparency=0x8000)
  with PIL.Image.open(tmp_path / "a_dark.png") as im:
    assert im.mode == "I;16"  # really 16-bit on disk
  ds = data.load(
    _cfg(
      source="folder",
      path=str(tmp_path),
      image_size=2,
      channels=1,
      resize="nearest",
      background=(7, 7, 7),
      eval_fraction=0.0,
    )
  )
  np.testing.assert_array_equal(ds.images[0, ..., 0], [[0, 0], [0, 0]])
  np.testing.assert_array_equal(ds.images[1, ..., 0], [[0, 128], [255, 255]])
  np.testing.assert_array_equal(ds.images[2, ..., 0], [[0, 7], [255, 255]])


def test_folder_reads_real_bmp_and_webp(tmp_path):
  assert PIL.features.check("webp"), "this Pillow cannot write WebP; the test needs it"
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
  PIL.Image.fromarray(rgb).save(tmp_path / "a.bmp")
  PIL.Image.fromarray(rgb[::-1]).save(tmp_path / "b.webp", lossless=True)
  rgba = np.zeros((12, 12, 4), np.uint8)
  rgba[:, 6:] = (10, 20, 30, 255)  # left half transparent
  PIL.Image.fromarray(rgba).save(tmp_path / "c.webp", lossless=True, exact=True)
  ds = data.load(
    _cfg(
      source="folder", path=str(tmp_path), image_size=12, background=(0, 0, 255), eval_fraction=0.0
    )
  )
  assert len(ds) == 3
  np.testing.assert_array_equal(ds.images[0], rgb)
  np.testing.assert_array_equal(ds.images[1], rgb[::-1])
  assert (ds.images[2, :, :6] == (0, 0, 255)).all() and (ds.images[2, :, 6:] == (10, 20, 30)).all()


def test_folder_nearest_keeps_the_pixel_art_palette_and_antialias_blends(tmp_path):
  palette = np.array([(20, 12, 28), (208, 70, 72), (109, 194, 202)], np.uint8)
  art = palette[np.random.default_rng(1).integers(0, 3, (10, 10))]  # 10x10 pixel art
  PIL.Image.fromarray(art).save(tmp_path / "art.png")

  def colours(resize):
    ds = data.load(
      _cfg(source="folder", path=str(tmp_path), image_size=16, resize=resize, eval_fraction=0.0)
    )
    assert ds.images.shape == (1, 16, 16, 3)
    return {tuple(c) for c in ds.images.reshape(-1, 3)}

  assert colours("nearest") == {tuple(c) for c in palette}  # exactly the palette, all of it
  assert len(colours("antialias") - {tuple(c) for c in palette}) >= 10  # blended new colours


def _broken_png(path):
  PIL.Image.new("RGB", (16, 16), (9, 9, 9)).save(path)
  path.write_bytes(path.read_bytes()[:40])  # truncated inside the image data


def test_folder_classes_come_from_decoded_images_only(tmp_path):
  """A class whose every file is unreadable is no class, and an unreadable file directly in the
  folder does not make the folder unlabelled."""
  for name in ("ants", "bees", "cows"):
    (tmp_path / name).mkdir()
  PIL.Image.new("RGB", (8, 8), (200, 0, 0)).save(tmp_path / "ants" / "a.png")
  _broken_png(tmp_path / "bees" / "b1.png")  # bees: nothing readable
  _broken_png(tmp_path / "bees" / "b2.png")
  PIL.Image.new("RGB", (8, 8), (0, 0, 200)).save(tmp_path / "cows" / "c.png")
  cfg = _cfg(source="folder", path=str(tmp_path), image_size=8, eval_fraction=0.0)
  for top in (False, True, True):  # decoded, decoded again (a new file), then from the cache
    if top:
      _broken_png(tmp_path / "top.png")  # unreadable, directly in the folder
    ds = data.load(cfg)
    assert ds.num_classes == 2 and ds.class_names == ("ants", "cows")
    np.testing.assert_array_equal(ds.labels, [0, 1])
    assert ds.images[0, 0, 0, 0] == 200 and ds.images[1, 0, 0, 2] == 200  # label 1 is the cow


def test_folder_skips_and_lists_broken_symbolic_links(tmp_path, caplog):
  """Link loops and dangling links named like images are skipped and listed, not fatal; a
  working link is read; mending a dangling link counts as a change to the folder."""
  caplog.set_level("INFO")
  PIL.Image.new("RGB", (8, 8), (200, 0, 0)).save(tmp_path / "ok.png")
  (tmp_path / "good_link.png").symlink_to("ok.png")
  (tmp_path / "loop.png").symlink_to("loop.png")  # a link to itself
  (tmp_path / "ping.png").symlink_to("pong.png")  # two links to each other
  (tmp_path / "pong.png").symlink_to("ping.png")
  (tmp_path / "dangling.jpg").symlink_to("missing.jpg")
  cfg = _cfg(source="folder", path=str(tmp_path), image_size=8, eval_fraction=0.0)
  for from_cache in (False, True):
    caplog.clear()
    ds = data.load(cfg)
    assert len(ds) == 2 and (ds.images[:, 0, 0] == (200, 0, 0)).all()
    assert ("from the cache" in caplog.text) == from_cache
    assert "skipped 4 unreadable" in caplog.text
    for name in ("loop.png", "ping.png", "pong.png"):
      assert f"{name}: broken symbolic link -> " in caplog.text
    assert "dangling.jpg: broken symbolic link -> missing.jpg (No such file" in caplog.text
  PIL.Image.new("RGB", (8, 8), (0, 0, 200)).save(tmp_path / "missing.jpg")
  assert len(data.load(cfg)) == 4  # decoded again: missing.jpg and the mended link to it


def test_folder_skips_a_fifo_instead_of_blocking(tmp_path, caplog):
  PIL.Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
  os.mkfifo(tmp_path / "pipe.png")  # opening it to read would wait for a writer forever
  ds = data.load(_cfg(source="folder", path=str(tmp_path), image_size=8, eval_fraction=0.0))
  assert len(ds) == 1 and "pipe.png: not a regular file" in caplog.text


def test_folder_that_cannot_be_listed_is_named(tmp_path, monkeypatch, caplog):
  for name in ("a", "b"):
    (tmp_path / name).mkdir()
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / name / "x.png")
  real_scandir, denied = os.scandir, {str(tmp_path / "b")}

  def scandir(path="."):
    if os.fspath(path) in denied:
      raise PermissionError(13, "Permission denied", os.fspath(path))
    return real_scandir(path)

  monkeypatch.setattr(os, "scandir", scandir)  # as for a folder without read permission
  cfg = _cfg(source="folder", path=str(tmp_path), image_size=8, eval_fraction=0.0)
  ds = data.load(cfg)
  assert len(ds) == 1 and ds.class_names == ("a",)
  assert "could not list 1 folder(s)" in caplog.text and f"{tmp_path / 'b'}: Perm" in caplog.text
  denied.add(str(tmp_path))
  with pytest.raises(
    ValueError,
    match=f"no readable image in {tmp_path}.*1 folder.*could not be "
    f"listed.*{tmp_path}: PermissionError: Permission denied",
  ):
    data.load(cfg)


def test_folder_path_errors_name_the_path_and_the_fix(tmp_path):
  (tmp_path / "images.npz").write_bytes(b"x")
  with pytest.raises(ValueError, match=r"images.npz' is a file, not a folder.*source='npz'"):
    data.load(_cfg(source="folder", path=str(tmp_path / "images.npz")))
  (tmp_path / "a.png").write_bytes(b"x")
  with pytest.raises(ValueError, match=r"a.png' is a file, not a folder; set it to the folder"):
    data.load(_cfg(source="folder", path=str(tmp_path / "a.png")))
  with pytest.raises(
    FileNotFoundError, match=f"{tmp_path / 'nope'} does not exist; set config.data.path"
  ):
    data.load(_cfg(source="folder", path=str(tmp_path / "nope")))
  (tmp_path / "empty").mkdir()
  with pytest.raises(
    ValueError,
    match=f"no readable image in {tmp_path / 'empty'}: found no "
    "file with an image extension.*point config.data.path",
  ):
    data.load(_cfg(source="folder", path=str(tmp_path / "empty")))


class _Marker:
  """Unpickling one appends to `unpickled`: proof that a file was unpickled."""

  unpickled: list = []

  def __reduce__(self):
    return (_Marker.unpickled.append, ("unpickled",))


def test_caches_holding_pickles_are_rebuilt_never_unpickled(tmp_path, caplog):
  PIL.Image.new("RGB", (8, 8), (5, 6, 7)).save(tmp_path / "a.png")
  cfg = _cfg(source="folder", path=str(tmp_path), image_size=8, eval_fraction=0.0)
  data.load(cfg)
  (cache,) = (tmp_path / ".diffusion_cache").glob("folder-*.npz")
  with np.load(cache, allow_pickle=False) as z:
    arrays = {k: z[k] for k in z.files}
  np.savez(cache, **{**arrays, "images": np.array([_Marker()], dtype=object)})
  ds = data.load(cfg)
  assert (ds.images == (5, 6, 7)).all() and not _Marker.unpickled
  assert f"cache {cache} is unreadable" in caplog.text


# --- npz -----------------------------------------------------------------------------------


def test_npz_keys_resize_and_errors(tmp_path):
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
  y = np.arange(10) % 3
  np.savez(tmp_path / "d.npz", x=x, y=y)
  ds = data.load(
    _cfg(
      source="npz", path=str(tmp_path / "d.npz"), image_size=16, resize="nearest", eval_fraction=0.0
    )
  )
  assert ds.images.shape == (10, 16, 16, 3) and ds.num_classes == 3
  np.testing.assert_array_equal(ds.images[:, ::2, ::2], x)
  np.testing.assert_array_equal(ds.labels, y)
  np.savez(tmp_path / "nchw.npz", x.transpose(0, 3, 1, 2))  # arr_0, channels first, no labels
  ds = data.load(
    _cfg(source="npz", path=str(tmp_path / "nchw.npz"), image_size=8, eval_fraction=0.0)
  )
  np.testing.assert_array_equal(ds.images, x)
  assert ds.labels is None and ds.num_classes == 0
  np.savez(tmp_path / "bad.npz", pics=x)
  with pytest.raises(
    ValueError,
    match=r"bad.npz has no image array.*'pics'.*np.savez\(path, "
    r"images=images, labels=labels\)",
  ):
    data.load(_cfg(source="npz", path=str(tmp_path / "bad.npz")))
  np.savez(tmp_path / "float.npz", images=x / 255.0)
  with pytest.raises(ValueError, match="uint8"):
    data.load(_cfg(source="npz", path=str(tmp_path / "float.npz")))
  with pytest.raises(FileNotFoundError):
    data.load(_cfg(source="npz", path=str(tmp_path / "none.npz")))


def test_npz_labels_out_of_range_are_clear_errors(tmp_path):
  x = np.zeros((4, 8, 8, 3), np.uint8)

  def load(name, **arrays):
    np.savez(tmp_path / name, images=x, **arrays)
    return data.load(_cfg(source="npz", path=str(tmp_path / name), image_size=8, eval_fraction=0.0))

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
      data.load(_cfg(source="npz", path=str(tmp_path / name), image_size=8, eval_fraction=0.0))
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
    data.load(_cfg(source="npz", path=str(tmp_path / "none.npz")))
  with pytest.raises(
    ValueError, match=f"'{tmp_path}' is a folder, not a .npz file.*source='folder'"
  ):
    data.load(_cfg(source="npz", path=str(tmp_path)))
  with pytest.raises(ValueError, match="config.data.path is empty: set it to a .npz"):
    data.load(_cfg(source="npz", path=""))
  os.mkfifo(tmp_path / "pipe.npz")
  with pytest.raises(ValueError, match="pipe.npz' is not a regular file"):
    data.load(_cfg(source="npz", path=str(tmp_path / "pipe.npz")))


# --- pipeline ------------------------------------------------------------------------------


def _indexed(n, labelled=True):
  """Image i holds i in pixel (0, 0) and an asymmetric pattern (so flips are visible)."""
  imgs = np.zeros((n, 4, 4, 1), np.uint8)
  imgs[:, 0, 0, 0] = np.arange(n)
  imgs[:, 1, 3, 0] = 255
  return data.Dataset(imgs, np.arange(n, dtype=np.int32) if labelled else None, n * labelled)


def _ids(batch):
  return batch["label"].reshape(-1)


def test_batches_shape_and_epochs_are_permutations():
  ds = _indexed(50)
  kw = dict(global_batch=10, seed=3, local_devices=2, process_index=0, process_count=1)
  b = data.batch_at(ds, 0, **kw)
  assert b["image"].shape == (2, 5, 4, 4, 1) and b["image"].dtype == np.uint8
  assert b["label"].shape == (2, 5) and b["label"].dtype == np.int32
  np.testing.assert_array_equal(b["image"][..., 0, 0, 0], b["label"])  # image matches label
  epoch0 = np.concatenate([_ids(data.batch_at(ds, s, **kw)) for s in range(5)])
  epoch1 = np.concatenate([_ids(data.batch_at(ds, s, **kw)) for s in range(5, 10)])
  assert sorted(epoch0) == list(range(50)) and sorted(epoch1) == list(range(50))
  assert (epoch0 != epoch1).any() and (epoch0 != np.arange(50)).any()  # shuffled, per epoch
  other_seed = data.batch_at(ds, 0, **{**kw, "seed": 4})
  assert (_ids(other_seed) != _ids(b)).any()
  # A dataset smaller than the batch still works: the stream wraps into the next epoch.
  tiny = _indexed(3)
  stream = _ids(data.batch_at(tiny, 0, **kw))
  assert sorted(stream[:3]) == [0, 1, 2] and sorted(stream[3:6]) == [0, 1, 2]
  unlabelled = data.batch_at(_indexed(50, labelled=False), 0, **kw)
  assert (unlabelled["label"] == 0).all() and unlabelled["label"].dtype == np.int32


def test_restart_gives_the_same_batches():
  ds = _indexed(37)
  kw = dict(
    global_batch=8, seed=11, local_devices=2, process_index=0, process_count=1, random_flip=True
  )
  with data.train_iterator(ds, **kw, prefetch=3) as it:
    straight = [next(it) for _ in range(12)]
  with data.train_iterator(ds, **kw, start_step=5, prefetch=2) as it:
    resumed = [next(it) for _ in range(7)]
    assert it.next_step == 12
  for a, b in zip(straight[5:], resumed, strict=True):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  without_prefetch = data.train_iterator(ds, **kw, start_step=5, prefetch=0)
  np.testing.assert_array_equal(next(without_prefetch)["image"], straight[5]["image"])


def test_process_shards_are_disjoint_and_cover_the_global_batch():
  ds = _indexed(100)
  common = dict(global_batch=16, seed=5, random_flip=True)
  for step in (0, 7):
    whole = data.batch_at(ds, step, **common, local_devices=4, process_index=0, process_count=1)
    parts = [
      data.batch_at(ds, step, **common, local_devices=2, process_index=p, process_count=2)
      for p in (0, 1)
    ]
    assert parts[0]["image"].shape == (2, 4, 4, 4, 1)
    ids = [set(_ids(p)) for p in parts]
    assert not ids[0] & ids[1] and len(ids[0] | ids[1]) == 16
    # Process p holds the p-th contiguous half of the same global batch, flips included.
    glued = np.concatenate([p["image"].reshape(-1, 4, 4, 1) for p in parts])
    np.testing.assert_array_equal(glued, whole["image"].reshape(-1, 4, 4, 1))


def test_random_flip_mirrors_some_examples():
  ds = _indexed(64)
  kw = dict(global_batch=64, seed=0, local_devices=1, process_index=0, process_count=1)
  plain = data.batch_at(ds, 2, **kw)["image"][0]
  flipped = data.batch_at(ds, 2, **kw, random_flip=True)["image"][0]
  mirrored = (flipped == plain[:, :, ::-1]).all(axis=(1, 2, 3))
  same = (flipped == plain).all(axis=(1, 2, 3))
  assert (mirrored ^ same).all() and 10 < mirrored.sum() < 54


def test_batch_not_divisible_is_a_clear_error():
  ds = _indexed(20)
  with pytest.raises(ValueError, match=r"batch size 10 .* 4 devices .*multiple of 4"):
    data.batch_at(ds, 0, global_batch=10, seed=0, local_devices=2, process_index=0, process_count=2)
  with pytest.raises(ValueError, match="12 .* 8 devices"):
    data.train_iterator(
      ds, global_batch=12, seed=0, local_devices=8, process_index=0, process_count=1
    )


def test_prefetch_thread_stops_and_forwards_errors():
  before = threading.active_count()
  it = data.train_iterator(
    _indexed(10),
    global_batch=2,
    seed=0,
    local_devices=1,
    process_index=0,
    process_count=1,
    prefetch=2,
  )
  next(it)
  it.close()
  assert threading.active_count() == before
  with pytest.raises(StopIteration):
    next(it)

  def make(step):
    if step == 3:
      raise KeyError("boom")
    return {"step": step}

  with data.Prefetcher(make, 0, 2) as it:
    assert [next(it)["step"] for _ in range(3)] == [0, 1, 2]
    with pytest.raises(KeyError, match="boom"):
      next(it)


def test_prefetcher_runs_ahead_of_the_consumer_and_stays_bounded():
  made, events = [], {k: threading.Event() for k in range(6)}

  def make(step):
    made.append(step)
    if step in events:
      events[step].set()
    return {"step": step}

  with data.Prefetcher(make, 0, 3) as it:
    # Before the consumer asks for anything: `depth` batches queued and one more made, waiting.
    assert events[3].wait(timeout=60), f"the prefetch thread made only {made}"
    assert made == [0, 1, 2, 3]  # bounded: the full queue stops it
    assert next(it)["step"] == 0
    assert events[4].wait(timeout=60), f"the prefetch thread made only {made}"
    assert made == [0, 1, 2, 3, 4]  # before the consumer asks for the second batch
    assert [next(it)["step"] for _ in range(2)] == [1, 2]
  made.clear()
  on_demand = data.Prefetcher(make, 5, 0)  # depth 0: nothing is made before it is asked for
  assert made == [] and next(on_demand)["step"] == 5 and made == [5]


def test_normalize_and_to_uint8_round_trip():
  x = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
  y = jax.jit(data.normalize)(x)
  assert y.dtype == np.float32 and float(y.min()) == -1.0 and float(y.max()) == 1.0
  np.testing.assert_array_equal(data.to_uint8(y), x)
  np.testing.assert_array_equal(data.to_uint8(np.array([-3.0, 3.0])), [0, 255])


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
