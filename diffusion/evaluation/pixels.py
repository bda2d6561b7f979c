"""The real images a run is scored against, as pixels: a pixel run's own data, or for a run on
latents the collection its latent shards were encoded from (data/latents.py `pixel_spec`: the
manifest's source record, or config.eval.pixel_data), at the autoencoder's input size.

The latent records follow the source's order and both splits come from data.holdout_indices of
the same count, so the held-out pixel images are the latents' held-out examples and no training
image reaches the floor. `real_images` checks it: the count must match, and the first few
held-out images, encoded again, must give the stored posterior means (and labels).
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from diffusion import data
from diffusion.data import latents

CHECKED = 4  # held-out images encoded again to confirm the pixel source
TOLERANCE = 0.05  # relative L2 error of their posterior means (float and device noise is far less)


def is_latent_run(config: ml_collections.ConfigDict) -> bool:
  return config.data.source == "latents"


def spec_of(config: ml_collections.ConfigDict) -> data.DataSpec:
  """The pixel DataSpec of the run's real images (module docstring); nothing is read but the
  latent manifest. One-line ValueError / FileNotFoundError naming the field to set."""
  spec = data.DataSpec(**config.data.to_dict())
  if not is_latent_run(config):
    return spec
  root, manifest = latents.read_manifest(spec.path)
  override = config.eval.get("pixel_data", "")
  return latents.pixel_spec(root, manifest, spec.eval_fraction, override)


def real_images(
  config: ml_collections.ConfigDict, model: Any = None, *, stream: bool = False
) -> tuple[Any, Any, dict[str, Any]]:
  """(training split, held-out split, what was read: {} for a pixel run), uint8 pixels as
  data.load gives them (`stream`: a pixel shard folder left on disk). For a latent run `model`
  is its `autoencoding.LatentDiffusion` (module, ae_params), used to confirm that the pixel
  images are the ones encoded (module docstring); one-line ValueError otherwise."""
  spec = spec_of(config)
  train = data.load(spec, split="train", stream=stream)
  held = data.load(spec, split="eval", stream=stream)
  if not is_latent_run(config):
    return train, held, {}
  return train, held, _confirm(config, model, spec, len(train) + len(held), held)


def _confirm(
  config: ml_collections.ConfigDict, model: Any, spec: data.DataSpec, count: int, held: Any
) -> dict[str, Any]:
  """Checks the pixel collection `spec` (`count` images, held-out split `held`) against the
  latents (module docstring) -> what was read."""
  lat_spec = data.DataSpec(**config.data.to_dict())
  lat = data.load(lat_spec, split="eval", stream=True)  # LatentDataset of the held-out examples
  where = spec.path or spec.name or f"{spec.num_sprites} sprites"
  fix = f"set {latents.PIXEL_FIELD} to the collection the latents were encoded from"
  if count != lat.manifest.count or len(held) != len(lat):
    raise ValueError(
      f"the pixel images in {where} are {count}, the latents in {lat_spec.path} "
      f"{lat.manifest.count}; {fix}."
    )
  k = min(CHECKED, len(held))
  moments, labels = lat.moments(np.arange(k))
  images, held_labels = held.read(np.arange(k))
  m = model.module
  x = data.normalize(images)
  mean = np.asarray(jax.jit(lambda p, x: m.apply(p, x, method=m.encode)[0])(model.ae_params, x))
  stored = moments[:, 0, 0]  # view 0 (the image itself), its posterior mean
  err = np.linalg.norm((mean - stored).reshape(k, -1), axis=1)
  err /= np.linalg.norm(stored.reshape(k, -1), axis=1) + 1e-12
  same_labels = labels is None or held_labels is None or np.array_equal(labels, held_labels)
  if err.max() > TOLERANCE or not same_labels:
    raise ValueError(
      f"the pixel images in {where} are not the ones the latents in {lat_spec.path} were "
      f"encoded from (held-out images re-encoded differ by {err.max():.2g}); {fix}."
    )
  about = {
    "source": spec.source,
    "input": where,
    "image_shape": list(images.shape[1:]),
    "images": count,
    "held_out": len(held),
    "checked": k,
    "max_relative_error": float(err.max()),
  }
  logging.info(
    "pixel images of the latents: %s %s, %d images %s (%d held out; %d re-encoded, error %.2g)",
    spec.source,
    where,
    count,
    images.shape[1:],
    len(held),
    k,
    err.max(),
  )
  return about
