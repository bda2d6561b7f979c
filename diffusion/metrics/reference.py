"""Reference statistics: the Gaussian (mu, sigma) of a feature set, in the .npz format of the
published reference files, and the moments that build it over many batches, hosts and restarts.

  save_npz / load_npz  mu (D,) and sigma (D, D), float64, under the keys `mu` and `sigma`: the
                       format of guided-diffusion's reference batches (which also hold the images
                       as arr_0, see load_images), EDM's fid-refs and TTUR's fid_stats files
  load_images          a reference batch's uint8 images arr_0 (KID and precision/recall of a
                       latent run, whose training data are latents)
  FeatureMoments       (count, sum, sum of outer products) in float64: add batches, merge shards
                       or hosts by summation, save and load partial sums to resume an evaluation

Every file is read with allow_pickle=False and written atomically (a temporary file beside it, then
os.replace), so an interrupted write leaves the previous file whole.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np


def savez_atomic(path: str, arrays: Mapping[str, Any]) -> None:
  """np.savez of `arrays` to exactly `path` (no .npz appended), atomically. Object arrays are
  refused (np.savez would pickle them)."""
  arrays = {k: np.asarray(v) for k, v in arrays.items()}
  for k, v in arrays.items():
    if v.dtype.hasobject:
      raise ValueError(f"{path}: {k!r} is an object array, which would be pickled; use numbers.")
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=os.path.dirname(path) or ".")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **arrays)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def not_npz(path: str) -> str | None:
  """What the file at `path` is when it is not an .npz (a zip archive), from its first bytes,
  else None. numpy would call anything else "pickled data" and suggest allow_pickle=True."""
  with open(path, "rb") as f:
    head = f.read(8)
  if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
    return None
  if not head:
    return "not a valid .npz file: it is empty"
  if head.startswith(np.lib.format.MAGIC_PREFIX):
    return "a single .npy array, not a valid .npz archive of named arrays"
  if head.startswith(b"\x80"):
    return "a Python pickle, not a valid .npz file; pickles are never loaded"
  return f"not a valid .npz file (a zip archive of .npy arrays): it starts with {head!r}"


def _read(path: str, keys: tuple[str, ...], what: str) -> dict[str, np.ndarray]:
  """The arrays `keys` of the .npz at `path` (others are not read); one-line errors."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what} {path!r} does not exist.")
  problem = not_npz(path)
  if problem:
    raise ValueError(f"{what} {path!r} is not an .npz of plain arrays ({problem}).")
  try:
    with np.load(path, allow_pickle=False) as z:
      missing = [k for k in keys if k not in z.files]
      if missing:
        raise ValueError(
          f"{what} {path!r} has no {', '.join(missing)} (it holds {', '.join(z.files) or 'nothing'}"
          f"); expected the keys {', '.join(keys)}."
        )
      return {k: z[k] for k in keys}
  except (OSError, TypeError, EOFError, zipfile.BadZipFile) as e:  # TypeError: an .npy
    raise ValueError(f"{what} {path!r} is not an .npz of plain arrays ({e}).") from None
  except ValueError as e:
    if str(e).startswith(what):
      raise
    raise ValueError(f"{what} {path!r} is not an .npz of plain arrays ({e}).") from None


def _check_gaussian(mu: Any, sigma: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
  mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
  if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
    raise ValueError(
      f"{where}: mu must be (D,) and sigma (D, D), got mu {mu.shape} and sigma {sigma.shape}."
    )
  if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
    raise ValueError(f"{where}: mu or sigma holds NaN or infinity.")
  return mu, sigma


def save_npz(path: str, mu: np.ndarray, sigma: np.ndarray, **extra: Any) -> None:
  """Write mu (D,) and sigma (D, D) as float64 under `mu` and `sigma`, plus `extra` arrays (for
  example the number of images or the data fingerprint), atomically. Loadable by every tool that
  reads the published reference files."""
  mu, sigma = _check_gaussian(mu, sigma, f"save_npz({path!r})")
  if {"mu", "sigma"} & set(extra):
    raise ValueError("save_npz: mu and sigma are given as arguments, not in **extra.")
  savez_atomic(path, {"mu": mu, "sigma": sigma, **extra})


def load_npz(path: str) -> tuple[np.ndarray, np.ndarray]:
  """mu (D,) and sigma (D, D), float64, of a reference-statistics .npz (ours, guided-diffusion's,
  EDM's, TTUR's). ValueError (one line) for another format, missing keys or shapes."""
  z = _read(path, ("mu", "sigma"), "Reference statistics")
  return _check_gaussian(z["mu"], z["sigma"], f"Reference statistics {path!r}")


def load_images(path: str) -> np.ndarray:
  """The uint8 (N, H, W, C) images `arr_0` of a guided-diffusion (ADM) reference batch such as
  VIRTUAL_imagenet256_labeled.npz, read with allow_pickle=False (all of them in memory: 2 GB for
  ImageNet-256's 10,000). ValueError (one line) when there are none or they are not uint8 NHWC."""
  images = _read(path, ("arr_0",), "Reference batch")["arr_0"]
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(
      f"Reference batch {path!r}: arr_0 is {images.dtype} {images.shape}, expected uint8 "
      "(N, H, W, C) images (the guided-diffusion reference batch format)."
    )
  return images


@dataclasses.dataclass(frozen=True, eq=False)
class FeatureMoments:
  """Sufficient statistics of a feature set: count, sum (D,) and sum of outer products (D, D),
  float64. Shards, devices and hosts each accumulate their own and are reduced by summation
  (`merge`, or a psum of the fields); `mean_cov` gives the Gaussian of the union."""

  count: int
  sum: np.ndarray  # float64 (D,)
  sum_outer: np.ndarray  # float64 (D, D)

  @classmethod
  def zeros(cls, dim: int) -> FeatureMoments:
    return cls(0, np.zeros(dim), np.zeros((dim, dim)))

  @classmethod
  def of(cls, features: np.ndarray) -> FeatureMoments:
    """The moments of features (N, D)."""
    return cls.zeros(np.shape(features)[-1]).add(features)

  @property
  def dim(self) -> int:
    return self.sum.shape[0]

  def add(self, features: np.ndarray) -> FeatureMoments:
    """These moments and those of features (N, D), N >= 0; a new object."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[1] != self.dim:
      raise ValueError(f"FeatureMoments of dimension {self.dim} cannot add features {f.shape}.")
    return FeatureMoments(self.count + len(f), self.sum + f.sum(0), self.sum_outer + f.T @ f)

  def merge(self, other: FeatureMoments) -> FeatureMoments:
    """The moments of the union of both sets (disjoint shards)."""
    if other.dim != self.dim:
      raise ValueError(f"Cannot merge FeatureMoments of dimensions {self.dim} and {other.dim}.")
    return FeatureMoments(
      self.count + other.count, self.sum + other.sum, self.sum_outer + other.sum_outer
    )

  def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
    """mu (D,) and the unbiased covariance sigma (D, D) (np.cov's, ddof = 1), float64."""
    n = self.count
    if n < 2:
      raise ValueError(f"A covariance needs at least 2 feature vectors, got {n}.")
    mu = self.sum / n
    sigma = (self.sum_outer - n * np.outer(mu, mu)) / (n - 1)
    return mu, (sigma + sigma.T) / 2

  def save(self, path: str, **extra: Any) -> None:
    """count, sum and sum_outer (and `extra`) to the .npz at `path`, atomically."""
    arrays = {"count": np.int64(self.count), "sum": self.sum, "sum_outer": self.sum_outer}
    savez_atomic(path, {**arrays, **extra})

  @classmethod
  def load(cls, path: str) -> FeatureMoments:
    """Moments saved by `save`; ValueError (one line) for another file or inconsistent shapes."""
    z = _read(path, ("count", "sum", "sum_outer"), "Feature moments")
    count, s, so = z["count"], z["sum"].astype(np.float64), z["sum_outer"].astype(np.float64)
    if count.shape != () or not np.issubdtype(count.dtype, np.integer) or count < 0:
      raise ValueError(f"Feature moments {path!r}: count must be an integer >= 0, got {count}.")
    if s.ndim != 1 or so.shape != (s.size, s.size):
      raise ValueError(
        f"Feature moments {path!r}: sum must be (D,) and sum_outer (D, D), got {s.shape} and "
        f"{so.shape}."
      )
    return cls(int(count), s, so)
