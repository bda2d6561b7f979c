"""Evaluation (`--mode eval`): bits/dim on held-out data and sample quality without downloads.

Bits/dim protocol (`bits_per_dim`; also written as "bpd_protocol" in eval/metrics.json):
  split           the held-out split of config.data (`data.load(split="eval")`: the tfds
                  `eval_split`, else the fixed held-out `eval_fraction`), its first
                  config.eval.bpd_images images, in order;
  data            8-bit (uint8) images scaled to [-1, 1] as x / 127.5 - 1;
  dequantisation  none: the t = 0 term is the discretised Gaussian decoder -log p(x_0 | x_1)
                  over the 256 bins of each sub-pixel, so the bound is on the discrete data
                  (no uniform noise, no Jacobian term);
  bound           the full T-step variational bound, prior KL(q(x_T|x_0) || N(0, I)) + the
                  T - 1 KL terms + the decoder, every term evaluated (T network evaluations per
                  image, one fresh x_t per term), in bits per dimension (H W C dimensions);
  conditioning    class-conditional models get the true labels (a bound on -log p(x | y));
  parameters      EMA when config.sample.use_ema (the default), as for sampling.

Sample quality (`Quality`), computed for every config.eval.samplers entry and, as the floor,
for held-out real images; both against `reference_images` training images:
  fd, kid   Fréchet distance and KID (unbiased MMD^2, kernel (x.y / d + 1)^3, mean over
            random subsets) in the 128-d penultimate layer of a small CNN trained here on the
            training images: a classifier of the labels when the data has them, else of the
            rotation (0/90/180/270 degrees) of unlabelled images. Cached in
            eval/feature_net.npz (retrained when the data or `feature_steps` change). Numbers
            are comparable between runs on the same data, not with published Inception FIDs.
  swd       sliced Wasserstein distance between 7x7 patches of the Laplacian pyramid levels
            (Karras et al. 2018: patches normalised per channel and set, 4 x 512 random
            directions), x 10^3, per level (finest first) and their mean ("swd").
  fid, inception_kid
            with config.eval.inception_weights: FID and KID in the 2048-d pool3 features of the
            TF FID Inception v3 (pt_inception-2015-12-05, pytorch-fid's weights), on images
            resized to 299 x 299 (bilinear, no antialiasing) and scaled to [-1, 1].
The floor is what a model that reproduced the data would score at this sample size.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import pickle
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import traverse_util
from tqdm import tqdm

from diffusion import data, losses, samplers, train, visualize
from diffusion import sample as sample_lib


def _batched(
  fn: Callable[[jax.Array], jax.Array], x: np.ndarray, batch_size: int, desc: str = ""
) -> np.ndarray:
  """fn over `x` in batches of `batch_size` (the last one padded: one compilation) -> NumPy."""
  n = len(x)
  bs = max(1, min(batch_size, n))
  out = []
  steps = range(0, n, bs)
  for i in tqdm(steps, desc=desc, unit="batch", disable=not desc or len(steps) < 2):
    chunk = x[i : i + bs]
    if len(chunk) < bs:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], bs - len(chunk), axis=0)])
    out.append(np.asarray(jax.device_get(fn(jnp.asarray(chunk)))))
  return np.concatenate(out)[:n]


# ---- bits/dim ----------------------------------------------------------------------------------


def bpd_protocol(config: ml_collections.ConfigDict, num_images: int) -> dict[str, Any]:
  """The bits/dim protocol as written beside the number (see the module docstring)."""
  d = config.data
  split = d.eval_split if d.source == "tfds" and d.eval_split else f"held-out {d.eval_fraction}"
  return {
    "split": split,
    "num_images": num_images,
    "data": "uint8, x / 127.5 - 1",
    "dequantization": "none: discrete decoder on 8-bit data",
    "bound": f"full {config.diffusion.num_timesteps}-step VLB (prior + KL terms + decoder)",
    "conditioning": "true labels" if config.model.num_classes else "none",
    "parameters": "ema" if config.sample.use_ema else "raw",
    "seed": config.eval.seed,
  }


_BPD_FNS: dict[str, Callable] = {}


def _bpd_fn(config: ml_collections.ConfigDict) -> Callable:
  """jit-compiled (params, uint8 x (B, H, W, C), labels (B,), key) -> (B, 3) [total, prior,
  decoder] bits/dim, built once per model and diffusion config."""
  key = sample_lib.config_key(config, "model", "diffusion")
  if key in _BPD_FNS:
    return _BPD_FNS[key]
  model, schedule = train.make_model(config), train.make_schedule(config)
  f = config.diffusion
  conditional = config.model.num_classes > 0

  @jax.jit
  def batch_bpd(params, x_u8, y, key):
    fn = lambda x, c, yy: model.apply(params, x, c, yy, train=False)
    out = losses.bits_per_dim(
      fn,
      schedule,
      data.normalize(x_u8),
      key,
      labels=y if conditional else None,
      prediction=f.prediction,
      variance=f.variance,
      time_input=train.time_input(config),
    )
    return jnp.stack([out["total"], out["prior"], out["terms"][0]], axis=1)

  _BPD_FNS[key] = batch_bpd
  return batch_bpd


def bits_per_dim(
  config: ml_collections.ConfigDict,
  params: Any,
  images: np.ndarray,
  labels: np.ndarray | None = None,
  *,
  batch_size: int = 64,
  seed: int = 0,
  progress: bool = True,
) -> dict[str, float]:
  """The full T-step variational bound of uint8 images (N, H, W, C) under `params`, bits/dim.

  One jit-compiled function per batch shape (the last batch is padded); batch b uses the
  noise of fold_in(PRNGKey(seed), b). Returns {"bpd": mean total, "bpd_stderr": its standard
  error, "prior": mean prior term, "decoder": mean t = 0 term, "num_images": N}.
  """
  n = len(images)
  if n == 0:
    raise ValueError("bits_per_dim got no images.")
  if labels is None:
    labels = np.zeros((n,), np.int32)
  bs = min(batch_size, n)
  batch_bpd = _bpd_fn(config)
  params = jax.device_put(params)
  base = jax.random.PRNGKey(seed)
  rows = []
  batches = range(math.ceil(n / bs))
  for b in tqdm(batches, desc="bits/dim", unit="batch", disable=not progress):
    idx = np.resize(np.arange(b * bs, min((b + 1) * bs, n)), bs)
    out = batch_bpd(
      params,
      jnp.asarray(images[idx]),
      jnp.asarray(labels[idx], jnp.int32),
      jax.random.fold_in(base, b),
    )
    rows.append(np.asarray(out)[: min(bs, n - b * bs)])
  vals = np.concatenate(rows).astype(np.float64)
  total = vals[:, 0]
  return {
    "bpd": float(total.mean()),
    "bpd_stderr": float(total.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0,
    "prior": float(vals[:, 1].mean()),
    "decoder": float(vals[:, 2].mean()),
    "num_images": n,
  }


# ---- the feature network trained on the data --------------------------------------------------

FEATURE_NET_VERSION = 1


class FeatureNet(nn.Module):
  """A small CNN: five 3x3 convolutions (two of stride 2), mean pooling, a 128-d embedding.

  x: float (B, H, W, C) in [-1, 1] -> (features (B, features) >= 0, logits (B, num_outputs)).
  """

  num_outputs: int
  width: int = 16
  features: int = 128

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    w = self.width
    for i, (ch, stride) in enumerate(((w, 1), (2 * w, 2), (2 * w, 1), (4 * w, 2), (4 * w, 1))):
      x = nn.relu(nn.Conv(ch, (3, 3), strides=stride, name=f"conv{i}")(x))
    f = nn.relu(nn.Dense(self.features, name="embed")(x.mean(axis=(1, 2))))
    return f, nn.Dense(self.num_outputs, name="head")(f)


def _rotate(x: jax.Array, k: jax.Array) -> jax.Array:
  """Rotates square images x (B, S, S, C) by k[i] * 90 degrees each."""
  rots = jnp.stack([jnp.rot90(x, r, axes=(1, 2)) for r in range(4)])
  return rots[k, jnp.arange(x.shape[0])]


@dataclasses.dataclass
class FeatureNetwork:
  """A trained FeatureNet: `features(images)` -> float64 (N, 128) for uint8 (N, H, W, C)."""

  params: Any
  meta: dict[str, Any]

  @functools.cached_property
  def _apply(self) -> Callable[[jax.Array], jax.Array]:
    net = FeatureNet(self.meta["num_outputs"])
    params = jax.device_put(self.params)
    return jax.jit(lambda x: net.apply(params, data.normalize(x))[0])

  def features(self, images: np.ndarray, batch_size: int = 250) -> np.ndarray:
    """float64 (N, 128), divided by the RMS feature of the training images (meta
    "feature_scale"), so that the KID kernel (x.y / d + 1)^3 sees values of order one."""
    f = _batched(self._apply, images, batch_size).astype(np.float64)
    return f / self.meta.get("feature_scale", 1.0)


@functools.cache
def _feature_step(num_outputs: int, kind: str, batch_size: int) -> Callable:
  """Compiled Adam step (params, adam state, images, labels, key, learning rate) -> (params,
  adam state, loss) of a FeatureNet on a batch drawn from uint8 `images` on the device."""
  net, adam = FeatureNet(num_outputs), optax.scale_by_adam()

  def loss_fn(p, x, y):
    logits = net.apply(p, x)[1]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(p, opt, x_all, y_all, k, lr):
    k_idx, k_rot = jax.random.split(k)
    idx = jax.random.randint(k_idx, (batch_size,), 0, x_all.shape[0])
    x, y = data.normalize(x_all[idx]), y_all[idx]
    if kind == "rotation":
      y = jax.random.randint(k_rot, (batch_size,), 0, 4)
      x = _rotate(x, y)
    loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
    updates, opt = adam.update(grads, opt, p)
    p = jax.tree.map(lambda w, u: w - lr * u, p, updates)
    return p, opt, loss

  return step


def train_feature_net(
  images: np.ndarray,
  labels: np.ndarray | None,
  num_classes: int,
  *,
  steps: int,
  batch_size: int = 128,
  learning_rate: float = 2e-3,
  seed: int = 0,
  max_images: int = 50_000,
) -> FeatureNetwork:
  """Trains a FeatureNet on uint8 images (N, H, W, C): a classifier of `labels` when given
  (num_classes > 1), else of the rotation of each image. `steps` Adam steps on batches drawn on
  the device from the images (at most `max_images` of them)."""
  if steps <= 0:
    raise ValueError(f"config.eval.feature_steps must be > 0, got {steps}.")
  kind = "classifier" if labels is not None and num_classes > 1 else "rotation"
  if images.shape[1] != images.shape[2]:
    raise ValueError(f"the feature net wants square images, got {images.shape[1:3]}.")
  rng = np.random.default_rng(seed)
  if len(images) > max_images:
    pick = np.sort(rng.choice(len(images), max_images, replace=False))
    images, labels = images[pick], None if labels is None else labels[pick]
  num_outputs = num_classes if kind == "classifier" else 4
  net = FeatureNet(num_outputs)
  x_all = jnp.asarray(images)
  y_all = jnp.asarray(labels if kind == "classifier" else np.zeros(len(images)), jnp.int32)
  key = jax.random.PRNGKey(seed)
  params = net.init(key, jnp.zeros((1, *images.shape[1:])))
  lr = optax.warmup_cosine_decay_schedule(0.0, learning_rate, steps // 20 + 1, steps)
  step = _feature_step(num_outputs, kind, batch_size)
  # A Python loop of compiled steps: XLA:CPU runs convolution gradients inside lax.scan
  # 10-30x slower than as separate calls (measured with jax 0.10).
  start, opt, curve = time.time(), optax.scale_by_adam().init(params), []
  for i in range(steps):
    params, opt, loss = step(params, opt, x_all, y_all, jax.random.fold_in(key, i), lr(i))
    curve.append(loss)
  curve = np.asarray(jax.device_get(curve))
  net_out = FeatureNetwork(jax.device_get(params), {"num_outputs": num_outputs})
  sub = images[rng.choice(len(images), min(len(images), 2000), replace=False)]
  scale = float(np.sqrt(np.mean(net_out.features(sub) ** 2))) or 1.0
  meta = {
    "version": FEATURE_NET_VERSION,
    "kind": kind,
    "num_outputs": num_outputs,
    "steps": steps,
    "image_shape": list(images.shape[1:]),
    "final_loss": float(curve[-max(1, steps // 20) :].mean()),
    "feature_scale": scale,
    "seconds": round(time.time() - start, 1),
  }
  logging.info(
    "feature net (%s) trained: %d steps in %.1f s, loss %.3f",
    kind,
    steps,
    meta["seconds"],
    meta["final_loss"],
  )
  net_out.meta = meta
  return net_out


def feature_net_accuracy(
  net: FeatureNetwork, images: np.ndarray, labels: np.ndarray | None
) -> float:
  """Accuracy on uint8 images (N, H, W, C): of the labels (classifier) or of the 4 rotations."""
  model = FeatureNet(net.meta["num_outputs"])
  logits = jax.jit(lambda x: model.apply(net.params, data.normalize(x))[1])
  if net.meta["kind"] == "classifier":
    pred = _batched(logits, images, 250).argmax(-1)
    return float(np.mean(pred == labels))
  hits = [
    _batched(logits, np.rot90(images, r, axes=(1, 2)).copy(), 250).argmax(-1) == r for r in range(4)
  ]
  return float(np.mean(hits))


def _save_feature_net(path: str, net: FeatureNetwork) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  flat = traverse_util.flatten_dict(net.params, sep="/")
  tmp = path + ".tmp.npz"
  np.savez(
    tmp, __meta__=np.asarray(json.dumps(net.meta)), **{k: np.asarray(v) for k, v in flat.items()}
  )
  os.replace(tmp, path)


def _load_feature_net(path: str) -> FeatureNetwork:
  with np.load(path) as z:
    meta = json.loads(str(z["__meta__"]))
    flat = {k: z[k] for k in z.files if k != "__meta__"}
  return FeatureNetwork(traverse_util.unflatten_dict(flat, sep="/"), meta)


def data_fingerprint(data_config: ml_collections.ConfigDict) -> str:
  """16 hex digits of the data settings that change the images (not prefetch, flips, ...)."""
  d = {
    k: v
    for k, v in data_config.to_dict().items()
    if k not in ("prefetch", "random_flip", "download", "cache_dir")
  }
  return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def feature_network(
  config: ml_collections.ConfigDict,
  workdir: str,
  train_set: data.Dataset | None = None,
  held_out: data.Dataset | None = None,
) -> FeatureNetwork:
  """The workdir's feature net (eval/feature_net.npz), trained first if missing or made for
  other data or another number of steps. Its held-out accuracy is in `meta["accuracy"]`."""
  path = os.path.join(workdir, "eval", "feature_net.npz")
  want = {
    "version": FEATURE_NET_VERSION,
    "steps": int(config.eval.feature_steps),
    "data": data_fingerprint(config.data),
  }
  if os.path.exists(path):
    net = _load_feature_net(path)
    if all(net.meta.get(k) == v for k, v in want.items()):
      logging.info(
        "feature net: %s (%s, held-out accuracy %.3f)",
        path,
        net.meta["kind"],
        net.meta.get("accuracy", float("nan")),
      )
      return net
    logging.info("feature net in %s was made for other data or settings: retraining.", path)
  train_set = train_set or data.load(config.data, split="train")
  net = train_feature_net(
    train_set.images,
    train_set.labels,
    train_set.num_classes,
    steps=want["steps"],
    seed=config.eval.seed,
  )
  net.meta.update(want)
  if held_out is not None and len(held_out):
    net.meta["accuracy"] = feature_net_accuracy(net, held_out.images, held_out.labels)
    logging.info("feature net held-out accuracy (%s): %.3f", net.meta["kind"], net.meta["accuracy"])
  _save_feature_net(path, net)
  return net


# ---- distances between sets of features or images ----------------------------------------------


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


def _down(x: np.ndarray) -> np.ndarray:
  return _filter(x, _BINOMIAL)[:, ::2, ::2]


def _up(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  up = np.zeros((x.shape[0], 2 * x.shape[1], 2 * x.shape[2], x.shape[3]), x.dtype)
  up[:, ::2, ::2] = x
  return _filter(up, 2.0 * _BINOMIAL)[:, : shape[1], : shape[2]]


def laplacian_pyramid(images: np.ndarray, num_levels: int) -> list[np.ndarray]:
  """float (N, H, W, C) -> `num_levels` float32 arrays, finest first: band-pass levels
  x - up(down(x)) and, last, the low-pass residual; they sum back (with upsampling) to x."""
  x = np.asarray(images, np.float32)
  levels = []
  for _ in range(num_levels - 1):
    low = _down(x)
    levels.append(x - _up(low, x.shape))
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
      for j in range(0, directions, 64):
        proj_a = np.sort(da @ dirs[:, j : j + 64], axis=0)
        proj_b = np.sort(db @ dirs[:, j : j + 64], axis=0)
        dists.append(np.abs(proj_a - proj_b).mean(axis=0))
    per_level.append(float(np.concatenate(dists).mean() * 1e3))
  return {"swd": float(np.mean(per_level)), "levels": per_level}


# ---- Inception v3 (the TF FID network) ---------------------------------------------------------

INCEPTION_SIZE = 299
INCEPTION_HELP = (
  "Inception FID needs the TF FID Inception v3 weights (pt_inception-2015-12-05, the file "
  "pytorch-fid uses). Set config.eval.inception_weights to an .npz (or .pkl) of that state dict "
  "with its PyTorch names and layouts. Make it once where torch is installed: download "
  "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
  'pt_inception-2015-12-05-6726825d.pth and run\n  python -c "import torch, numpy as np; '
  "sd = torch.load('pt_inception-2015-12-05-6726825d.pth'); "
  "np.savez('pt_inception-2015-12-05.npz', **{k: v.numpy() for k, v in sd.items()})\""
)


class _Conv(nn.Module):
  """BasicConv2d: convolution without bias, BatchNorm (eps 1e-3, running statistics), ReLU."""

  features: int
  kernel: tuple[int, int] = (1, 1)
  stride: int = 1
  pad: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    pads = [(p, p) for p in self.pad]
    x = nn.Conv(self.features, self.kernel, self.stride, pads, use_bias=False, name="conv")(x)
    return nn.relu(nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x))


def _seq(x: jax.Array, *layers: nn.Module) -> jax.Array:
  for layer in layers:
    x = layer(x)
  return x


_avg3 = lambda x: nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)
_max3 = lambda x: nn.max_pool(x, (3, 3), (2, 2))
_cat = lambda *xs: jnp.concatenate(xs, axis=-1)
_R17, _C17, _R13, _C13 = (1, 7), (7, 1), (1, 3), (3, 1)  # factorised kernels and their pads
_P17, _P71, _P13, _P31 = (0, 3), (3, 0), (0, 1), (1, 0)


class _MixedA(nn.Module):  # Mixed_5b/c/d (FIDInceptionA: average pool without the padding)
  pool: int

  @nn.compact
  def __call__(self, x):
    C = _Conv
    return _cat(
      C(64, name="branch1x1")(x),
      _seq(x, C(48, name="branch5x5_1"), C(64, (5, 5), pad=(2, 2), name="branch5x5_2")),
      _seq(
        x,
        C(64, name="branch3x3dbl_1"),
        C(96, (3, 3), pad=(1, 1), name="branch3x3dbl_2"),
        C(96, (3, 3), pad=(1, 1), name="branch3x3dbl_3"),
      ),
      C(self.pool, name="branch_pool")(_avg3(x)),
    )


class _MixedB(nn.Module):  # Mixed_6a: grid reduction 35 -> 17
  @nn.compact
  def __call__(self, x):
    C = _Conv
    return _cat(
      C(384, (3, 3), 2, name="branch3x3")(x),
      _seq(
        x,
        C(64, name="branch3x3dbl_1"),
        C(96, (3, 3), pad=(1, 1), name="branch3x3dbl_2"),
        C(96, (3, 3), 2, name="branch3x3dbl_3"),
      ),
      _max3(x),
    )


class _MixedC(nn.Module):  # Mixed_6b/c/d/e: factorised 7x7 (FIDInceptionC)
  c7: int

  @nn.compact
  def __call__(self, x):
    C, c7 = _Conv, self.c7
    return _cat(
      C(192, name="branch1x1")(x),
      _seq(
        x,
        C(c7, name="branch7x7_1"),
        C(c7, _R17, pad=_P17, name="branch7x7_2"),
        C(192, _C17, pad=_P71, name="branch7x7_3"),
      ),
      _seq(
        x,
        C(c7, name="branch7x7dbl_1"),
        C(c7, _C17, pad=_P71, name="branch7x7dbl_2"),
        C(c7, _R17, pad=_P17, name="branch7x7dbl_3"),
        C(c7, _C17, pad=_P71, name="branch7x7dbl_4"),
        C(192, _R17, pad=_P17, name="branch7x7dbl_5"),
      ),
      C(192, name="branch_pool")(_avg3(x)),
    )


class _MixedD(nn.Module):  # Mixed_7a: grid reduction 17 -> 8
  @nn.compact
  def __call__(self, x):
    C = _Conv
    return _cat(
      _seq(x, C(192, name="branch3x3_1"), C(320, (3, 3), 2, name="branch3x3_2")),
      _seq(
        x,
        C(192, name="branch7x7x3_1"),
        C(192, _R17, pad=_P17, name="branch7x7x3_2"),
        C(192, _C17, pad=_P71, name="branch7x7x3_3"),
        C(192, (3, 3), 2, name="branch7x7x3_4"),
      ),
      _max3(x),
    )


class _MixedE(nn.Module):  # Mixed_7b (average pool) / Mixed_7c (max pool): FIDInceptionE_1/2
  max_pool: bool

  @nn.compact
  def __call__(self, x):
    C = _Conv
    b3 = C(384, name="branch3x3_1")(x)
    bd = _seq(x, C(448, name="branch3x3dbl_1"), C(384, (3, 3), pad=(1, 1), name="branch3x3dbl_2"))
    pool = nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1))) if self.max_pool else _avg3(x)
    return _cat(
      C(320, name="branch1x1")(x),
      C(384, _R13, pad=_P13, name="branch3x3_2a")(b3),
      C(384, _C13, pad=_P31, name="branch3x3_2b")(b3),
      C(384, _R13, pad=_P13, name="branch3x3dbl_3a")(bd),
      C(384, _C13, pad=_P31, name="branch3x3dbl_3b")(bd),
      C(192, name="branch_pool")(pool),
    )


class InceptionV3(nn.Module):
  """The FID Inception v3 up to pool3: x (B, 299, 299, 3) in [-1, 1] -> (B, 2048).

  Module names follow the PyTorch state dict (e.g. Mixed_5b/branch1x1/conv), so weights load
  by name (`load_inception`)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    C = _Conv
    x = _seq(
      x,
      C(32, (3, 3), 2, name="Conv2d_1a_3x3"),
      C(32, (3, 3), name="Conv2d_2a_3x3"),
      C(64, (3, 3), pad=(1, 1), name="Conv2d_2b_3x3"),
      _max3,
      C(80, name="Conv2d_3b_1x1"),
      C(192, (3, 3), name="Conv2d_4a_3x3"),
      _max3,
    )
    x = _seq(
      x,
      _MixedA(32, name="Mixed_5b"),
      _MixedA(64, name="Mixed_5c"),
      _MixedA(64, name="Mixed_5d"),
      _MixedB(name="Mixed_6a"),
      _MixedC(128, name="Mixed_6b"),
      _MixedC(160, name="Mixed_6c"),
      _MixedC(160, name="Mixed_6d"),
      _MixedC(192, name="Mixed_6e"),
      _MixedD(name="Mixed_7a"),
      _MixedE(False, name="Mixed_7b"),
      _MixedE(True, name="Mixed_7c"),
    )
    return x.mean(axis=(1, 2))


# Flax leaf (collection, name) -> PyTorch state-dict suffix.
_TORCH_NAMES = {
  ("params", "kernel"): "weight",
  ("params", "scale"): "weight",
  ("params", "bias"): "bias",
  ("batch_stats", "mean"): "running_mean",
  ("batch_stats", "var"): "running_var",
}


def inception_torch_names() -> dict[str, tuple[int, ...]]:
  """PyTorch state-dict name -> shape (OIHW for convolutions) of every weight InceptionV3 needs."""
  variables = jax.eval_shape(
    lambda: InceptionV3().init(jax.random.PRNGKey(0), jnp.zeros((1, 299, 299, 3)))
  )
  out = {}
  for path, leaf in traverse_util.flatten_dict(variables).items():
    name = ".".join(path[1:-1]) + "." + _TORCH_NAMES[(path[0], path[-1])]
    shape = leaf.shape
    out[name] = (shape[3], shape[2], shape[0], shape[1]) if path[-1] == "kernel" else shape
  return out


def load_inception(path: str) -> dict[str, Any]:
  """Flax variables of InceptionV3 from an .npz or .pkl of the PyTorch state dict of the FID
  Inception (names like "Mixed_5b.branch1x1.conv.weight", convolutions OIHW). Extra entries
  (fc, num_batches_tracked) are ignored. Raises FileNotFoundError (how to get the file) or
  ValueError (missing or misshapen entries)."""
  if not path:
    raise FileNotFoundError("config.eval.inception_weights is empty. " + INCEPTION_HELP)
  if not os.path.exists(path):
    raise FileNotFoundError(
      f"config.eval.inception_weights={path!r} does not exist. " + INCEPTION_HELP
    )
  if path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as z:
      raw = {k: z[k] for k in z.files}
  elif path.endswith((".pkl", ".pickle")):
    with open(path, "rb") as fh:
      raw = {k: np.asarray(v) for k, v in pickle.load(fh).items()}
  else:
    raise ValueError(
      f"config.eval.inception_weights={path!r}: use an .npz or .pkl file. " + INCEPTION_HELP
    )
  variables = jax.eval_shape(
    lambda: InceptionV3().init(jax.random.PRNGKey(0), jnp.zeros((1, 299, 299, 3)))
  )
  flat, problems = {}, []
  for p, leaf in traverse_util.flatten_dict(variables).items():
    name = ".".join(p[1:-1]) + "." + _TORCH_NAMES[(p[0], p[-1])]
    if name not in raw:
      problems.append(f"missing {name}")
      continue
    arr = np.asarray(raw[name], np.float32)
    if p[-1] == "kernel" and arr.ndim == 4:
      arr = arr.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if arr.shape != leaf.shape:
      problems.append(
        f"{name}: file {raw[name].shape}, expected the PyTorch layout of {leaf.shape}"
      )
    flat[p] = arr
  if problems:
    raise ValueError(
      f"{path} is not the FID Inception state dict ({len(problems)} problems):\n  "
      + "\n  ".join(problems[:8])
      + ("\n  ..." if len(problems) > 8 else "")
      + "\n"
      + INCEPTION_HELP
    )
  return traverse_util.unflatten_dict(flat)


def inception_preprocess(images: jax.Array, size: int = INCEPTION_SIZE) -> jax.Array:
  """uint8 (B, H, W, C), C in {1, 3} -> float32 (B, size, size, 3) in [-1, 1]: bilinear resize
  without antialiasing (PyTorch's interpolate, align_corners=False), then 2 x / 255 - 1."""
  x = images.astype(jnp.float32) / 255.0
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  if x.shape[1:3] != (size, size):
    x = jax.image.resize(x, (x.shape[0], size, size, 3), "bilinear", antialias=False)
  return 2.0 * x - 1.0


def inception_feature_fn(
  variables: dict[str, Any], size: int | None = None
) -> Callable[[jax.Array], jax.Array]:
  """jit-compiled uint8 (B, H, W, C) -> float32 (B, 2048) pool3 features, the images resized to
  `size` (default INCEPTION_SIZE = 299, the standard)."""
  net, variables = InceptionV3(), jax.device_put(variables)
  size = size or INCEPTION_SIZE
  return jax.jit(lambda x: net.apply(variables, inception_preprocess(x, size)))


# ---- quality of a set of images ----------------------------------------------------------------


@dataclasses.dataclass
class Reference:
  """What every image set is compared to: training images and their features."""

  images: np.ndarray  # uint8 (N, H, W, C)
  features: np.ndarray  # (N, 128) feature-net features
  inception: np.ndarray | None = None  # (N, 2048) pool3 features, when the weights are given


def quality(
  images: np.ndarray,
  ref: Reference,
  net: FeatureNetwork,
  *,
  inception_fn: Callable[[jax.Array], jax.Array] | None = None,
  batch_size: int = 250,
  seed: int = 0,
) -> dict[str, Any]:
  """fd, kid, swd (+ swd_levels, and fid, inception_kid with `inception_fn`) of uint8 images
  (N, H, W, C) against the reference set. fid/inception_kid are None without Inception."""
  f = net.features(images, batch_size)
  out = {
    "fd": frechet_distance(f, ref.features),
    "kid": kernel_distance(f, ref.features, seed=seed),
  }
  swd = sliced_wasserstein(images, ref.images, seed=seed)
  out.update(swd=swd["swd"], swd_levels=swd["levels"], fid=None, inception_kid=None)
  if inception_fn is not None and ref.inception is not None:
    g = _batched(inception_fn, images, min(batch_size, 50))
    out["fid"] = frechet_distance(g, ref.inception)
    out["inception_kid"] = kernel_distance(g, ref.inception, seed=seed)
  return out


def parse_samplers(spec: str) -> list[tuple[str, int]]:
  """ "ddim:10,dpm_solver++:20" -> [("ddim", 10), ("dpm_solver++", 20)], names checked."""
  out = []
  for item in (s.strip() for s in spec.split(",")):
    if not item:
      continue
    name, sep, steps = item.rpartition(":")
    if not sep or not steps.strip().isdigit() or int(steps) < 1:
      raise ValueError(f"config.eval.samplers entry {item!r}: write sampler:steps, e.g. ddim:50.")
    samplers.get(name.strip())
    out.append((name.strip(), int(steps)))
  if not out:
    raise ValueError("config.eval.samplers is empty; e.g. 'ddim:10,ddim:50,dpm_solver++:20'.")
  return out


# ---- the eval mode -----------------------------------------------------------------------------


def run(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True) -> dict:
  """The eval mode: bits/dim and sample quality of `workdir`'s checkpoint (config.eval).

  Writes eval/metrics.json (and eval/metrics_step<N>.json, kept per checkpoint) {"step", "bpd",
  "bpd_protocol", "floor": {fd, kid, swd, ...},
  "results": [{sampler, num_steps, nfe, fd, kid, swd, fid, inception_kid, ...}], ...},
  eval/samples_<sampler><steps>.png grids, eval/quality.png (fd against NFE), and appends one
  row per sampler to metrics.jsonl: {"step", "mode": "eval", sampler, num_steps, nfe, fd, kid,
  swd, bpd, the sample settings, floor_fd, floor_swd}. Samples and the held-out floor are scored
  on the same number of images. Returns the metrics.json dict.
  """
  e = config.eval
  todo = parse_samplers(e.samplers)
  inception_vars = load_inception(e.inception_weights) if e.inception_weights else None
  if inception_vars is None:
    logging.warning("Inception FID/KID skipped: config.eval.inception_weights is empty. %s",
                    INCEPTION_HELP)
  step, params = sample_lib.load_params(
    config, workdir, step=e.checkpoint, use_ema=config.sample.use_ema
  )
  out_dir = os.path.join(workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  train_set = data.load(config.data, split="train")
  held = data.load(config.data, split="eval")

  bpd, protocol = None, None
  if e.bpd_images > 0:
    n = min(e.bpd_images, len(held))
    labels = None if held.labels is None else held.labels[:n]
    res = bits_per_dim(
      config,
      params,
      held.images[:n],
      labels,
      batch_size=e.bpd_batch_size,
      seed=e.seed,
      progress=progress,
    )
    bpd, protocol = res["bpd"], {**bpd_protocol(config, n), **res}
    logging.info("bits/dim %.4f +- %.4f on %d held-out images", bpd, res["bpd_stderr"], n)
  else:
    protocol = {"skipped": "config.eval.bpd_images = 0"}

  net = feature_network(config, workdir, train_set, held)
  rng = np.random.default_rng(e.seed)
  pick = np.sort(rng.choice(len(train_set), min(e.reference_images, len(train_set)), replace=False))
  inception_fn = None if inception_vars is None else inception_feature_fn(inception_vars)
  ref_images = train_set.images[pick]
  ref = Reference(ref_images, net.features(ref_images, e.batch_size))
  if inception_fn is not None:
    ref.inception = _batched(inception_fn, ref_images, min(e.batch_size, 50), "inception")
  measure = lambda imgs: quality(
    imgs, ref, net, inception_fn=inception_fn, batch_size=e.batch_size, seed=e.seed
  )
  # Every set is scored at the same size: FD and SWD are biased by the number of images.
  num_images = min(e.num_images, len(held))
  if num_images < e.num_images:
    logging.warning("the held-out split has %d images: scoring %d samples per sampler, not "
                    "config.eval.num_images=%d, so that samples and the floor are comparable.",
                    len(held), num_images, e.num_images)
  real = held.images[:num_images]
  floor = {**measure(real), "num_images": len(real)}
  logging.info(
    "floor (%d held-out vs %d training images): fd %.4g kid %.4g swd %.4g",
    len(real),
    len(ref_images),
    floor["fd"],
    floor["kid"],
    floor["swd"],
  )

  labels = sample_lib.resolve_labels(config, num_images)
  results = []
  for name, steps in todo:
    start = time.time()
    images = sample_lib.generate(
      config,
      params,
      num_images=num_images,
      batch_size=e.batch_size,
      seed=e.seed,
      sampler=name,
      num_steps=steps,
      labels=labels,
      progress=progress,
      desc=f"{name}:{steps}",
    )
    seconds = time.time() - start
    q = measure(images)
    results.append(
      {
        "sampler": name,
        "num_steps": steps,
        "nfe": samplers.network_evaluations(name, steps),
        **q,
        "sampling_seconds": round(seconds, 2),
      }
    )
    visualize.save_grid(
      os.path.join(out_dir, f"samples_{name}{steps}.png"),
      images[:64],
      ncol=config.model.num_classes if labels is not None else None,
    )
    logging.info(
      "%s:%d (NFE %d): fd %.4g kid %.4g swd %.4g%s",
      name,
      steps,
      results[-1]["nfe"],
      q["fd"],
      q["kid"],
      q["swd"],
      "" if q["fid"] is None else f" fid {q['fid']:.4g}",
    )

  metrics = {
    "step": step,
    "bpd": bpd,
    "bpd_protocol": protocol,
    "floor": floor,
    "results": results,
    "num_images": num_images,
    "reference_images": len(ref_images),
    "feature_net": net.meta,
    "sample_settings": {
      k: config.sample[k]
      for k in ("spacing", "eta", "guidance_scale", "clip_x0", "use_ema", "labels")
    },
  }
  for name in ("metrics.json", f"metrics_step{step}.json"):  # the newest, and one per checkpoint
    with open(os.path.join(out_dir, name), "w") as fh:
      json.dump(metrics, fh, indent=2)
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as fh:
    for r in results:
      row = {
        "step": step,
        "mode": "eval",
        "sampler": r["sampler"],
        "num_steps": r["num_steps"],
        "nfe": r["nfe"],
        "fd": r["fd"],
        "kid": r["kid"],
        "swd": r["swd"],
        "bpd": bpd,
        "fid": r["fid"],
        "inception_kid": r["inception_kid"],
        **metrics["sample_settings"],
        "num_images": num_images,
        "floor_fd": floor["fd"],
        "floor_swd": floor["swd"],
      }
      fh.write(json.dumps(row) + "\n")
  visualize.save_image(
    os.path.join(out_dir, "quality.png"), visualize.quality_plot(results, floor=floor["fd"])
  )
  return metrics
