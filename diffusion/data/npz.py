"""A .npz file of images (and optional labels) -> Dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from absl import logging

from diffusion.data import images as images_lib
from diffusion.data.dataset import Dataset

IMAGE_KEYS = ("images", "image", "x", "arr_0")  # first present wins
LABEL_KEYS = ("labels", "label", "y")


def load_npz(cfg) -> Dataset:
  """config.data.path -> Dataset. Images: uint8 (N, H, W, C) or (N, H, W) (also accepted:
  channels-first (N, C, H, W), and integer arrays within [0, 255]); resized/converted to
  image_size/channels if they differ. Labels: integers (N,); num_classes from a `num_classes`
  entry or max + 1."""
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
  if images.dtype != np.uint8:
    if not np.issubdtype(images.dtype, np.integer) or images.min() < 0 or images.max() > 255:
      raise ValueError(f"{path}[{image_key!r}] is {images.dtype} in [{images.min()}, "
                       f"{images.max()}]; expected uint8 in [0, 255] (for floats in [-1, 1] save "
                       "diffusion.data.to_uint8(x)).")
    images = images.astype(np.uint8)
  images = images_lib.conform_array(images, size=cfg.image_size, channels=cfg.channels,
                                    resize=cfg.resize, background=tuple(cfg.background))
  if labels is not None:
    labels = np.asarray(labels).reshape(-1).astype(np.int32)
    if len(labels) != len(images):
      raise ValueError(f"{path}: {len(labels)} labels for {len(images)} images.")
    num_classes = num_classes or int(labels.max()) + 1
  classes = f"{num_classes} classes" if labels is not None else "unlabelled"
  logging.info("%s: %d images, %s", path, len(images), classes)
  return Dataset(images, labels, num_classes if labels is not None else 0)
