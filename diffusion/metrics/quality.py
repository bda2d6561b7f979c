"""Sample quality: one set of images scored against a reference set of training images.

  fd, kid   Fréchet distance and KID in the feature net's 128-d features (feature_net.py)
  swd       sliced Wasserstein distance of Laplacian-pyramid patches, and per level (swd_levels)
  fid, inception_kid
            FID and KID in the FID Inception's 2048-d pool3 features, when given (inception.py)

FD and SWD are biased by the number of images: compare sets of one size (the eval mode scores
samples and held-out real images, the floor, at the same size).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from diffusion.metrics import batched, distances
from diffusion.metrics.feature_net import FeatureNetwork

InceptionFn = Callable[[jax.Array], jax.Array]  # uint8 (B, H, W, C) -> (B, 2048), inception.py
_INCEPTION_BATCH = 50  # at most this many 299 x 299 images per call (memory)


def _inception(fn: InceptionFn, images: np.ndarray, batch_size: int, desc: str = "") -> np.ndarray:
  return batched(fn, images, min(batch_size, _INCEPTION_BATCH), desc)


@dataclasses.dataclass
class Reference:
  """What every image set is compared to: training images and their features."""

  images: np.ndarray  # uint8 (N, H, W, C)
  features: np.ndarray  # float64 (N, 128) feature-net features
  inception: np.ndarray | None = None  # float32 (N, 2048) pool3 features, with Inception

  @classmethod
  def build(
    cls,
    images: np.ndarray,
    net: FeatureNetwork,
    *,
    inception_fn: InceptionFn | None = None,
    batch_size: int = 250,
    progress: bool = False,
  ) -> Reference:
    """The reference set of uint8 images (N, H, W, C): their features (and pool3 features)."""
    pool3 = (
      None
      if inception_fn is None
      else _inception(inception_fn, images, batch_size, "inception" if progress else "")
    )
    return cls(images, net.features(images, batch_size), pool3)


def quality(
  images: np.ndarray,
  ref: Reference,
  net: FeatureNetwork,
  *,
  inception_fn: InceptionFn | None = None,
  batch_size: int = 250,
  seed: int = 0,
) -> dict[str, Any]:
  """{fd, kid, swd, swd_levels, fid, inception_kid} of uint8 images (N, H, W, C) against `ref`;
  fid and inception_kid are None without `inception_fn` (or without ref.inception). `seed` draws
  the KID subsets and the SWD patches and directions. All >= 0 but KID (~0 for equal laws)."""
  f = net.features(images, batch_size)
  swd = distances.sliced_wasserstein(images, ref.images, seed=seed)
  out = {
    "fd": distances.frechet_distance(f, ref.features),
    "kid": distances.kernel_distance(f, ref.features, seed=seed),
    "swd": swd["swd"],
    "swd_levels": swd["levels"],
    "fid": None,
    "inception_kid": None,
  }
  if inception_fn is not None and ref.inception is not None:
    g = _inception(inception_fn, images, batch_size)
    out["fid"] = distances.frechet_distance(g, ref.inception)
    out["inception_kid"] = distances.kernel_distance(g, ref.inception, seed=seed)
  return out
