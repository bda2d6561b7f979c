"""Bits/dim of a dataset under a model's variational bound, and the protocol written beside it.

The protocol (`protocol`; the eval mode writes it as "bpd_protocol" in eval/metrics.json):
  split           the held-out split of the data, its first `num_images` images, in order;
  data            8-bit (uint8) images scaled to [-1, 1] as x / 127.5 - 1;
  dequantisation  none: the t = 0 term is the discretised Gaussian decoder -log p(x_0 | x_1)
                  over the 256 bins of each sub-pixel, so the bound is on the discrete data
                  (no uniform noise, no Jacobian term);
  method          "exact": the full T-step variational bound, prior KL(q(x_T|x_0) || N(0, I)) +
                  the T - 1 KL terms + the decoder, every term evaluated (T network evaluations
                  per image, one fresh x_t per term); "estimate": its unbiased stratified
                  estimate (losses.bits_per_dim_stratified: prior and decoder exact, the KL
                  terms' sum from one t in each of `strata` ranges, strata + 1 evaluations per
                  image), whose standard error includes the estimate's own noise. Both in bits
                  per dimension (H W C dimensions);
  conditioning    class-conditional models get the true labels (a bound on -log p(x | y));
  parameters      EMA or raw, as for sampling;
  seed            batch b draws its noise from fold_in(PRNGKey(seed), b).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

# (params, uint8 x (B, H, W, C), int32 labels (B,), key) -> (B, 3) [total, prior, decoder] bits/dim,
# e.g. `Diffusion.bpd_fn()`.
BpdFn = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]


def protocol(
  *,
  split: str,
  num_images: int,
  num_timesteps: int,
  conditional: bool,
  ema: bool,
  seed: int,
  method: str = "exact",
  strata: int = 0,
) -> dict[str, Any]:
  """The bits/dim protocol as written beside the number (see the module docstring)."""
  bound = f"full {num_timesteps}-step VLB (prior + KL terms + decoder)"
  if method == "estimate":
    bound = (
      f"unbiased estimate of the {bound}: prior and decoder exact, the KL terms from one t in "
      f"each of {strata} ranges ({strata + 1} network evaluations per image)"
    )
  return {
    "split": split,
    "num_images": num_images,
    "data": "uint8, x / 127.5 - 1",
    "dequantization": "none: discrete decoder on 8-bit data",
    "method": method,
    "bound": bound,
    "conditioning": "true labels" if conditional else "none",
    "parameters": "ema" if ema else "raw",
    "seed": seed,
  }


def bits_per_dim(
  bpd_fn: BpdFn,
  params: Any,
  images: np.ndarray,
  labels: np.ndarray | None = None,
  *,
  batch_size: int = 64,
  seed: int = 0,
  progress: bool = True,
) -> dict[str, float]:
  """The bound of uint8 images (N, H, W, C) (labels int32 (N,) or None) under `params`, in bits/dim.

  Batches of min(batch_size, N) images, the last one padded by wrapping around (one
  compilation); batch b uses the key fold_in(PRNGKey(seed), b). Returns {"bpd": mean total,
  "bpd_stderr": its standard error, "prior": mean prior term, "decoder": mean t = 0 term,
  "num_images": N}.
  """
  n = len(images)
  if n == 0:
    raise ValueError("bits_per_dim got no images.")
  labels = np.zeros((n,), np.int32) if labels is None else np.asarray(labels, np.int32)
  bs = min(batch_size, n)
  params, base = jax.device_put(params), jax.random.PRNGKey(seed)
  rows = []
  for b in tqdm(range(math.ceil(n / bs)), desc="bits/dim", unit="batch", disable=not progress):
    idx = np.resize(np.arange(b * bs, min((b + 1) * bs, n)), bs)
    out = bpd_fn(
      params, jnp.asarray(images[idx]), jnp.asarray(labels[idx]), jax.random.fold_in(base, b)
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
