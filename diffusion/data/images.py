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


def uint16_to_uint8(a: np.ndarray) -> np.ndarray:
  """16-bit intensities [0, 65535] -> uint8 [0, 255] (the top 8 bits; so 255 -> 0, 65535 -> 255).

  For "I;16*" images and uint16 arrays, and for Pillow's 32-bit "I" mode, which Pillow uses for
  16-bit sources (PGM with maxval > 255, 16-bit PNG in older Pillows); values outside [0, 65535]
  are clipped. The bit depth is taken from the type, never guessed from the values: a 16-bit
  image that happens to be dark stays dark.
  """
  return (np.clip(a.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)


def conform(
  img: Image.Image,
  *,
  size: int,
  channels: int,
  resize: str = "antialias",
  background: Sequence[int] = (255, 255, 255),
) -> np.ndarray:
  """A PIL image of any mode and size -> uint8 (size, size, channels).

  Transparent pixels (alpha channel, or a palette / tRNS transparency entry) are composited
  onto `background` (RGB); 16-bit grayscale keeps its top 8 bits (`uint16_to_uint8`); palette,
  grayscale, CMYK ... become RGB or L; the image is resized so
  its shorter side is `size` and centre-cropped, with `resize` ("antialias" = Lanczos, which
  low-pass filters when shrinking; "nearest" keeps pixel art crisp).
  """
  if img.mode.startswith("I"):  # 16-bit grayscale: its top 8 bits, decided by the mode
    a = np.asarray(img)
    gray = Image.fromarray(uint16_to_uint8(a), "L")
    key = img.info.get("transparency")  # a 16-bit PNG's tRNS: one transparent gray value
    img = (
      Image.merge("LA", (gray, Image.fromarray(np.where(a == key, 0, 255).astype(np.uint8))))
      if isinstance(key, int)
      else gray
    )
  if img.mode in _ALPHA_MODES or "transparency" in img.info:
    rgba = img.convert("RGBA")
    base = Image.new("RGBA", rgba.size, (*(int(v) for v in background), 255))
    img = Image.alpha_composite(base, rgba)
  img = img.convert("L" if channels == 1 else "RGB")
  w, h = img.size
  if (w, h) != (size, size):
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.resize((size, size), RESAMPLE[resize], box=(left, top, left + side, top + side))
  out = np.asarray(img, np.uint8)
  return out[..., None] if channels == 1 else out


_ARRAY_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}


def conform_array(
  images: np.ndarray,
  *,
  size: int,
  channels: int,
  resize: str = "antialias",
  background: Sequence[int] = (255, 255, 255),
) -> np.ndarray:
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
