"""Which parameters a run samples and evaluates with, read from its run directory: the classic
EMA or the raw parameters of a training checkpoint (<workdir>/checkpoints), or a post-hoc EMA
reconstruction (<workdir>/posthoc/sigma_rel=<x>/, written by `--mode posthoc`).

config.sample.ema selects: "" = the checkpoint's EMA (config.sample.use_ema) or raw parameters;
"posthoc:<sigma_rel>" = the reconstruction for that relative width. Every set is checked against
the model's shapes before it is returned.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from diffusion import checkpoints, posthoc_ema, storage

if TYPE_CHECKING:
  from diffusion.model import Diffusion


def sigma_rel_of(spec: str) -> float | None:
  """config.sample.ema: "" (the classic EMA, or raw parameters) -> None; "posthoc:0.07" -> 0.07.
  Raises ValueError naming the field and the fix for anything else."""
  spec = str(spec).strip()
  if not spec:
    return None
  kind, _, value = spec.partition(":")
  try:
    sigma_rel = float(value)
  except ValueError:
    sigma_rel = -1.0
  if kind != "posthoc" or not 0.0 < sigma_rel < posthoc_ema.SIGMA_REL_MAX:
    raise ValueError(
      f"config.sample.ema={spec!r}: write '' (the classic EMA) or "
      f"'posthoc:<sigma_rel>' with 0 < sigma_rel < {posthoc_ema.SIGMA_REL_MAX:.3f}, "
      "e.g. posthoc:0.07."
    )
  return sigma_rel


def posthoc_folder(workdir: str, sigma_rel: float) -> str:
  """Where `--mode posthoc` writes the reconstruction for `sigma_rel`."""
  return os.path.join(workdir, "posthoc", f"sigma_rel={sigma_rel:g}")


def load_posthoc(diffusion: Diffusion, workdir: str, sigma_rel: float) -> tuple[int, Any]:
  """(step, params) of the post-hoc EMA reconstruction for `sigma_rel`, checked against the
  model."""
  out = posthoc_folder(workdir, sigma_rel)
  if not storage.isdir(out):
    raise FileNotFoundError(
      f"no post-hoc EMA for sigma_rel={sigma_rel:g} in {out}: run "
      f"--mode posthoc --config.sample.ema=posthoc:{sigma_rel:g} first."
    )
  reader = checkpoints.Checkpointer(out, read_only=True)
  try:
    step = reader.latest_step()
    if step is None:
      raise FileNotFoundError(f"{out} holds no complete parameter set; rerun --mode posthoc.")
    params = reader.restore_host(step)["params"]
  finally:
    reader.close()
  diffusion.check_params(params, f" in {out}")
  return int(step), params


def load(
  diffusion: Diffusion, workdir: str, *, step: int = -1, use_ema: bool = True, ema: str = ""
) -> tuple[int, Any]:
  """(step, params) from <workdir>/checkpoints: the newest step when `step` < 0, EMA parameters
  when `use_ema`; or, with `ema` = "posthoc:<sigma_rel>" (config.sample.ema), the parameters
  `--mode posthoc` reconstructed; without checkpoints, config.model.init_from's (step 0). Host
  NumPy pytree, checked against `diffusion`'s model."""
  sigma_rel = sigma_rel_of(ema)
  if sigma_rel is not None:
    return load_posthoc(diffusion, workdir, sigma_rel)
  directory = os.path.join(workdir, "checkpoints")
  if not storage.isdir(directory) and diffusion.init_from:  # converted weights, no training
    return 0, diffusion.pretrained_params()
  if not storage.isdir(directory):
    raise FileNotFoundError(
      f"no checkpoints in {directory}: train first (python launch.py "
      f"--config ... --workdir {workdir}) or pass the --workdir of a "
      "trained run."
    )
  ckpt = checkpoints.Checkpointer(directory, read_only=True)
  try:
    steps = sorted(ckpt.all_steps())
    if not steps:
      raise FileNotFoundError(f"no complete checkpoint in {directory}; train first.")
    if step >= 0 and step not in steps:
      raise ValueError(f"no checkpoint at step {step} in {directory}; available steps: {steps}.")
    # The newest intact checkpoint when step < 0 (a damaged newer one is skipped with a warning).
    state = ckpt.restore_host(None if step < 0 else step)
    chosen = ckpt.restored_step if step < 0 else step
  finally:
    ckpt.close()
  params = state["ema_params" if use_ema else "params"]
  diffusion.check_params(params, f" at step {chosen} in {directory}")
  return int(chosen), params
