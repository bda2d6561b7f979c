"""The model's side of the few-step objectives (diffusion/objectives.py): the config fields, the
MeanFlow and consistency-distillation losses on a `Diffusion`'s network, and the denoisers the
few-step samplers of solvers.py run on.

A MeanFlow network is the U-Net with a second time input: u(z, r, t) = net(z, k t, labels,
t2=k (t - r)) on the flow process, k = config.diffusion.meanflow_time_scale (default 1). A
consistency model is any model of this project read through its denoiser: f = D + c_skip
(x~ - D), ending at the process's sigma_min.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from diffusion import losses, objectives, solvers
from diffusion.denoiser import clip_x0

# The names model.py's fields use.
MeanFlowSettings, DistillSettings = objectives.MeanFlowSettings, objectives.DistillSettings
TIME_SCALE = objectives.TIME_SCALE


def from_config(config: ml_collections.ConfigDict) -> tuple[dict, dict]:
  """(config.model as a dict, the Diffusion fields objective / meanflow / distill), checked.
  MeanFlow runs XLA attention: its JVP cannot pass through the cudnn kernel."""
  f, model = config.diffusion, config.model.to_dict()
  objective = f.get("objective", "denoising")
  if objective not in objectives.OBJECTIVES:
    raise ValueError(
      f"unknown config.diffusion.objective {objective!r}; set it to one of: "
      f"{', '.join(objectives.OBJECTIVES)}."
    )
  if objective == "meanflow":
    objectives.check_meanflow(f.process, f.prediction, model.get("attention_impl", ""))
    model["attention_impl"] = "xla"
  meanflow = objectives.MeanFlowSettings(
    ratio=float(f.get("meanflow_ratio", 0.25)),
    norm_p=float(f.get("meanflow_norm_p", 1.0)),
    norm_c=float(f.get("meanflow_norm_c", 1e-3)),
    guidance=float(f.get("meanflow_guidance", 1.0)),
    time_scale=float(f.get("meanflow_time_scale", objectives.TIME_SCALE)),
  )
  d = config.get("distill")
  distill = (
    objectives.DistillSettings()
    if d is None
    else objectives.DistillSettings(int(d.num_scales), str(d.solver), float(d.target_ema))
  )
  return model, {"objective": objective, "meanflow": meanflow, "distill": distill}


def check_sampler(diffusion: Any, settings: Any) -> None:
  """ValueError unless `diffusion` can run the SampleSettings `settings` (nothing compiled)."""
  if settings.sampler == "meanflow" and diffusion.objective != "meanflow":
    raise ValueError(
      "the meanflow sampler needs a model trained with config.diffusion.objective=meanflow; "
      "use config.sample.sampler=consistency or a sigma-space solver."
    )
  if (
    diffusion.objective == "meanflow"
    and settings.spacing in solvers.SPACINGS
    and settings.sampler not in solvers.FEW_STEP
  ):
    raise ValueError(
      "a meanflow model samples in sigma space: set config.sample.sampler=meanflow (1-4 steps) "
      "or a sigma-space solver with config.sample.spacing=karras."
    )
  if settings.sampler == "meanflow" and settings.guidance_scale != 1.0:
    raise ValueError(
      "MeanFlow folds guidance into training (config.diffusion.meanflow_guidance); set "
      "config.sample.guidance_scale=1 for the meanflow sampler."
    )


def average_velocity(apply: losses.ModelFn, k: float = objectives.TIME_SCALE):
  """(z, r, t, labels) -> u(z, r, t) of a two-time network call apply(x, k t, labels, k (t - r))."""
  return lambda z, r, t, y: apply(z, k * t, y, k * (t - r))


def denoiser(diffusion: Any, params: Any, labels: jax.Array | None, settings: Any):
  """(denoise, options) for solvers.sample with a few-step sampler: MeanFlow's two-time map
  (x~, s, s') -> x~' (flow time t = s / (1 + s), z = x~ / (1 + s)), or the consistency function
  f (ending at the process's sigma_min) with settings.clip_x0 applied to its output."""
  labels = diffusion._labels(labels)
  lo = diffusion.process.sampling_range()[0]
  if settings.sampler == "meanflow":
    u = average_velocity(diffusion._apply(params), diffusion.meanflow.time_scale)

    def two_time(x: jax.Array, s: jax.Array, s_next: jax.Array) -> jax.Array:
      u_y = lambda z, r, t: u(z, r, t, labels)
      z = objectives.meanflow_step(u_y, x / (1.0 + s), s / (1.0 + s), s_next / (1.0 + s_next))
      return z * (1.0 + s_next)  # z_r / (1 - r)

    return two_time, {}
  raw = diffusion.denoiser(params, labels, dataclasses.replace(settings, clip_x0="none"))
  f = objectives.consistency_fn(raw, lo, diffusion.sigma_data)
  return (lambda x, s: clip_x0(f(x, s), settings.clip_x0)), {"sigma_min": lo}


def loss(
  diffusion: Any,
  apply: losses.ModelFn,
  x0: jax.Array,
  labels: jax.Array | None,
  key: jax.Array,
  train: bool,
  distill: dict | None,
) -> losses.LossOutput:
  """The per-example loss of diffusion.objective (meanflow | consistency) on x0 (B, H, W, C) in
  [-1, 1]; `apply` is the network call being trained (with its dropout). Consistency needs
  `distill` = {"teacher": params, "target": params}."""
  labels, p = diffusion._labels(labels), diffusion.process
  if diffusion.objective == "meanflow":
    loss_, mse, t = objectives.meanflow_batch_loss(
      average_velocity(apply, diffusion.meanflow.time_scale),
      x0,
      key,
      diffusion.meanflow,
      labels=labels,
      label_dropout=diffusion.label_dropout if train else 0.0,
      null_label=diffusion.null_label,
      logit_normal=p.t_distribution == "logit_normal",
      logit_mean=p.logit_mean,
      logit_std=p.logit_std,
    )
    t = jnp.clip(t, 1e-6, 1.0 - 1e-6)
    return losses.LossOutput(loss_, mse, jnp.zeros_like(loss_), 2.0 * jnp.log((1.0 - t) / t))
  if distill is None:
    raise ValueError(
      "config.diffusion.objective=consistency is trained by --mode distill "
      "--config.distill.teacher=WORKDIR."
    )
  lo, hi = p.sampling_range()
  f = lambda den: objectives.consistency_fn(den, lo, diffusion.sigma_data)
  loss_, s = objectives.cd_loss(
    f(diffusion.raw_denoiser(None, labels, apply=apply)),
    f(diffusion.raw_denoiser(distill["target"], labels)),
    diffusion.raw_denoiser(distill["teacher"], labels),
    x0,
    key,
    objectives.cd_levels(diffusion.distill.num_scales, lo, hi),
    solver=diffusion.distill.solver,
  )
  return losses.LossOutput(loss_, loss_, jnp.zeros_like(loss_), -2.0 * jnp.log(s))
