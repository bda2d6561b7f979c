"""Metrics as functions of arrays and compiled callables: no config, no files but the ones a caller
names, no orbax, no tfds. The eval mode (diffusion/modes/evaluate.py) wires them to a run.

  bpd          bits/dim of a dataset under a model's variational bound, and its protocol
  feature_net  the small CNN trained on the data whose features FD and KID compare
  inception    the TF FID Inception v3 (pytorch-fid's weights, .npz only, SHA-256 checked): pool3
               features and the 1008-way logits; `python -m diffusion.metrics.inception --convert`
  reference    reference statistics: the published (mu, sigma) .npz format, FeatureMoments that
               accumulate over batches, devices and hosts and resume
  distances    Fréchet distance (of features or (mu, sigma)), KID, improved precision/recall,
               Inception Score, sliced Wasserstein (NumPy, float64)
  quality      one image set scored against a reference set with all of the above

`batched`, shared by them, maps a compiled function over images in fixed-size batches.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm


def batched(
  fn: Callable[[jax.Array], jax.Array], x: np.ndarray, batch_size: int, desc: str = ""
) -> np.ndarray:
  """fn over the rows of `x` (N, ...) in batches of `batch_size` -> NumPy (N, ...). The last batch
  is padded with copies of the last row, so `fn` compiles once; a progress bar when `desc`."""
  n = len(x)
  bs = max(1, min(batch_size, n))
  starts = range(0, n, bs)
  out = []
  for i in tqdm(starts, desc=desc, unit="batch", disable=not desc or len(starts) < 2):
    chunk = x[i : i + bs]
    if len(chunk) < bs:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], bs - len(chunk), axis=0)])
    out.append(np.asarray(jax.device_get(fn(jnp.asarray(chunk)))))
  return np.concatenate(out)[:n]
