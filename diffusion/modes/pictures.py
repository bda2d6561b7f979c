"""`--mode pictures`: pictures that explain a run, from its config and metrics.jsonl.

Writes <workdir>/pictures/:
  forward.png   the forward process q(x_t | x_0) on a few training images, 8 noise levels
  schedule.png  alpha-bar and log-SNR of the configured schedule against the usual ones
  loss.png      the training loss (raw and smoothed), when metrics.jsonl has training rows
Needs no checkpoint and compiles no diffusion network: the schedule comes from the run's
`Diffusion`. A run on latents draws forward.png in pixels: the forward process runs on the
normalised posterior means of a few training examples' latents, and every state is decoded by
the run's autoencoder (the t=0 column shows the autoencoder's reconstructions).
"""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np

from diffusion import autoencoding, data, runlog, schedules, visualize
from diffusion.model import Diffusion

COMPARE_SCHEDULES = ("linear", "scaled_linear", "cosine", "sigmoid")  # drawn beside the run's


def run(config: ml_collections.ConfigDict, workdir: str, *, num_images: int = 6) -> dict[str, str]:
  """Writes the pictures (see the module docstring) for `num_images` training images; returns
  name ("forward", "schedule", "loss") -> path."""
  f = config.diffusion
  mine = Diffusion.from_config(config).schedule
  latent = config.data.source == "latents"
  dataset = data.load(data.DataSpec(**config.data.to_dict()), split="train", stream=latent)
  pick = np.random.default_rng(config.seed).choice(
    len(dataset), min(num_images, len(dataset)), replace=False
  )
  out = os.path.join(workdir, "pictures")
  paths = {
    "forward": os.path.join(out, "forward.png"),
    "schedule": os.path.join(out, "schedule.png"),
  }
  index = np.sort(pick)
  if latent:  # the autoencoder's pixels of the noised latents
    x0, decode = _latent_means(dataset, index), jax.jit(autoencoding.build(config).decode)
  else:
    x0, decode = dataset.images[index], None
  strip = visualize.forward_strip(
    x0,
    mine,
    visualize.default_strip_timesteps(mine.num_timesteps),
    seed=config.seed,
    decode=decode,
  )
  visualize.save_image(paths["forward"], strip)
  mine_name = f"{f.schedule} (configured)"
  named = {mine_name: mine}
  for name in COMPARE_SCHEDULES:
    if name != f.schedule or f.schedule_params.to_dict():
      named[name] = schedules.make(name, mine.num_timesteps)
  visualize.save_image(paths["schedule"], visualize.schedule_plot(named, highlight=mine_name))
  rows = runlog.train_rows(runlog.read_metrics(workdir))
  losses = np.array([float(r["loss"]) for r in rows], np.float64)
  if np.isfinite(losses).any():
    paths["loss"] = os.path.join(out, "loss.png")
    visualize.save_image(paths["loss"], visualize.loss_curve([r["step"] for r in rows], losses))
  return paths


def _latent_means(dataset, index: np.ndarray) -> np.ndarray:
  """float32 (n, h, w, c): the normalised posterior means (view 0) of latent examples `index`."""
  moments, _ = dataset.moments(index)
  scale, shift = dataset.manifest.scale_shift
  return ((moments[:, 0, 0] - shift) * scale).astype(np.float32)
