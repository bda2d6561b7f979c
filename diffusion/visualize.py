"""Pictures: sample grids (more pictures of the process come with the sampling issue)."""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image


def grid(images: np.ndarray, *, ncol: int | None = None, pad: int = 1, scale: int = 1,
         pad_value: int = 255) -> np.ndarray:
  """uint8 images (N, H, W, C) -> one uint8 (rows, cols, C) image, `ncol` per row, padded,
  upscaled by `scale` with nearest neighbour (for small images such as 16x16 sprites)."""
  images = np.asarray(images)
  if images.ndim != 4 or images.dtype != np.uint8:
    raise ValueError(f"grid wants uint8 (N, H, W, C), got {images.dtype} {images.shape}.")
  if scale > 1:
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
  n, h, w, c = images.shape
  ncol = ncol or int(math.ceil(math.sqrt(n)))
  nrow = int(math.ceil(n / ncol))
  out = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), pad_value, np.uint8)
  for i in range(n):
    r, q = divmod(i, ncol)
    y, x = pad + r * (h + pad), pad + q * (w + pad)
    out[y:y + h, x:x + w] = images[i]
  return out


def save_image(path: str, image: np.ndarray) -> None:
  """Writes a uint8 (H, W, C) image as PNG, creating folders; C = 1 is saved as grayscale."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  image = image[..., 0] if image.shape[-1] == 1 else image
  Image.fromarray(image).save(path)


def save_grid(path: str, images: np.ndarray, *, ncol: int | None = None) -> None:
  """Saves uint8 images (N, H, W, C) as a PNG grid, upscaled so that cells are >= 64 px."""
  scale = max(1, 64 // images.shape[1])
  save_image(path, grid(images, ncol=ncol, scale=scale))
