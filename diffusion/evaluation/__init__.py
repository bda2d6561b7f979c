"""The two evaluation protocols of `--mode eval` as library code, and config.eval's checks.

  heldout.py  bits/dim of held-out images; samples and held-out images (the floor) scored
              against training images at one size, in the in-house feature net's features
              (and the FID Inception's when weights are given). This codebase's own numbers.
  fid50k.py   the papers' protocol: num_samples samples against the whole training set's (or a
              published) Inception statistics, resumable in chunks.

`check(config)` validates config.eval without loading, compiling or writing anything (launch.py
calls it); `parse_samplers` reads config.eval.samplers.
"""

from __future__ import annotations

import os

import ml_collections

from diffusion.model import BPD_METHODS, SampleSettings

PROTOCOLS = ("heldout", "fid50k")
# config.sample fields written beside every score (what else decides the samples)
SAMPLE_FIELDS = ("spacing", "eta", "guidance_scale", "clip_x0", "use_ema", "ema", "labels")
GRID_IMAGES = 64  # samples shown in each samples_<sampler><steps>.png


def parse_samplers(spec: str, sample: ml_collections.ConfigDict) -> list[SampleSettings]:
  """ "ddim:10,dpm_solver++:20" -> config.sample's settings with each sampler and step count,
  checked (names: the registry of diffusion/solvers.py)."""
  out = []
  for item in (s.strip() for s in spec.split(",")):
    if not item:
      continue
    name, sep, steps = item.rpartition(":")
    if not sep or not steps.strip().isdigit() or int(steps) < 1:
      raise ValueError(f"config.eval.samplers entry {item!r}: write sampler:steps, e.g. ddim:50.")
    out.append(SampleSettings.from_config(sample, sampler=name.strip(), num_steps=int(steps)))
  if not out:
    raise ValueError("config.eval.samplers is empty; e.g. 'ddim:10,ddim:50,dpm_solver++:20'.")
  return out


def _at_least(e: ml_collections.ConfigDict, least: dict[str, int]) -> None:
  for field, low in least.items():
    if e[field] < low:
      raise ValueError(f"config.eval.{field} must be >= {low}, got {e[field]}.")


def check(config: ml_collections.ConfigDict) -> None:
  """config.eval, checked without loading, compiling or writing anything: the protocol, image
  counts and batch sizes (FD and KID need two images per set), the samplers, fid50k's reference
  and the watch settings. Raises ValueError (FileNotFoundError for a missing reference)."""
  e, s = config.eval, config.sample
  if e.protocol not in PROTOCOLS:
    raise ValueError(
      f"config.eval.protocol={e.protocol!r} is unknown; use one of: {', '.join(PROTOCOLS)}."
    )
  _at_least(
    e,
    dict(
      num_images=2,
      reference_images=2,
      batch_size=1,
      bpd_images=0,
      bpd_batch_size=1,
      bpd_strata=1,
      feature_steps=1,
    ),
  )
  if e.bpd_method not in BPD_METHODS:
    raise ValueError(
      f"config.eval.bpd_method={e.bpd_method!r} is unknown; use one of: {', '.join(BPD_METHODS)}."
    )
  parse_samplers(e.samplers, s)
  if e.get("pixel_data") and config.data.source != "latents":
    raise ValueError(
      "config.eval.pixel_data names the pixels of a run on latents; this run reads "
      f"config.data.source={config.data.source!r}: leave config.eval.pixel_data empty."
    )
  if e.protocol == "fid50k":
    _at_least(e, dict(num_samples=2, kid_pr_samples=0, is_splits=1, chunk_images=1))
    if e.is_splits > e.num_samples:
      raise ValueError(
        f"config.eval.is_splits={e.is_splits} exceeds config.eval.num_samples={e.num_samples}."
      )
    if e.reference:
      if not e.reference.endswith(".npz"):
        raise ValueError(
          f"config.eval.reference={e.reference!r}: use an .npz with mu and sigma (the "
          "guided-diffusion / EDM reference format)."
        )
      if not os.path.isfile(e.reference):
        raise FileNotFoundError(f"config.eval.reference={e.reference!r} does not exist.")
      if not e.inception_weights:
        raise ValueError(
          "config.eval.reference holds Inception statistics: set config.eval.inception_weights "
          "too (without them the features are the in-house net's)."
        )
  if e.watch:
    if e.poll_seconds <= 0 or e.watch_timeout < 0:
      raise ValueError(
        "config.eval.poll_seconds must be > 0 and config.eval.watch_timeout >= 0, got "
        f"{e.poll_seconds} and {e.watch_timeout}."
      )
    if s.ema or e.checkpoint >= 0:
      raise ValueError(
        "config.eval.watch scores every checkpoint as it appears: leave config.eval.checkpoint "
        "at -1 and config.sample.ema empty."
      )
