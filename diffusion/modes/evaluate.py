"""`--mode eval`: sample quality (and bits/dim) of a checkpoint by one of two protocols.

config.eval.protocol:
  heldout   (the default) bits/dim of config.eval.bpd_images held-out images (metrics/bpd.py;
            config.eval.bpd_method: the unbiased estimate with its standard error, or the exact
            T-step bound),
            and for every config.eval.samplers entry and, as the floor, for held-out real images:
            fd, kid (feature net trained here on the data, cached in eval/feature_net.npz), swd,
            and fid, inception_kid with config.eval.inception_weights, against
            config.eval.reference_images random training images (metrics/quality.py), every set
            at one size (at most the held-out split's). A quick, size-matched comparison of runs
            of this codebase; not comparable with published FIDs.
  fid50k    the papers' protocol (DDPM, ADM, EDM): config.eval.num_samples (50,000) samples per
            sampler against the statistics of the WHOLE training split (computed once per data
            fingerprint and feature network, cached in config.eval.reference_dir; or
            config.eval.reference, an .npz of mu and sigma such as guided-diffusion's and EDM's):
            FID, KID, Inception Score (config.eval.is_splits splits) and precision/recall
            (Kynkaanniemi et al. 2019, k = 3), in the FID Inception's features when
            config.eval.inception_weights is set, else (labelled "feature_net") the in-house net's.
            KID and precision/recall use the first config.eval.kid_pr_samples samples and as many
            random training images (the moments for FID use every image).

A run on latents (config.data.source = "latents") is scored in pixels under both protocols: its
samples come out decoded, and its real images are the pixel collection the latents were encoded
from (evaluation/pixels.py; config.eval.pixel_data when it moved), or fid50k's
config.eval.reference. Its heldout results skip bits/dim; all carry the autoencoder's fingerprint.

fid50k (its machinery in diffusion/evaluation/fid50k.py; this module reads the config, names the
folders and writes the results) samples and extracts features in one compiled call per batch,
data-parallel over every device of every process (image i keyed by
fold_in(PRNGKey(config.eval.seed), i), so the device and process counts change nothing). Each
process accumulates its own images' statistics and saves them in
<workdir>/eval/fid50k/step<N>/<sampler><steps>-<hash>/ every config.eval.chunk_images images
(atomically); a rerun resumes from the newest state every process saved, giving the same numbers;
process 0 merges the states (the workdir must be shared, as for checkpoints).
config.eval.watch scores each new checkpoint of a training run as it appears. On a gs:// workdir
only heldout runs (fid50k's states are local files; use a gcsfuse mount).

Writes <workdir>/eval/metrics.json (the newest result), per checkpoint eval/metrics_step<N>.json
(heldout) or eval/fid50k/metrics_step<N>.json, sample grids, and one metrics.jsonl row per sampler
(through runlog.append_rows) with the protocol, the number of samples, the reference and the
sampler settings beside the numbers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time

import jax
import ml_collections
from absl import logging

from diffusion import (
  autoencoding,
  checkpoints,
  data,
  generate,
  parallel,
  parameters,
  runlog,
  runtime,
  storage,
  visualize,
)
from diffusion.evaluation import (
  GRID_IMAGES,
  SAMPLE_FIELDS,
  check,
  fid50k,
  heldout,
  parse_samplers,
  pixels,
)
from diffusion.evaluation.heldout import feature_network
from diffusion.model import Diffusion, SampleSettings, resolve_labels


def cache_dir(config: ml_collections.ConfigDict) -> str:
  """config.eval.reference_dir, else $XDG_CACHE_HOME (~/.cache)/diffusion/fid_reference."""
  if config.eval.reference_dir:
    return os.path.expanduser(config.eval.reference_dir)
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "diffusion", "fid_reference")


def extractor(config: ml_collections.ConfigDict, workdir: str) -> fid50k.Extractor:
  """The FID Inception with config.eval.inception_weights, else the workdir's feature net."""
  e = config.eval
  if e.inception_weights:
    return fid50k.inception_extractor(e.inception_weights)
  net = feature_network(config, workdir, data.load(pixels.spec_of(config), split="train"), None)
  return fid50k.feature_net_extractor(net)


def _signature(
  config: ml_collections.ConfigDict, step: int, st: SampleSettings, ext: fid50k.Extractor
) -> str:
  """8 hex digits of everything a sample set's statistics depend on (not the batch size or the
  device count): a resume continues only the same computation."""
  e, s = config.eval, config.sample
  what = {
    "step": step,
    "parameters": s.ema or ("ema" if s.use_ema else "raw"),
    "labels": s.labels,
    "settings": dataclasses.asdict(st),
    "num_samples": e.num_samples,
    "seed": e.seed,
    "kid_pr_samples": e.kid_pr_samples,
    "is_splits": e.is_splits,
    "features": ext.ident,
  }
  return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _fid50k(
  config: ml_collections.ConfigDict,
  workdir: str,
  diffusion: Diffusion,
  todo: list[SampleSettings],
  step: int,
  progress: bool,
) -> dict:
  """The fid50k protocol (see the module docstring)."""
  if storage.is_remote(workdir):
    raise ValueError(
      f"config.eval.protocol=fid50k keeps resumable states in files of the workdir, which is not "
      f"supported on {workdir} yet: evaluate through a gcsfuse mount of the bucket (--workdir "
      "/mnt/...), or use config.eval.protocol=heldout."
    )
  e, s = config.eval, config.sample
  protocol = fid50k.Protocol(
    num_samples=e.num_samples,
    batch_size=e.batch_size,
    seed=e.seed,
    kid_pr_samples=e.kid_pr_samples,
    is_splits=e.is_splits,
    chunk_images=e.chunk_images,
  )
  lead = jax.process_index() == 0
  mesh = parallel.make_mesh()
  ext = extractor(config, workdir)
  if ext.name != "inception":
    logging.warning(
      "fid50k with the in-house feature net (config.eval.inception_weights is "
      "empty): its numbers are NOT comparable with published FIDs."
    )
  step, params = parameters.load(diffusion, workdir, step=step, use_ema=s.use_ema, ema=s.ema)
  if config.data.source == "latents" and e.reference:  # the reference batch's pixels (arr_0)
    from diffusion.metrics.reference import load_images

    train = data.Dataset(load_images(e.reference), None, 0)
  elif config.data.source == "latents":  # the pixel images the latents were encoded from
    train, _, _ = pixels.real_images(config, diffusion, stream=True)
  else:
    train = data.load(data.DataSpec(**config.data.to_dict()), split="train", stream=True)
  out_dir = os.path.join(workdir, "eval", e.protocol)
  ref = fid50k.reference_statistics(
    protocol,
    train,
    ext,
    mesh,
    fingerprint=data.fingerprint(config.data),
    cache_dir=cache_dir(config),
    parts_dir=os.path.join(out_dir, "reference_parts"),
    reference=e.reference,
    progress=progress,
  )
  labels = resolve_labels(diffusion.num_classes, s.labels, e.num_samples)
  results = []
  for st in todo:
    name = f"{st.sampler}{st.num_steps}"
    directory = os.path.join(out_dir, f"step{step}", f"{name}-{_signature(config, step, st, ext)}")
    start = time.time()
    grid = os.path.join(out_dir, f"samples_{name}.png")
    acc = fid50k.sample_statistics(
      protocol,
      diffusion,
      params,
      st,
      ext,
      mesh,
      directory,
      labels=labels,
      progress=progress,
      first_batch=lambda images, path=grid: visualize.save_grid(path, images[:GRID_IMAGES]),
    )
    if lead:
      q = fid50k.score(acc, ref, e.seed)
      results.append(
        {
          "sampler": st.sampler,
          "num_steps": st.num_steps,
          "nfe": st.nfe,
          **q,
          "seconds": round(time.time() - start, 2),
        }
      )
      logging.info(
        "fid50k %s:%d (NFE %d, %d samples, %s features): fid %.4g kid %s is %s "
        "precision %s recall %s",
        st.sampler,
        st.num_steps,
        st.nfe,
        e.num_samples,
        ext.name,
        q["fid"],
        q["kid"],
        q["inception_score"],
        q["precision"],
        q["recall"],
      )
  if not lead:
    return {}
  sample_settings = {k: s[k] for k in SAMPLE_FIELDS}
  comparable = ext.official and e.num_samples == 50_000
  metrics = {
    "protocol": e.protocol,
    "step": step,
    "num_samples": e.num_samples,
    "features": ext.describe(),
    "reference": ref["about"],
    **({"autoencoder": diffusion.fingerprint} if config.data.source == "latents" else {}),
    "kid_pr_samples": min(e.kid_pr_samples, e.num_samples),
    "pr_k": fid50k.PR_K,
    "is_splits": e.is_splits,
    "seed": e.seed,
    "paper_comparable": comparable,
    "results": results,
    "sample_settings": sample_settings,
    "runtime": runtime.provenance(),  # mesh, jax version, backend
  }
  storage.write_json(os.path.join(workdir, "eval", "metrics.json"), metrics)
  storage.write_json(result_path(workdir, e.protocol, step), metrics)
  rows = [
    {
      "step": step,
      "mode": "eval",
      "protocol": e.protocol,
      **{
        k: r[k]
        for k in (
          "sampler",
          "num_steps",
          "nfe",
          "fid",
          "kid",
          "inception_score",
          "inception_score_std",
          "precision",
          "recall",
        )
      },
      "features": ext.name,
      "num_samples": e.num_samples,
      "reference": ref["about"]["path"],
      "data_fingerprint": ref["about"]["data_fingerprint"],
      **({"autoencoder": diffusion.fingerprint} if config.data.source == "latents" else {}),
      **sample_settings,
    }
    for r in results
  ]
  runlog.append_rows(workdir, rows)
  storage.rmtree(os.path.join(out_dir, f"step{step}"))  # resume states
  return metrics


# ---- the mode -----------------------------------------------------------------------------------


def result_path(workdir: str, protocol: str, step: int) -> str:
  """The metrics file of `protocol` at checkpoint `step` (its presence: scored)."""
  if protocol == "heldout":
    return os.path.join(workdir, "eval", f"metrics_step{step}.json")
  return os.path.join(workdir, "eval", protocol, f"metrics_step{step}.json")


def evaluate(
  config: ml_collections.ConfigDict, workdir: str, step: int, *, progress: bool = True
) -> dict:
  """Scores the checkpoint at `step` (-1: the newest) with config.eval.protocol; returns the
  metrics.json dict (empty on processes other than 0 for fid50k)."""
  e, s = config.eval, config.sample
  diffusion = autoencoding.build(config)  # a latent run's samples come out decoded
  todo = parse_samplers(e.samplers, s)
  resolve_labels(diffusion.num_classes, s.labels, 1)  # a bad spec fails here
  if e.protocol == "heldout":
    return heldout.run(config, workdir, diffusion, todo, step, progress)
  return _fid50k(config, workdir, diffusion, todo, step, progress)


def _checkpoint_steps(workdir: str) -> list[int]:
  """The complete checkpoints' steps in <workdir>/checkpoints, ascending ([] if none)."""
  directory = os.path.join(workdir, "checkpoints")
  if not storage.isdir(directory):
    return []
  ckpt = checkpoints.Checkpointer(directory, read_only=True)
  try:
    return sorted(ckpt.all_steps())
  finally:
    ckpt.close()


def watch(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True) -> list[int]:
  """Scores every checkpoint of a training workdir as it appears (oldest first, skipping those
  already scored), polling every config.eval.poll_seconds, until the final step
  (config.train.num_steps) is scored, or until no new checkpoint came for config.eval.
  watch_timeout seconds (0: wait forever). Returns the steps scored now."""
  e, final = config.eval, config.train.num_steps
  scored, seen, last_new = [], set(), time.time()  # seen: scored or skipped by this watch
  while True:
    steps = _checkpoint_steps(workdir) if jax.process_index() == 0 else []
    new = [
      s for s in steps if s not in seen and not storage.exists(result_path(workdir, e.protocol, s))
    ]
    done = any(s >= final and s not in new for s in steps)
    # -1: nothing to do yet; -2: finished or timed out; else the step to score, on every process
    waited = e.watch_timeout and time.time() - last_new > e.watch_timeout
    step = parallel.broadcast(new[0] if new else -2 if done or waited else -1)
    if step == -2:
      if not done:
        logging.warning(
          "watch: no new checkpoint in %s for %gs; stopping (final step %d not scored).",
          workdir,
          e.watch_timeout,
          final,
        )
      return scored
    if step == -1:
      time.sleep(e.poll_seconds)
      continue
    logging.info("watch: scoring step %d of %s", step, workdir)
    seen.add(step)
    try:
      evaluate(config, workdir, step, progress=progress)
      scored.append(step)
    except ValueError as err:  # deleted by the keep policy before it was read
      if step in _checkpoint_steps(workdir):
        raise
      logging.warning("watch: step %d was deleted before it was scored (%s)", step, err)
    last_new = time.time()


def run(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True) -> dict:
  """The eval mode: config.eval.protocol on `workdir`'s checkpoint (config.eval.checkpoint), or
  with config.eval.watch on every checkpoint as training writes it. Every setting is checked
  before anything is loaded, compiled or written. Returns the metrics.json dict ({"scored":
  [steps]} when watching)."""
  check(config)
  generate.check_batch(config.eval.batch_size, "eval.batch_size")
  if config.eval.watch:
    return {"scored": watch(config, workdir, progress=progress)}
  return evaluate(config, workdir, config.eval.checkpoint, progress=progress)
