"""Image conversion shared by the sources: mode -> channels, transparency, resize + centre-crop.

Everything returns uint8 arrays (size, size, channels) with values in [0, 255].
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

RESAMPLE = {"antialias": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST}
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def check_options(size: int, channels: int, resize: str) -> None:
  """Raises ValueError for settings no source can honour."""
  if size <= 0:
    raise ValueError(f"config.data.image_size must be positive, got {size}.")
  if channels not in (1, 3):
    raise ValueError(f"config.data.channels must be 1 (grayscale) or 3 (RGB), got {channels}.")
  if resize not in RESAMPLE:
    raise ValueError(f"config.data.resize={resize!r} is unknown; use one of {sorted(RESAMPLE)}.")


def conform(img: Image.Image, *, size: int, channels: int, resize: str = "antialias",
            background: Sequence[int] = (255, 255, 255)) -> np.ndarray:
  """A PIL image of any mode and size -> uint8 (size, size, channels).

  Transparent pixels (alpha channel, or a palette / tRNS transparency entry) are composited
  onto `background` (RGB); palette, grayscale, CMYK ... become RGB or L; the image is resized so
  its shorter side is `size` and centre-cropped, with `resize` ("antialias" = Lanczos, which
  low-pass filters when shrinking; "nearest" keeps pixel art crisp).
  """
  if img.mode in _ALPHA_MODES or "transparency" in img.info:
    rgba = img.convert("RGBA")
    base = Image.new("RGBA", rgba.size, (*(int(v) for v in background), 255))
    img = Image.alpha_composite(base, rgba)
  if img.mode.startswith("I"):  # 16-bit grayscale (I;16*, or I holding 0..65535): top 8 bits
    a = np.asarray(img).astype(np.int64)
    img = Image.fromarray(np.clip(a >> 8 if a.max() > 255 else a, 0, 255).astype(np.uint8))
  img = img.convert("L" if channels == 1 else "RGB")
  w, h = img.size
  if (w, h) != (size, size):
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.resize((size, size), RESAMPLE[resize], box=(left, top, left + side, top + side))
  out = np.asarray(img, np.uint8)
  return out[..., None] if channels == 1 else out


_ARRAY_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}


def conform_array(images: np.ndarray, *, size: int, channels: int, resize: str = "antialias",
                  background: Sequence[int] = (255, 255, 255)) -> np.ndarray:
  """uint8 (N, H, W, C), C in 1..4 -> uint8 (N, size, size, channels) (see `conform`)."""
  n, h, w, c = images.shape
  if (h, w, c) == (size, size, channels):
    return images
  if c not in _ARRAY_MODES:
    raise ValueError(f"images have {c} channels; expected 1 (L), 2 (LA), 3 (RGB) or 4 (RGBA).")
  out = np.empty((n, size, size, channels), np.uint8)
  for i, im in enumerate(images):
    pil = Image.fromarray(im[..., 0] if c == 1 else im, _ARRAY_MODES[c])
    out[i] = conform(pil, size=size, channels=channels, resize=resize, background=background)
  return out
