"""`--mode sample`: images from a checkpoint with any registered sampler, saved with the settings.

Writes <workdir>/samples/<tag>/:
  grid.png       the first (up to) 256 images, one row per class for cycled class labels
  images/        one PNG per image, 00000.png, 00001.png, ...
  samples.npz    `images` uint8 (N, H, W, C) in [0, 255]; `labels` int32 (N,) (conditional);
                 a latent run: pixels decoded, and with config.sample.save_latents `latents`
                 float32 (N, h, w, c), the normalised latents they decode from
  settings.json  checkpoint step, parameters (EMA or raw), sampler, steps, NFE, spacing, eta,
                 guidance, labels, number of images, batch size, seed, schedule; runtime: the
                 devices, processes, jax version and backend that drew them
  reverse.gif    the sampler's states from noise to images for `config.sample.gif_images` images
The tag defaults to step{N}_{sampler}{steps}_{spacing}_g{scale}_seed{seed} (plus _eta, _raw,
_y<labels>, _<clip> when those differ from the defaults).

Same settings and seed, same images: image i is drawn with fold_in(PRNGKey(seed), i) alone (its
noise and every random draw of the sampler), so asking for more images extends the set, and the
batch size, the number of devices and of processes change nothing. Sampling runs data-parallel
over the mesh of every device of every process (parallel.make_mesh, the training mesh;
diffusion/generate.py); with several processes every one gathers the images and process 0 writes
them.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from diffusion import autoencoding, generate, parameters, runtime, storage, visualize
from diffusion.model import SampleSettings, resolve_labels

GRID_MAX = 256  # images shown in grid.png


def default_tag(config: ml_collections.ConfigDict, step: int) -> str:
  """step{N}_{sampler}{steps}_{spacing}_g{scale}_seed{seed}, plus what differs from defaults."""
  s = config.sample
  name = f"{s.sampler}{s.num_steps}" + (f"_eta{s.eta:g}" if s.sampler == "ddim" and s.eta else "")
  tag = f"step{step}_{name}_{s.spacing}_g{s.guidance_scale:g}_seed{s.seed}"
  if parameters.sigma_rel_of(s.ema) is not None:
    tag += f"_phema{parameters.sigma_rel_of(s.ema):g}"
  elif not s.use_ema:
    tag += "_raw"
  if str(s.labels).strip():
    tag += "_y" + "-".join(v.strip() for v in str(s.labels).split(",") if v.strip())
  if s.clip_x0 != "clip":  # the default
    tag += "_noclip" if s.clip_x0 == "none" else f"_{s.clip_x0}"
  return tag


def guided(config: ml_collections.ConfigDict) -> bool:
  """Whether sampling uses classifier-free guidance (a conditional model, scale != 1)."""
  return bool(config.model.num_classes) and config.sample.guidance_scale != 1.0


def settings(config: ml_collections.ConfigDict, step: int) -> dict[str, Any]:
  """What produced a sample set (written as settings.json beside it)."""
  s, f = config.sample, config.diffusion
  nfe = SampleSettings.from_config(s).nfe
  return {
    "checkpoint_step": step,
    "parameters": s.ema or ("ema" if s.use_ema else "raw"),
    "sampler": s.sampler,
    "num_steps": s.num_steps,
    "nfe": nfe,
    # Guidance runs the network on the conditional and the unconditional input at every step.
    "network_passes_per_image": nfe * (2 if guided(config) else 1),
    "spacing": s.spacing,
    "eta": s.eta,
    "guidance_scale": s.guidance_scale,
    "clip_x0": s.clip_x0,
    "labels": str(s.labels),
    "num_images": s.num_images,
    "batch_size": s.batch_size,
    "seed": s.seed,
    "schedule": f.schedule,
    "num_timesteps": f.num_timesteps,
    "prediction": f.prediction,
    "variance": f.variance,
    "image_size": config.data.image_size,
    "channels": config.data.channels,
    "runtime": runtime.provenance(),  # mesh, jax version, backend
  }


def run(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True) -> str:
  """The sample mode: samples per config.sample from `workdir`'s checkpoint, written to
  <workdir>/samples/<tag>/ (see the module docstring). Returns that folder."""
  s = config.sample
  if s.num_images <= 0:
    raise ValueError(f"config.sample.num_images must be > 0, got {s.num_images}.")
  # A latent run's model decodes its samples: pixels below, whatever the data's shape.
  diffusion, st = autoencoding.build(config), SampleSettings.from_config(s)
  if s.guidance_scale != 1.0 and not diffusion.conditional:
    logging.warning(
      "config.sample.guidance_scale=%g has no effect: the model is unconditional.", s.guidance_scale
    )
  labels = resolve_labels(diffusion.num_classes, s.labels, s.num_images)
  generate.check_batch(s.batch_size, "sample.batch_size")
  step, params = parameters.load(
    diffusion, workdir, step=s.checkpoint, use_ema=s.use_ema, ema=s.ema
  )
  tag = s.tag or default_tag(config, step)
  out = os.path.join(workdir, "samples", tag)
  logging.info(
    "sampling %d images with %s (%d steps) from step %d into %s",
    s.num_images,
    s.sampler,
    s.num_steps,
    step,
    out,
  )
  images = generate.generate(
    diffusion,
    params,
    st,
    num_images=s.num_images,
    batch_size=s.batch_size,
    seed=s.seed,
    labels=labels,
    progress=progress,
  )
  if jax.process_index() > 0:  # process 0 writes
    return out

  folder = os.path.join(out, "images")
  storage.makedirs(folder)
  for old in storage.listdir(folder):  # a smaller rerun leaves no extras
    if old.endswith(".png"):
      storage.remove(os.path.join(folder, old))
  for i, image in enumerate(images):
    visualize.save_image(os.path.join(folder, f"{i:05d}.png"), image)
  cycled = labels is not None and not str(s.labels).strip()
  ncol = diffusion.num_classes if cycled else None
  visualize.save_grid(os.path.join(out, "grid.png"), images[:GRID_MAX], ncol=ncol)
  arrays = {"images": images} if labels is None else {"images": images, "labels": labels}
  if s.save_latents and isinstance(diffusion, autoencoding.LatentDiffusion):
    arrays["latents"] = autoencoding.latent_samples(
      diffusion,
      params,
      st,
      num_images=s.num_images,
      batch_size=s.batch_size,
      seed=s.seed,
      labels=labels,
    )
  with storage.writing(os.path.join(out, "samples.npz")) as local:
    np.savez_compressed(local, **arrays)
  storage.write_text(
    os.path.join(out, "settings.json"), json.dumps({"tag": tag, **settings(config, step)}, indent=2)
  )
  n_gif = min(s.gif_images, s.num_images)
  if n_gif > 0:
    traj = generate.trajectory(
      diffusion,
      params,
      st,
      num_images=n_gif,
      seed=s.seed,
      labels=None if labels is None else labels[:n_gif],
    )
    visualize.save_reverse_gif(
      os.path.join(out, "reverse.gif"),
      traj[1:],
      x_T=traj[0],
      ncol=ncol if ncol and ncol <= n_gif else None,
    )
  elif storage.exists(os.path.join(out, "reverse.gif")):
    storage.remove(os.path.join(out, "reverse.gif"))  # not from this run's settings
  logging.info("wrote %s", out)
  return out
