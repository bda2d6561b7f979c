"""data/folder.py: image folders, their labels, cache and skipped files."""

import os

import numpy as np
import PIL.features
import PIL.Image
import pytest
from conftest import data_spec

from diffusion import data
from diffusion.data import folder as folder_lib


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
  cfg = data_spec(source="folder", path=str(tmp_path), background=(0, 0, 255), eval_fraction=0.0)
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
    data_spec(
      source="folder", path=str(tmp_path), channels=1, labels=False, image_size=8, eval_fraction=0.0
    )
  )
  assert gray.images.shape == (5, 8, 8, 1) and gray.labels is None and gray.num_classes == 0


def test_folder_cache_skips_decoding_and_tracks_changes(tmp_path, monkeypatch):
  _write_folder(tmp_path)
  cfg = data_spec(source="folder", path=str(tmp_path), eval_fraction=0.0)
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
  third = data.load(data_spec(source="folder", path=str(tmp_path), eval_fraction=0.0, image_size=8))
  assert third.images.shape == (5, 8, 8, 3)  # other options: another cache entry


def test_folder_errors_name_the_folder(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    data.load(data_spec(source="folder", path=str(tmp_path / "missing")))
  with pytest.raises(ValueError, match=f"no readable image in {tmp_path}.*no file with an image"):
    data.load(data_spec(source="folder", path=str(tmp_path)))
  (tmp_path / "notes.txt").write_text("x")
  with pytest.raises(ValueError, match="notes.txt.*config.data.path"):
    data.load(data_spec(source="folder", path=str(tmp_path)))
  with pytest.raises(ValueError, match="config.data.path is empty"):
    data.load(data_spec(source="folder", path=""))


def test_folder_top_level_images_are_unlabelled(tmp_path):
  (tmp_path / "x").mkdir()
  for p in (tmp_path / "top.png", tmp_path / "x" / "in.png"):
    PIL.Image.new("RGB", (8, 8)).save(p)
  ds = folder_lib.load_folder(data_spec(source="folder", path=str(tmp_path), image_size=8))
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
    data_spec(
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
    data_spec(
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
      data_spec(
        source="folder", path=str(tmp_path), image_size=16, resize=resize, eval_fraction=0.0
      )
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
  cfg = data_spec(source="folder", path=str(tmp_path), image_size=8, eval_fraction=0.0)
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
  cfg = data_spec(source="folder", path=str(tmp_path), image_size=8, eval_fraction=0.0)
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
  ds = data.load(data_spec(source="folder", path=str(tmp_path), image_size=8, eval_fraction=0.0))
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
  cfg = data_spec(source="folder", path=str(tmp_path), image_size=8, eval_fraction=0.0)
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
    data.load(data_spec(source="folder", path=str(tmp_path / "images.npz")))
  (tmp_path / "a.png").write_bytes(b"x")
  with pytest.raises(ValueError, match=r"a.png' is a file, not a folder; set it to the folder"):
    data.load(data_spec(source="folder", path=str(tmp_path / "a.png")))
  with pytest.raises(
    FileNotFoundError, match=f"{tmp_path / 'nope'} does not exist; set config.data.path"
  ):
    data.load(data_spec(source="folder", path=str(tmp_path / "nope")))
  (tmp_path / "empty").mkdir()
  with pytest.raises(
    ValueError,
    match=f"no readable image in {tmp_path / 'empty'}: found no "
    "file with an image extension.*point config.data.path",
  ):
    data.load(data_spec(source="folder", path=str(tmp_path / "empty")))


class _Marker:
  """Unpickling one appends to `unpickled`: proof that a file was unpickled."""

  unpickled: list = []

  def __reduce__(self):
    return (_Marker.unpickled.append, ("unpickled",))


def test_caches_holding_pickles_are_rebuilt_never_unpickled(tmp_path, caplog):
  PIL.Image.new("RGB", (8, 8), (5, 6, 7)).save(tmp_path / "a.png")
  cfg = data_spec(source="folder", path=str(tmp_path), image_size=8, eval_fraction=0.0)
  data.load(cfg)
  (cache,) = (tmp_path / ".diffusion_cache").glob("folder-*.npz")
  with np.load(cache, allow_pickle=False) as z:
    arrays = {k: z[k] for k in z.files}
  np.savez(cache, **{**arrays, "images": np.array([_Marker()], dtype=object)})
  ds = data.load(cfg)
  assert (ds.images == (5, 6, 7)).all() and not _Marker.unpickled
  assert f"cache {cache} is unreadable" in caplog.text
