"""The heldout protocol of `--mode eval` (run by modes/evaluate.py): bits/dim of held-out images,
and samples and held-out real images (the floor) scored against random training images at one
size, in the features of the in-house feature net (trained here, cached in eval/feature_net.npz)
and of the FID Inception when weights are given. Also the feature net, which fid50k uses too.

A run on latents is scored in pixels: its samples come out decoded, and the real images (floor,
reference, feature net) are the pixel collection its latents were encoded from, split as the
latents are (evaluation/pixels.py). Bits/dim is skipped there: the model's bound is on
normalised latents, not on pixels. Its results carry the autoencoder's fingerprint.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from diffusion import autoencoding, data, generate, parameters, runlog, runtime, storage, visualize
from diffusion.evaluation import GRID_IMAGES, SAMPLE_FIELDS, pixels
from diffusion.metrics import bpd, feature_net, inception
from diffusion.metrics.quality import Reference, quality
from diffusion.model import Diffusion, SampleSettings, resolve_labels


def feature_network(
  config: ml_collections.ConfigDict,
  workdir: str,
  train_set: data.Dataset,
  held_out: data.Dataset | None = None,
) -> feature_net.FeatureNetwork:
  """The workdir's feature net (eval/feature_net.npz), trained on `train_set` first if missing or
  made for other data, another config.eval.feature_steps or another version. Its accuracy on
  `held_out` is in `meta["accuracy"]`."""
  path = os.path.join(workdir, "eval", "feature_net.npz")
  want = {
    "version": feature_net.VERSION,
    "steps": int(config.eval.feature_steps),
    "data": data.fingerprint(config.data),
  }
  if storage.exists(path):
    with storage.reading(path) as local:
      net = feature_net.load(local)
    if all(net.meta.get(k) == v for k, v in want.items()):
      logging.info(
        "feature net: %s (%s, held-out accuracy %.3f)",
        path,
        net.meta["kind"],
        net.meta.get("accuracy", float("nan")),
      )
      return net
    logging.info("feature net in %s was made for other data or settings: retraining.", path)
  net = feature_net.train(
    train_set.images,
    train_set.labels,
    train_set.num_classes,
    steps=want["steps"],
    seed=config.eval.seed,
  )
  net.meta.update(want)
  if held_out is not None and len(held_out):
    net.meta["accuracy"] = feature_net.accuracy(net, held_out.images, held_out.labels)
    logging.info("feature net held-out accuracy (%s): %.3f", net.meta["kind"], net.meta["accuracy"])
  if jax.process_index() == 0:  # every process trains the same net; one writes it
    with storage.writing(path) as local:
      feature_net.save(local, net)
  return net


def bits_per_dim(
  config: ml_collections.ConfigDict,
  diffusion: Diffusion,
  params: Any,
  held: data.Dataset,
  spec: data.DataSpec,
  progress: bool,
) -> tuple[float | None, dict[str, Any]]:
  """(bpd, the protocol with the results) on the first config.eval.bpd_images held-out images, by
  config.eval.bpd_method (the estimate's strata capped at T - 1)."""
  e = config.eval
  if e.bpd_images <= 0:
    return None, {"skipped": "config.eval.bpd_images = 0"}
  if pixels.is_latent_run(config):
    why = "a latent run's bound is on normalised latents, not pixels"
    logging.info("bits/dim skipped: %s.", why)
    return None, {"skipped": why}
  if diffusion.process.name != "vp":
    return None, {"skipped": "bits/dim is the discrete vp process's variational bound"}
  n = min(e.bpd_images, len(held))
  strata = min(e.bpd_strata, diffusion.schedule.num_timesteps - 1)  # T - 1: every term once
  labels = None if held.labels is None else held.labels[:n]
  res = bpd.bits_per_dim(
    diffusion.bpd_fn(e.bpd_method, strata),
    params,
    held.images[:n],
    labels,
    batch_size=e.bpd_batch_size,
    seed=e.seed,
    progress=progress,
  )
  split = (
    spec.eval_split
    if spec.source == "tfds" and spec.eval_split
    else f"held-out {spec.eval_fraction}"
  )
  protocol = bpd.protocol(
    split=split,
    num_images=n,
    num_timesteps=diffusion.schedule.num_timesteps,
    conditional=diffusion.conditional,
    ema=config.sample.use_ema,
    seed=e.seed,
    method=e.bpd_method,
    strata=strata,
  )
  logging.info(
    "bits/dim (%s) %.4f +- %.4f on %d held-out images",
    protocol["bound"],
    res["bpd"],
    res["bpd_stderr"],
    n,
  )
  return res["bpd"], {**protocol, **res}


def run(
  config: ml_collections.ConfigDict,
  workdir: str,
  diffusion: Diffusion,
  todo: list[SampleSettings],
  step: int,
  progress: bool,
) -> dict:
  """The heldout protocol: bits/dim, and samples and held-out images scored against a random
  subset of training images at one size (see the module docstring)."""
  e, s = config.eval, config.sample
  all_labels = resolve_labels(diffusion.num_classes, s.labels, e.num_images)
  weights = inception.load_weights(e.inception_weights) if e.inception_weights else None
  if weights is None:
    logging.warning(
      "Inception FID/KID skipped: config.eval.inception_weights is empty. %s", inception.HELP
    )
  step, params = parameters.load(diffusion, workdir, step=step, use_ema=s.use_ema, ema=s.ema)
  spec = data.DataSpec(**config.data.to_dict())
  train_set, held, pixel_data = pixels.real_images(config, diffusion)
  out_dir = os.path.join(workdir, "eval")
  storage.makedirs(out_dir)

  bpd_value, protocol = bits_per_dim(config, diffusion, params, held, spec, progress)
  net = feature_network(config, workdir, train_set, held)
  rng = np.random.default_rng(e.seed)
  pick = np.sort(rng.choice(len(train_set), min(e.reference_images, len(train_set)), replace=False))
  inception_fn = None if weights is None else inception.feature_fn(weights)
  ref = Reference.build(
    train_set.images[pick],
    net,
    inception_fn=inception_fn,
    batch_size=e.batch_size,
    progress=progress,
  )
  measure = lambda images: quality(
    images, ref, net, inception_fn=inception_fn, batch_size=e.batch_size, seed=e.seed
  )
  # Every set is scored at the same size: FD and SWD are biased by the number of images.
  num_images = min(e.num_images, len(held))
  if num_images < e.num_images:
    logging.warning(
      "the held-out split has %d images: scoring %d samples per sampler, not "
      "config.eval.num_images=%d, so that samples and the floor are comparable.",
      len(held),
      num_images,
      e.num_images,
    )
  floor = {**measure(held.images[:num_images]), "num_images": num_images}
  logging.info(
    "floor (%d held-out vs %d training images): fd %.4g kid %.4g swd %.4g",
    num_images,
    len(pick),
    floor["fd"],
    floor["kid"],
    floor["swd"],
  )

  labels = None if all_labels is None else all_labels[:num_images]
  results = []
  for st in todo:
    start = time.time()
    images = generate.generate(
      diffusion,
      params,
      st,
      num_images=num_images,
      batch_size=e.batch_size,
      seed=e.seed,
      labels=labels,
      progress=progress,
      desc=f"{st.sampler}:{st.num_steps}",
    )
    seconds = time.time() - start
    q = measure(images)
    results.append(
      {
        "sampler": st.sampler,
        "num_steps": st.num_steps,
        "nfe": st.nfe,
        **q,
        "sampling_seconds": round(seconds, 2),
      }
    )
    visualize.save_grid(
      os.path.join(out_dir, f"samples_{st.sampler}{st.num_steps}.png"),
      images[:GRID_IMAGES],
      ncol=diffusion.num_classes if labels is not None else None,
    )
    logging.info(
      "%s:%d (NFE %d): fd %.4g kid %.4g swd %.4g%s",
      st.sampler,
      st.num_steps,
      st.nfe,
      q["fd"],
      q["kid"],
      q["swd"],
      "" if q["fid"] is None else f" fid {q['fid']:.4g}",
    )

  sample_settings = {k: s[k] for k in SAMPLE_FIELDS}
  metrics = {
    "protocol": "heldout",
    "step": step,
    "bpd": bpd_value,
    "bpd_method": protocol.get("method"),
    "bpd_protocol": protocol,
    "floor": floor,
    "results": results,
    "num_images": num_images,
    "reference_images": len(pick),
    "feature_net": net.meta,
    **_autoencoder(diffusion, pixel_data),
    "sample_settings": sample_settings,
    "runtime": runtime.provenance(),  # mesh, jax version, backend
  }
  if jax.process_index() > 0:  # process 0 writes
    return metrics
  for name in ("metrics.json", f"metrics_step{step}.json"):  # the newest, and one per checkpoint
    storage.write_json(os.path.join(out_dir, name), metrics)
  rows = [
    {
      "step": step,
      "mode": "eval",
      "protocol": "heldout",
      "sampler": r["sampler"],
      "num_steps": r["num_steps"],
      "nfe": r["nfe"],
      "fd": r["fd"],
      "kid": r["kid"],
      "swd": r["swd"],
      "bpd": bpd_value,
      "bpd_method": protocol.get("method"),
      "fid": r["fid"],
      "inception_kid": r["inception_kid"],
      **sample_settings,
      "num_images": num_images,
      "floor_fd": floor["fd"],
      "floor_swd": floor["swd"],
      **_autoencoder(diffusion, {}),
    }
    for r in results
  ]
  runlog.append_rows(workdir, rows)
  visualize.save_image(
    os.path.join(out_dir, "quality.png"), visualize.quality_plot(results, floor=floor["fd"])
  )
  return metrics


def _autoencoder(model: Any, pixel_data: dict[str, Any]) -> dict[str, Any]:
  """A latent run's autoencoder fingerprint (and the pixel images read), else nothing."""
  if not isinstance(model, autoencoding.LatentDiffusion):
    return {}
  return {"autoencoder": model.fingerprint, **({"pixel_data": pixel_data} if pixel_data else {})}
