"""A .npz file of images (and optional labels) -> Dataset.

Nothing is ever unpickled: an object array is refused from its .npy header, before its data is
read. Every problem with the file is a ValueError naming the file, what is wrong and the fix.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np
from absl import logging

from diffusion.data import images as images_lib
from diffusion.data.dataset import Dataset, DataSpec

IMAGE_KEYS = ("images", "image", "x", "arr_0")  # first present wins
LABEL_KEYS = ("labels", "label", "y")
_FIX = "save it with np.savez(path, images=images, labels=labels) (uint8 (N, H, W, C) images)"
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip archive (an empty one: end record only)
_HEADERS = {
  (1, 0): np.lib.format.read_array_header_1_0,
  (2, 0): np.lib.format.read_array_header_2_0,
}
_DAMAGE = (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError)


def _open(path: Path) -> np.lib.npyio.NpzFile:
  """The .npz archive at `path`; ValueError naming what the file is instead."""
  try:
    with open(path, "rb") as f:
      head = f.read(8)
  except OSError as e:
    raise ValueError(
      f"{path} cannot be read ({type(e).__name__}: {e.strerror}); check that "
      "it is readable, or set config.data.path to another .npz."
    ) from e
  if not head:
    what = "empty (0 bytes)"
  elif head.startswith(np.lib.format.MAGIC_PREFIX):
    what = "a single .npy array, not an .npz archive of named arrays"
  elif head.startswith(b"\x80"):
    what = "a Python pickle, not an .npz archive (pickles are never loaded)"
  elif not head.startswith(_ZIP_MAGIC):
    what = f"not an .npz file (a zip archive of .npy arrays): it starts with {head!r}"
  else:
    try:
      return np.load(path, allow_pickle=False)
    except _DAMAGE as e:
      what = f"a damaged zip archive ({type(e).__name__}: {e})"
  raise ValueError(f"{path} is {what}; {_FIX}.")


def _array(z: np.lib.npyio.NpzFile, path: Path, key: str) -> np.ndarray:
  """z[key]; ValueError naming the file, the key and the cause when it is no plain array."""
  member = f"{key}.npy"
  if member not in z.zip.namelist():  # np.load hands such members back as raw bytes
    raise ValueError(
      f"{path}[{key!r}] is not a NumPy array (the archive member {key!r} is no .npy file); {_FIX}."
    )
  try:
    with z.zip.open(member) as f:  # the header only: dtype and shape
      header = _HEADERS.get(np.lib.format.read_magic(f))
      dtype = header(f)[2] if header else None  # version 3.0: np.load refuses objects itself
    array = None if dtype is not None and dtype.hasobject else z[key]
  except _DAMAGE as e:
    raise ValueError(f"{path}[{key!r}] is damaged ({type(e).__name__}: {e}); {_FIX}.") from e
  if array is None:
    raise ValueError(
      f"{path}[{key!r}] holds pickled Python objects (dtype {dtype}), which are "
      f"never loaded; {_FIX}, from plain numeric arrays (e.g. "
      "np.asarray(images, np.uint8), np.asarray(labels, np.int64))."
    )
  return array


def _check_labels(
  path: Path, key: str, labels: np.ndarray, n: int, num_classes: int | None
) -> np.ndarray:
  """-> int32 labels; ValueError unless they are n whole numbers in [0, num_classes)."""
  if len(labels) != n:
    raise ValueError(
      f"{path}: {len(labels)} labels ({key!r}) for {n} images; save one label per image."
    )
  if not (np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.bool_)):
    whole = np.issubdtype(labels.dtype, np.floating) and np.all(np.mod(labels, 1) == 0)
    if not whole:
      raise ValueError(
        f"{path}[{key!r}] is {labels.dtype} and not all whole numbers; labels "
        "must be integer class indices 0, 1, ... (save e.g. labels.astype(int))."
      )
  if num_classes is not None and num_classes <= 0:
    raise ValueError(
      f"{path}['num_classes'] is {num_classes}; it must be positive (or leave it "
      "out to use max(labels) + 1)."
    )
  low, high = labels.min(), labels.max()
  if low < 0:
    raise ValueError(
      f"{path}[{key!r}] has negative labels (min {low}); labels must be class "
      "indices 0, 1, ..., num_classes - 1 (e.g. relabel with np.unique(labels, "
      "return_inverse=True)[1]; -1 for 'no label' is not supported)."
    )
  if num_classes is not None and high >= num_classes:
    raise ValueError(
      f"{path}[{key!r}] has label {high} >= num_classes={num_classes} (stored in "
      f"{path.name}); labels must lie in [0, num_classes): fix the labels or save "
      f"num_classes={int(high) + 1} or more."
    )
  if high >= 2**31:
    raise ValueError(
      f"{path}[{key!r}] has label {high}, too large for int32; relabel with "
      "np.unique(labels, return_inverse=True)[1]."
    )
  return labels.astype(np.int32)


def _num_classes(path: Path, value: np.ndarray) -> int:
  if value.size != 1 or not (
    np.issubdtype(value.dtype, np.integer)
    or np.issubdtype(value.dtype, np.floating)
    and value % 1 == 0
  ):
    raise ValueError(
      f"{path}['num_classes'] is {value.dtype} {value.shape}; save one whole "
      "number (num_classes=10), or leave it out to use max(labels) + 1."
    )
  return int(value.reshape(()))


def load_npz(spec: DataSpec) -> Dataset:
  """spec.path -> Dataset. Images: uint8 (N, H, W, C) or (N, H, W) (also accepted:
  channels-first (N, C, H, W), and integer arrays within [0, 255]); resized/converted to
  image_size/channels if they differ. Labels: integers (N,) in [0, num_classes), num_classes
  from a `num_classes` entry or max + 1. A missing file is a FileNotFoundError; anything else
  is a ValueError that names the file and says what to fix."""
  if not spec.path:
    raise ValueError(
      "config.data.path is empty: set it to a .npz file with an `images` array "
      "(--config.data.path=/path/to/data.npz)."
    )
  path = Path(spec.path).expanduser()
  if not path.exists():
    raise FileNotFoundError(
      f"npz file {path} does not exist; set config.data.path to a .npz "
      "with an `images` array (N, H, W, C) uint8."
    )
  if path.is_dir():
    raise ValueError(
      f"config.data.path={str(path)!r} is a folder, not a .npz file; for a folder "
      "of images set config.data.source='folder', else point config.data.path "
      "at the .npz."
    )
  if not path.is_file():
    raise ValueError(
      f"config.data.path={str(path)!r} is not a regular file (a FIFO, socket or "
      "device); point it at a .npz file."
    )
  with _open(path) as z:
    keys = list(z.files)
    image_key = next((k for k in IMAGE_KEYS if k in keys), None)
    if image_key is None:
      raise ValueError(
        f"{path} has no image array: its keys are {keys}; name it one of "
        f"{list(IMAGE_KEYS)}, e.g. np.savez(path, images=images, labels=labels)."
      )
    images = _array(z, path, image_key)
    label_key = next((k for k in LABEL_KEYS if k in keys), None)
    labels = _array(z, path, label_key) if label_key else None
    num_classes = (
      _num_classes(path, _array(z, path, "num_classes")) if "num_classes" in keys else None
    )
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim == 4 and images.shape[1] in (1, 3, 4) and images.shape[-1] not in (1, 3, 4):
    logging.info("%s: images look channels-first %s; transposing to NHWC.", path, images.shape)
    images = images.transpose(0, 2, 3, 1)
  if images.ndim != 4 or images.shape[-1] not in (1, 2, 3, 4):
    raise ValueError(
      f"{path}[{image_key!r}] has shape {images.shape}; expected (N, H, W, C) "
      "with C = 1, 2, 3 or 4 (gray, gray + alpha, RGB, RGBA), or (N, H, W); save "
      "images of such a shape."
    )
  if not len(images):
    raise ValueError(
      f"{path}[{image_key!r}] holds no images (shape {images.shape}); save at least one."
    )
  if images.dtype != np.uint8:
    numeric = np.issubdtype(images.dtype, np.integer) or np.issubdtype(images.dtype, np.floating)
    span = f" in [{images.min()}, {images.max()}]" if numeric else ""
    if not np.issubdtype(images.dtype, np.integer) or images.min() < 0 or images.max() > 255:
      raise ValueError(
        f"{path}[{image_key!r}] is {images.dtype}{span}; expected uint8 in "
        "[0, 255] (for floats in [-1, 1] save diffusion.data.to_uint8(x); for "
        "[0, 1] save (x * 255).round().astype(np.uint8))."
      )
    images = images.astype(np.uint8)
  images = images_lib.conform_array(
    images,
    size=spec.image_size,
    channels=spec.channels,
    resize=spec.resize,
    background=spec.background,
  )
  if labels is not None:
    labels = _check_labels(
      path, label_key, np.asarray(labels).reshape(-1), len(images), num_classes
    )
    num_classes = num_classes or int(labels.max()) + 1
  classes = f"{num_classes} classes" if labels is not None else "unlabelled"
  logging.info("%s: %d images, %s", path, len(images), classes)
  return Dataset(images, labels, num_classes if labels is not None else 0)
