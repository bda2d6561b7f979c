"""Distances between sets of features or images, in NumPy (float64 sums).

frechet_distance    FD/FID between Gaussians fitted to two feature sets, or given as (mu, sigma)
kernel_distance     KID (Binkowski et al. 2018): the unbiased MMD^2 with the cubic kernel
precision_recall    improved precision and recall (Kynkaanniemi et al. 2019): k-NN balls,
                    in batches
inception_score     IS (Salimans et al. 2016) of classifier logits, mean and std over splits
sliced_wasserstein  SWD between 7x7 patches of the Laplacian pyramid levels (Karras et al.
                    2018: patches normalised per channel and set, 4 x 512 random directions),
                    x 10^3, per level (finest first) and their mean
"""

from __future__ import annotations

from typing import Any

import numpy as np

Gaussian = tuple[np.ndarray, np.ndarray]  # mu (D,), sigma (D, D), as reference.load_npz gives


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
  """The symmetric square root of a positive semi-definite matrix (negative rounding clipped)."""
  w, v = np.linalg.eigh((s + s.T) / 2)
  return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _tr_sqrt_product(s_a: np.ndarray, s_b: np.ndarray) -> float:
  """Tr (S_a S_b)^(1/2) = Tr (S_a^(1/2) S_b S_a^(1/2))^(1/2), both symmetric PSD (D, D)."""
  root = _sqrt_psd(s_a)
  m = root @ s_b @ root
  return float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())


def _as_gaussian(x: np.ndarray | Gaussian) -> Gaussian:
  if isinstance(x, tuple):
    mu, sigma = (np.asarray(v, np.float64) for v in x)
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
      raise ValueError(f"FD needs (mu (D,), sigma (D, D)), got {mu.shape} and {sigma.shape}.")
    return mu, sigma
  x = np.asarray(x, np.float64)
  if x.ndim != 2 or len(x) < 2:
    raise ValueError(f"FD needs >= 2 feature vectors (N, D), got {x.shape}.")
  return x.mean(0), np.cov(x, rowvar=False)


def frechet_distance(a: np.ndarray | Gaussian, b: np.ndarray | Gaussian) -> float:
  """Fréchet distance between Gaussians: each of a, b is features (N, D), fitted by their mean and
  unbiased covariance, or a (mu (D,), sigma (D, D)) pair (reference statistics):
  |mu_a - mu_b|^2 + Tr(S_a) + Tr(S_b) - 2 Tr (S_a S_b)^(1/2), in float64.

  Tr (S_a S_b)^(1/2) is the sum of square roots of the eigenvalues of S_a S_b, from the
  symmetric S_a^(1/2) S_b S_a^(1/2) (D x D). When both are feature sets and one has fewer vectors
  than dimensions, from its small Gram form instead: with centred rows X (n, D), S_a S_b shares
  its non-zero eigenvalues with X S_b X^T / (n - 1) (n x n).
  """
  if isinstance(a, tuple) or isinstance(b, tuple):
    (mu_a, s_a), (mu_b, s_b) = _as_gaussian(a), _as_gaussian(b)
    if mu_a.shape != mu_b.shape:
      raise ValueError(f"FD needs Gaussians of one dimension, got {mu_a.size} and {mu_b.size}.")
    trace = np.trace(s_a) + np.trace(s_b)
    return float(((mu_a - mu_b) ** 2).sum() + trace - 2 * _tr_sqrt_product(s_a, s_b))
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if len(a) < 2 or len(b) < 2 or a.shape[1] != b.shape[1]:
    raise ValueError(f"FD needs >= 2 feature vectors of one size, got {a.shape} and {b.shape}.")
  ca, cb = a - a.mean(0), b - b.mean(0)
  na, nb, d = len(a), len(b), a.shape[1]
  if min(na, nb) - 1 < d:
    small, other = (ca, cb) if na <= nb else (cb, ca)
    g = small @ other.T  # X_small X_other^T: (n_small, n_other)
    m = g @ g.T / ((len(small) - 1) * (len(other) - 1))
    tr_root = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
  else:
    tr_root = _tr_sqrt_product(ca.T @ ca / (na - 1), cb.T @ cb / (nb - 1))
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


# ---- precision and recall, Inception Score ------------------------------------------------------


def _sq_dists(x: np.ndarray, y: np.ndarray, nx: np.ndarray, ny: np.ndarray) -> np.ndarray:
  """Squared Euclidean distances (len(x), len(y)) from the rows and their squared norms."""
  return np.maximum(nx[:, None] + ny[None, :] - 2.0 * (x @ y.T), 0.0)


def _knn_radii(x: np.ndarray, k: int, batch: int) -> np.ndarray:
  """Squared distance from each row of x (N, D) to its k-th nearest other row: (N,). Blocks of
  batch x batch distances; a running k + 1 smallest per row (the row itself, at 0, is one)."""
  n, norms = len(x), np.einsum("ij,ij->i", x, x)
  radii = np.empty(n)
  for i in range(0, n, batch):
    rows = slice(i, min(i + batch, n))
    best = np.full((rows.stop - i, k + 1), np.inf)
    for j in range(0, n, batch):
      cols = slice(j, min(j + batch, n))
      d = _sq_dists(x[rows], x[cols], norms[rows], norms[cols])
      r = np.arange(max(i, j), min(rows.stop, cols.stop))
      d[r - i, r - j] = 0.0  # exactly 0 to itself
      best = np.partition(np.concatenate([best, d], axis=1), k, axis=1)[:, : k + 1]
    radii[rows] = best.max(axis=1)
  return radii


def _coverage(x: np.ndarray, centres: np.ndarray, radii: np.ndarray, batch: int) -> float:
  """Fraction of the rows of x (N, D) inside at least one ball (centre, squared radius)."""
  nx, nc = np.einsum("ij,ij->i", x, x), np.einsum("ij,ij->i", centres, centres)
  inside = np.zeros(len(x), bool)
  for i in range(0, len(x), batch):
    rows = slice(i, i + batch)
    for j in range(0, len(centres), batch):
      cols = slice(j, j + batch)
      d = _sq_dists(x[rows], centres[cols], nx[rows], nc[cols])
      inside[rows] |= (d <= radii[None, cols]).any(axis=1)
  return float(inside.mean())


def precision_recall(
  real: np.ndarray, fake: np.ndarray, *, k: int = 3, batch: int = 2048
) -> tuple[float, float]:
  """Improved precision and recall (Kynkäänniemi et al. 2019) of features fake (M, D) against
  real (N, D), both in [0, 1]. Each set's manifold is the union of balls around its points with
  radius the distance to the k-th nearest other point of the same set; precision is the fraction
  of fake points inside the real manifold, recall the fraction of real points inside the fake one
  (a point on a ball's boundary is inside). Distances in float64, batch x batch at a time (50k x
  50k distances are never held at once)."""
  real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
  if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
    raise ValueError(f"Precision/recall need features of one size, got {real.shape}, {fake.shape}.")
  if min(len(real), len(fake)) <= k or k < 1 or batch < 1:
    raise ValueError(
      f"Precision/recall with k={k} need more than k vectors in each set (got {len(real)} and "
      f"{len(fake)}) and batch >= 1 (got {batch})."
    )
  precision = _coverage(fake, real, _knn_radii(real, k, batch), batch)
  recall = _coverage(real, fake, _knn_radii(fake, k, batch), batch)
  return precision, recall


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
  """Inception Score of classifier logits (N, C) (the Inception's unbiased 1008-way logits):
  exp(E_x KL(p(y|x) || p(y))) on each of `splits` consecutive parts of the N images, with p(y) the
  mean prediction of the part; returns the mean and standard deviation over parts (Salimans et
  al. 2016: 50k images, 10 splits). In [1, C]; float64, log-probabilities throughout."""
  x = np.asarray(logits, np.float64)
  if x.ndim != 2 or splits < 1 or len(x) < splits:
    raise ValueError(f"IS needs logits (N, C) with N >= splits={splits}, got {x.shape}.")
  logsumexp = lambda z, axis: (
    (m := z.max(axis, keepdims=True)) + np.log(np.exp(z - m).sum(axis, keepdims=True))
  )
  log_p = x - logsumexp(x, 1)  # log p(y|x)
  scores = []
  for i in range(splits):
    part = log_p[i * len(x) // splits : (i + 1) * len(x) // splits]
    log_py = logsumexp(part, 0) - np.log(len(part))  # log of the mean of p(y|x)
    kl = (np.exp(part) * (part - log_py)).sum(axis=1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores)), float(np.std(scores))


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
