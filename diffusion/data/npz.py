"""A .npz file of images (and optional labels) -> Dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from absl import logging

from diffusion.data import images as images_lib
from diffusion.data.dataset import Dataset

IMAGE_KEYS = ("images", "image", "x", "arr_0")  # first present wins
LABEL_KEYS = ("labels", "label", "y")


def _check_labels(path: Path, key: str, labels: np.ndarray, n: int,
                  num_classes: int | None) -> np.ndarray:
  """-> int32 labels; ValueError unless they are n whole numbers in [0, num_classes)."""
  if len(labels) != n:
    raise ValueError(f"{path}: {len(labels)} labels ({key!r}) for {n} images; save one label "
                     "per image.")
  if not (np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.bool_)):
    whole = np.issubdtype(labels.dtype, np.floating) and np.all(np.mod(labels, 1) == 0)
    if not whole:
      raise ValueError(f"{path}[{key!r}] is {labels.dtype} and not all whole numbers; labels "
                       "must be integer class indices 0, 1, ... (save e.g. labels.astype(int)).")
  if num_classes is not None and num_classes <= 0:
    raise ValueError(f"{path}['num_classes'] is {num_classes}; it must be positive (or leave it "
                     "out to use max(labels) + 1).")
  low, high = labels.min(), labels.max()
  if low < 0:
    raise ValueError(f"{path}[{key!r}] has negative labels (min {low}); labels must be class "
                     "indices 0, 1, ..., num_classes - 1 (e.g. relabel with np.unique(labels, "
                     "return_inverse=True)[1]; -1 for 'no label' is not supported).")
  if num_classes is not None and high >= num_classes:
    raise ValueError(f"{path}[{key!r}] has label {high} >= num_classes={num_classes} (stored in "
                     f"{path.name}); labels must lie in [0, num_classes): fix the labels or save "
                     f"num_classes={int(high) + 1} or more.")
  if high >= 2**31:
    raise ValueError(f"{path}[{key!r}] has label {high}, too large for int32; relabel with "
                     "np.unique(labels, return_inverse=True)[1].")
  return labels.astype(np.int32)


def load_npz(cfg) -> Dataset:
  """config.data.path -> Dataset. Images: uint8 (N, H, W, C) or (N, H, W) (also accepted:
  channels-first (N, C, H, W), and integer arrays within [0, 255]); resized/converted to
  image_size/channels if they differ. Labels: integers (N,) in [0, num_classes), num_classes
  from a `num_classes` entry or max + 1; anything else is a ValueError that says what to fix."""
  path = Path(cfg.path).expanduser()
  if not cfg.path or not path.is_file():
    raise FileNotFoundError(f"npz file {str(path)!r} not found; set config.data.path to a .npz "
                            "with an `images` array (N, H, W, C) uint8.")
  with np.load(path) as z:
    keys = list(z.files)
    image_key = next((k for k in IMAGE_KEYS if k in keys), None)
    if image_key is None:
      raise ValueError(f"{path} has no image array: its keys are {keys}; name it one of "
                       f"{list(IMAGE_KEYS)}.")
    images = z[image_key]
    label_key = next((k for k in LABEL_KEYS if k in keys), None)
    labels = z[label_key] if label_key else None
    num_classes = int(z["num_classes"]) if "num_classes" in keys else None
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim == 4 and images.shape[1] in (1, 3, 4) and images.shape[-1] not in (1, 3, 4):
    logging.info("%s: images look channels-first %s; transposing to NHWC.", path, images.shape)
    images = images.transpose(0, 2, 3, 1)
  if images.ndim != 4:
    raise ValueError(f"{path}[{image_key!r}] has shape {images.shape}; expected (N, H, W, C).")
  if not len(images):
    raise ValueError(f"{path}[{image_key!r}] holds no images (shape {images.shape}); save at "
                     "least one.")
  if images.dtype != np.uint8:
    if not np.issubdtype(images.dtype, np.integer) or images.min() < 0 or images.max() > 255:
      raise ValueError(f"{path}[{image_key!r}] is {images.dtype} in [{images.min()}, "
                       f"{images.max()}]; expected uint8 in [0, 255] (for floats in [-1, 1] save "
                       "diffusion.data.to_uint8(x)).")
    images = images.astype(np.uint8)
  images = images_lib.conform_array(images, size=cfg.image_size, channels=cfg.channels,
                                    resize=cfg.resize, background=tuple(cfg.background))
  if labels is not None:
    labels = _check_labels(path, label_key, np.asarray(labels).reshape(-1), len(images),
                           num_classes)
    num_classes = num_classes or int(labels.max()) + 1
  classes = f"{num_classes} classes" if labels is not None else "unlabelled"
  logging.info("%s: %d images, %s", path, len(images), classes)
  return Dataset(images, labels, num_classes if labels is not None else 0)
