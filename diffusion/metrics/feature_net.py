"""The feature network: a small CNN trained on the data, whose 128-d penultimate layer FD and KID
compare when no Inception weights are given (numbers comparable between runs on the same data,
not with published Inception FIDs).

It classifies the labels when the data has them, else the rotation (0/90/180/270 degrees) of
unlabelled images. Saved as one .npz (parameters by flattened name, `__meta__` as JSON text),
read back with allow_pickle=False.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import traverse_util

from diffusion.data import normalize
from diffusion.metrics import batched

VERSION = 1  # bump when the architecture or the training changes: cached nets are retrained


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
  """A trained FeatureNet: parameters and `meta` (kind "classifier" | "rotation", num_outputs,
  steps, image_shape, final_loss, feature_scale, ...; the eval mode adds data, accuracy)."""

  params: Any
  meta: dict[str, Any]

  def _jit(self, output: int) -> Callable[[jax.Array], jax.Array]:
    net, params = FeatureNet(self.meta["num_outputs"]), jax.device_put(self.params)
    apply = jax.jit(lambda p, x: net.apply(p, normalize(x))[output])  # params: not constants
    return lambda x: apply(params, x)

  @functools.cached_property
  def _features(self) -> Callable[[jax.Array], jax.Array]:
    return self._jit(0)

  @functools.cached_property
  def _logits(self) -> Callable[[jax.Array], jax.Array]:
    return self._jit(1)

  def features(self, images: np.ndarray, batch_size: int = 250) -> np.ndarray:
    """float64 (N, 128) of uint8 images (N, H, W, C), divided by the RMS feature of the training
    images (meta "feature_scale"), so that the KID kernel (x.y / d + 1)^3 sees values of order
    one."""
    f = batched(self._features, images, batch_size).astype(np.float64)
    return f / self.meta.get("feature_scale", 1.0)

  def logits(self, images: np.ndarray, batch_size: int = 250) -> np.ndarray:
    """float32 (N, num_outputs) of uint8 images (N, H, W, C)."""
    return batched(self._logits, images, batch_size)


@functools.cache
def _init(num_outputs: int) -> Callable:
  """Compiled (key, example images (1, H, W, C)) -> (params, adam state) of a fresh FeatureNet."""

  def init(key, x):
    params = FeatureNet(num_outputs).init(key, x)
    return params, optax.scale_by_adam().init(params)

  return jax.jit(init)


@functools.cache
def _train_step(num_outputs: int, kind: str, batch_size: int) -> Callable:
  """Compiled Adam step (params, adam state, images, labels, key, learning rate) -> (params,
  adam state, loss) of a FeatureNet on a batch drawn from uint8 `images` on the device."""
  net, adam = FeatureNet(num_outputs), optax.scale_by_adam()

  def loss_fn(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(net.apply(p, x)[1], y).mean()

  @jax.jit
  def step(p, opt, x_all, y_all, k, lr):
    k_idx, k_rot = jax.random.split(k)
    idx = jax.random.randint(k_idx, (batch_size,), 0, x_all.shape[0])
    x, y = normalize(x_all[idx]), y_all[idx]
    if kind == "rotation":
      y = jax.random.randint(k_rot, (batch_size,), 0, 4)
      x = _rotate(x, y)
    loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
    updates, opt = adam.update(grads, opt, p)
    return jax.tree.map(lambda w, u: w - lr * u, p, updates), opt, loss

  return step


def train(
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
  """A FeatureNet trained on uint8 square images (N, S, S, C): a classifier of int32 `labels` (N,)
  when given and num_classes > 1, else of the rotation of each image. `steps` Adam steps (cosine
  decay after a 5% warm-up) on batches drawn on the device from at most `max_images` images."""
  if steps <= 0:
    raise ValueError(f"config.eval.feature_steps must be > 0, got {steps}.")
  if images.shape[1] != images.shape[2]:
    raise ValueError(f"the feature net wants square images, got {images.shape[1:3]}.")
  kind = "classifier" if labels is not None and num_classes > 1 else "rotation"
  rng = np.random.default_rng(seed)
  if len(images) > max_images:
    pick = np.sort(rng.choice(len(images), max_images, replace=False))
    images, labels = images[pick], None if labels is None else labels[pick]
  num_outputs = num_classes if kind == "classifier" else 4
  x_all = jnp.asarray(images)
  y_all = jnp.asarray(labels if kind == "classifier" else np.zeros(len(images)), jnp.int32)
  key = jax.random.PRNGKey(seed)
  start = time.time()
  params, opt = _init(num_outputs)(key, jnp.zeros((1, *images.shape[1:])))
  schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, steps // 20 + 1, steps)
  lrs = np.asarray(schedule(np.arange(steps)), np.float32)
  step, curve = _train_step(num_outputs, kind, batch_size), []
  # A Python loop of compiled steps: XLA:CPU runs convolution gradients inside lax.scan
  # 10-30x slower than as separate calls (measured with jax 0.10).
  for i in range(steps):
    params, opt, loss = step(params, opt, x_all, y_all, jax.random.fold_in(key, i), lrs[i])
    curve.append(loss)
  curve = np.asarray(jax.device_get(curve))
  net = FeatureNetwork(jax.device_get(params), {"num_outputs": num_outputs})
  sub = images[rng.choice(len(images), min(len(images), 2000), replace=False)]
  scale = float(np.sqrt(np.mean(net.features(sub) ** 2))) or 1.0
  net.meta = {
    "version": VERSION,
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
    net.meta["seconds"],
    net.meta["final_loss"],
  )
  return net


def accuracy(net: FeatureNetwork, images: np.ndarray, labels: np.ndarray | None) -> float:
  """Accuracy in [0, 1] on uint8 images (N, H, W, C): of the int32 labels (N,) for a classifier,
  else of the 4 rotations of every image."""
  if net.meta["kind"] == "classifier":
    return float(np.mean(net.logits(images).argmax(-1) == labels))
  hits = [net.logits(np.rot90(images, r, axes=(1, 2)).copy()).argmax(-1) == r for r in range(4)]
  return float(np.mean(hits))


def save(path: str, net: FeatureNetwork) -> None:
  """Writes `net` to `path` (.npz) atomically: a temporary file renamed over it."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  flat = traverse_util.flatten_dict(net.params, sep="/")
  tmp = f"{path}.tmp{os.getpid()}.npz"
  np.savez(
    tmp, __meta__=np.asarray(json.dumps(net.meta)), **{k: np.asarray(v) for k, v in flat.items()}
  )
  os.replace(tmp, path)


def load(path: str) -> FeatureNetwork:
  """The FeatureNetwork saved at `path` by `save` (no object arrays: allow_pickle=False)."""
  with np.load(path, allow_pickle=False) as z:
    meta = json.loads(str(z["__meta__"]))
    flat = {k: z[k] for k in z.files if k != "__meta__"}
  return FeatureNetwork(traverse_util.unflatten_dict(flat, sep="/"), meta)
