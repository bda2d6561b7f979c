"""Distances between sets of features or images, in NumPy (float64 sums).

frechet_distance    FD/FID between Gaussians fitted to two feature sets
kernel_distance     KID (Binkowski et al. 2018): the unbiased MMD^2 with the cubic kernel
sliced_wasserstein  SWD between 7x7 patches of the Laplacian pyramid levels (Karras et al.
                    2018: patches normalised per channel and set, 4 x 512 random directions),
                    x 10^3, per level (finest first) and their mean
"""

from __future__ import annotations

from typing import Any

import numpy as np


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
  """Fréchet distance between Gaussians fitted to features a (N, D) and b (M, D):
  |mu_a - mu_b|^2 + Tr(S_a) + Tr(S_b) - 2 Tr (S_a S_b)^(1/2), in float64.

  Tr (S_a S_b)^(1/2) is the sum of square roots of the eigenvalues of S_a S_b. When a set has
  fewer vectors than dimensions they come from its small Gram form: with centred rows X (n, D),
  S_a S_b shares its non-zero eigenvalues with X S_b X^T / (n - 1) (n x n); otherwise from the
  symmetric S_a^(1/2) S_b S_a^(1/2) (D x D).
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if len(a) < 2 or len(b) < 2 or a.shape[1] != b.shape[1]:
    raise ValueError(f"FD needs >= 2 feature vectors of one size, got {a.shape} and {b.shape}.")
  ca, cb = a - a.mean(0), b - b.mean(0)
  na, nb, d = len(a), len(b), a.shape[1]
  if min(na, nb) - 1 < d:
    small, other = (ca, cb) if na <= nb else (cb, ca)
    g = small @ other.T  # X_small X_other^T: (n_small, n_other)
    m = g @ g.T / ((len(small) - 1) * (len(other) - 1))
  else:
    s_a, s_b = ca.T @ ca / (na - 1), cb.T @ cb / (nb - 1)
    w, v = np.linalg.eigh(s_a)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root @ s_b @ root
  tr_root = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
  trace = (ca**2).sum() / (na - 1) + (cb**2).sum() / (nb - 1)
  return float(((a.mean(0) - b.mean(0)) ** 2).sum() + trace - 2 * tr_root)


def kernel_distance(
  a: np.ndarray,
  b: np.ndarray,
  *,
  num_subsets: int = 100,
  subset_size: int = 1000,
  seed: int = 0,
  max_kernel: int = 8000,
) -> float:
  """KID (Binkowski et al. 2018): the unbiased MMD^2 between features a (N, D) and b (M, D)
  with the kernel k(x, y) = (x.y / D + 1)^3, averaged over `num_subsets` random subsets of
  min(subset_size, N, M) rows of each. Near 0 (can be slightly negative) for equal laws.
  The kernel of all N + M rows is computed once when N + M <= max_kernel, else per subset."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  m = min(subset_size, len(a), len(b))
  if m < 2:
    raise ValueError("KID needs at least 2 feature vectors in each set.")
  d, na = a.shape[1], len(a)
  rng = np.random.default_rng(seed)
  kern = lambda x, y: (x @ y.T / d + 1.0) ** 3
  full = None
  if na + len(b) <= max_kernel:
    z = np.concatenate([a, b])
    full = kern(z, z).astype(np.float32)  # float32 storage; sums below in float64
  off = lambda k: (k.sum(dtype=np.float64) - np.trace(k, dtype=np.float64)) / (m * (m - 1))
  vals = []
  for _ in range(num_subsets):
    i = rng.choice(na, m, replace=False)
    j = rng.choice(len(b), m, replace=False)
    if full is not None:
      kxx, kyy, kxy = full[np.ix_(i, i)], full[np.ix_(na + j, na + j)], full[np.ix_(i, na + j)]
    else:
      x, y = a[i], b[j]
      kxx, kyy, kxy = kern(x, x), kern(y, y), kern(x, y)
    vals.append(off(kxx) + off(kyy) - 2.0 * kxy.mean(dtype=np.float64))
  return float(np.mean(vals))


# ---- the Laplacian pyramid and SWD ------------------------------------------------------------

_BINOMIAL = np.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0


def _filter(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
  """Separable 5-tap filter over axes 1 and 2 of (N, H, W, C), reflected edges."""
  for axis in (1, 2):
    pad = [(0, 0)] * 4
    pad[axis] = (2, 2)
    xp = np.pad(x, pad, mode="reflect")
    n = x.shape[axis]
    x = sum(k * np.take(xp, np.arange(i, i + n), axis=axis) for i, k in enumerate(kernel))
  return x


def downsample(x: np.ndarray) -> np.ndarray:
  """float (N, H, W, C) -> (N, ceil(H/2), ceil(W/2), C): the 5-tap binomial blur, then every
  second pixel."""
  return _filter(x, _BINOMIAL)[:, ::2, ::2]


def upsample(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """float (N, h, w, C) -> (N, shape[1], shape[2], C): zeros inserted, then 2 x the binomial."""
  up = np.zeros((x.shape[0], 2 * x.shape[1], 2 * x.shape[2], x.shape[3]), x.dtype)
  up[:, ::2, ::2] = x
  return _filter(up, 2.0 * _BINOMIAL)[:, : shape[1], : shape[2]]


def laplacian_pyramid(images: np.ndarray, num_levels: int) -> list[np.ndarray]:
  """float (N, H, W, C) -> `num_levels` float32 arrays, finest first: band-pass levels
  x - up(down(x)) and, last, the low-pass residual; they sum back (with upsampling) to x."""
  x = np.asarray(images, np.float32)
  levels = []
  for _ in range(num_levels - 1):
    low = downsample(x)
    levels.append(x - upsample(low, x.shape))
    x = low
  levels.append(x)
  return levels


def pyramid_depth(size: int, min_resolution: int = 8) -> int:
  """Pyramid levels for square images of `size`: halve while the result is >= min_resolution."""
  levels = 1
  while size // 2 >= min_resolution:
    size, levels = (size + 1) // 2, levels + 1
  return levels


def _descriptors(level: np.ndarray, count: int, patch: int, rng: np.random.Generator) -> np.ndarray:
  """`count` random patch x patch neighbourhoods of `level` (N, h, w, C), normalised per channel
  over the whole set, flattened: float32 (count, patch * patch * C)."""
  n, h, w, c = level.shape
  img = rng.integers(0, n, count)
  ys, xs = rng.integers(0, h - patch + 1, count), rng.integers(0, w - patch + 1, count)
  r = np.arange(patch)
  desc = level[img[:, None, None], (ys[:, None] + r)[:, :, None], (xs[:, None] + r)[:, None, :]]
  desc = desc - desc.mean(axis=(0, 1, 2), keepdims=True)
  desc = desc / (desc.std(axis=(0, 1, 2), keepdims=True) + 1e-8)
  return desc.reshape(count, -1).astype(np.float32)


def sliced_wasserstein(
  a: np.ndarray,
  b: np.ndarray,
  *,
  patch: int = 7,
  patches_per_image: int = 128,
  directions: int = 512,
  repeats: int = 4,
  min_resolution: int = 8,
  max_descriptors: int = 1 << 15,
  seed: int = 0,
) -> dict[str, Any]:
  """SWD between uint8 image sets a (N, H, W, C) and b (M, H, W, C), Karras et al. 2018.

  Per Laplacian-pyramid level: the same number of random `patch` x `patch` descriptors from each
  set (`patches_per_image` per image of the smaller set, at most `max_descriptors`), each set
  normalised per channel, projected on `repeats` x `directions` random unit directions; the
  distance is the mean absolute difference of the sorted projections. Returns
  {"swd": mean over levels x 10^3, "levels": per level x 10^3 (finest first)}.
  """
  if a.shape[1:] != b.shape[1:]:
    raise ValueError(f"SWD needs images of one shape, got {a.shape[1:]} and {b.shape[1:]}.")
  size = min(a.shape[1], a.shape[2])
  if size < patch:
    raise ValueError(f"SWD needs images of at least {patch}x{patch} pixels, got {a.shape[1:3]}.")
  depth = pyramid_depth(size, max(min_resolution, patch))
  pa, pb = laplacian_pyramid(a, depth), laplacian_pyramid(b, depth)
  count = min(patches_per_image * min(len(a), len(b)), max_descriptors)
  rng = np.random.default_rng(seed)
  per_level = []
  for la, lb in zip(pa, pb, strict=True):
    da, db = _descriptors(la, count, patch, rng), _descriptors(lb, count, patch, rng)
    dists = []
    for _ in range(repeats):
      dirs = rng.standard_normal((da.shape[1], directions)).astype(np.float32)
      dirs /= np.linalg.norm(dirs, axis=0, keepdims=True)
      # One row per direction, sorted along the contiguous axis (faster than down columns).
      proj_a, proj_b = np.sort(dirs.T @ da.T, axis=1), np.sort(dirs.T @ db.T, axis=1)
      dists.append(np.abs(proj_a - proj_b).mean(axis=1))
    per_level.append(float(np.concatenate(dists).mean() * 1e3))
  return {"swd": float(np.mean(per_level)), "levels": per_level}
