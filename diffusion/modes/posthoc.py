"""`--mode posthoc`: the EMA of any width, reconstructed after training (EDM2, Karras et al. 2024).

Training with config.train.posthoc_ema = (0.05, 0.10) tracks one power-function EMA per relative
width (sigma_rel) and saves their snapshots every config.train.posthoc_every steps into
<workdir>/phema/<step>/, never deleted. This mode solves for the combination of snapshots whose
averaging profile best matches sigma_rel = config.sample.ema's "posthoc:<sigma_rel>" at the newest
snapshot's step (diffusion/posthoc_ema.py) and writes the parameters to
<workdir>/posthoc/sigma_rel=<x>/<step>/ (orbax), with coefficients.json beside them. Sample and
eval modes then use them with the same config.sample.ema.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from diffusion import checkpoints, parameters, posthoc_ema, rundir, storage
from diffusion.model import Diffusion


def _state(saved: Any) -> posthoc_ema.PowerEMAState:
  """A restored snapshot (orbax gives the dataclass back as a dict) as a PowerEMAState."""
  emas = saved["emas"]
  if isinstance(emas, dict):
    emas = [emas[k] for k in sorted(emas, key=int)]
  return posthoc_ema.PowerEMAState(
    emas=tuple(emas), sigma_rels=np.asarray(saved["sigma_rels"]), gammas=np.asarray(saved["gammas"])
  )


def run(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Reconstructs config.sample.ema's profile; returns the folder written."""
  sigma_rel = parameters.sigma_rel_of(config.sample.ema)
  if sigma_rel is None:
    raise ValueError(
      "--mode posthoc needs config.sample.ema='posthoc:<sigma_rel>', e.g. "
      "--config.sample.ema=posthoc:0.07."
    )
  diffusion = Diffusion.from_config(config)
  directory = os.path.join(workdir, rundir.PHEMA)
  if not storage.isdir(directory):
    raise FileNotFoundError(
      f"no power-EMA snapshots in {directory}: train with "
      "config.train.posthoc_ema set (e.g. (0.05, 0.10))."
    )
  reader = checkpoints.Checkpointer(directory, read_only=True)
  saved, damaged = [], []
  try:
    for step in sorted(reader.all_steps()):
      try:
        saved.append((step, _state(reader.restore_host(step))))
      except checkpoints.DamagedCheckpointError as e:  # the others still fit the profile
        damaged.append(step)
        logging.warning(
          "%s Left out of the reconstruction (fewer snapshots fit the profile less closely); "
          "move %s away to silence this.",
          e,
          os.path.join(directory, str(step)),
        )
  finally:
    reader.close()
  if not saved:
    raise FileNotFoundError(
      f"no intact power-EMA snapshot in {directory}"
      + (f" (damaged: steps {damaged})" if damaged else "")
      + "; train on with config.train.posthoc_ema set to write new ones."
    )
  steps, gammas, trees = posthoc_ema.flatten_snapshots(saved)
  target = int(steps.max())
  coefficients = posthoc_ema.solve_coefficients(
    steps, gammas, target, float(posthoc_ema.std_to_exp(sigma_rel))
  )
  params = posthoc_ema.reconstruct(trees, coefficients)
  diffusion.check_params(params, f" reconstructed from {directory}")
  out = parameters.posthoc_folder(workdir, sigma_rel)
  writer = checkpoints.Checkpointer(out, keep=1, async_save=False)
  try:
    writer.save(target, {"params": params})
  finally:
    writer.close()
  snapshots = [
    {"step": int(s), "gamma": float(g), "coefficient": float(x)}
    for s, g, x in zip(steps, gammas, coefficients, strict=True)
  ]
  storage.write_text(
    os.path.join(out, "coefficients.json"),
    json.dumps({"sigma_rel": sigma_rel, "step": target, "snapshots": snapshots}, indent=2),
  )
  logging.info(
    "post-hoc EMA sigma_rel=%g at step %d from %d snapshots -> %s",
    sigma_rel,
    target,
    len(steps),
    out,
  )
  return out
