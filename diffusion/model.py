"""`Diffusion`: the model of a run, built once from the config; the one place that maps config
fields to library arguments.

    diffusion = Diffusion.from_config(config)   # validates every name and shape, compiles nothing
    params = diffusion.init_params(key)
    out = diffusion.loss(params, images_u8, labels, key)         # per-example losses.LossOutput
    fn = diffusion.sample_fn(SampleSettings.from_config(config.sample))
    images = fn(params, key, labels, n)                          # (n, H, W, C) in [-1, 1]
    bpd = diffusion.bpd_fn()(params, images_u8, labels, key)     # (B, 3) bits/dim (exact VLB)

Train, sample, eval, pictures and the benchmark get all of these from here; the maths modules
below receive typed values only. A new kind of process or parameterisation is a new field here.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion import checkpoints, denoiser, few_step, losses, processes, schedules, solvers
from diffusion.data import normalize
from diffusion.nets import convert, dit, unet
from diffusion.sample_settings import SampleSettings, _choice, resolve_labels, sample_labels

# SampleSettings and the label helpers are re-exported: callers import them from here.
__all__ = ["ARCHS", "BPD_METHODS", "Diffusion", "SampleSettings", "net_config"]
__all__ += ["resolve_labels", "sample_labels"]

ARCHS = ("unet", "dit")

BPD_METHODS = ("estimate", "exact")  # bpd_fn: stratified unbiased estimate | full T-step bound


def net_config(m: ml_collections.ConfigDict) -> unet.UNetConfig | dit.DiTConfig:
  """The typed network config of config.model: `arch` chooses the class, whose fields are read
  from config.model by name (a DiT `preset` sets depth, hidden_size, num_heads, patch_size)."""
  arch = _choice("config.model.arch", m.get("arch", "unet"), ARCHS)
  preset, given = m.get("preset", ""), {}
  if preset and arch == "unet":
    raise ValueError(f"config.model.preset {preset!r} names a DiT: set config.model.arch='dit'.")
  if preset:
    _choice("config.model.preset", preset, tuple(dit.PRESETS))
    given = dict(
      zip(("depth", "hidden_size", "num_heads", "patch_size"), dit.PRESETS[preset], strict=True)
    )
  cls = unet.UNetConfig if arch == "unet" else dit.DiTConfig
  for f in dataclasses.fields(cls):  # cast to the default's type (tuples of ints)
    if f.name not in given:
      v = m.get(f.name, f.default)
      try:
        given[f.name] = tuple(map(int, v)) if isinstance(f.default, tuple) else type(f.default)(v)
      except (TypeError, ValueError):
        kind = "a tuple of integers such as (1, 2)" if isinstance(f.default, tuple) else "a number"
        raise ValueError(f"config.model.{f.name} must be {kind}, got {v!r}.") from None
  return cls(**given)


@dataclasses.dataclass(frozen=True, eq=False)
class Diffusion:
  """The process, the parameterisation and the network of one run (see the module docstring).

  Immutable; compiled functions are cached on the instance (one compilation per settings and
  batch shape), so build it once per run and pass it around.
  """

  schedule: schedules.Schedule
  net: unet.UNet | dit.DiT
  image_size: int
  channels: int
  process: processes.Process  # vp: the discrete schedule's; ve | edm | flow | cosine: continuous
  prediction: str = "eps"  # denoiser.PARAMETERISATIONS
  sigma_data: float = 0.5  # edm preconditioning
  weighting: str = "simple"  # losses.WEIGHTINGS
  min_snr_gamma: float = 5.0
  variance: str = "fixed_small"  # losses.VARIANCES
  vlb_weight: float = 0.001
  time: str = "discrete"  # losses.TIMES: the vp table's integer t, or continuous t in [0, 1]
  t_sampling: str = "uniform"  # losses.T_SAMPLINGS
  num_classes: int = 0
  label_dropout: float = 0.0  # classifier-free guidance: labels dropped to the null class
  init_from: str = ""  # safetensors parameters (diffusion.nets.convert) to start from
  objective: str = "denoising"  # few_step.objectives.OBJECTIVES
  meanflow: few_step.MeanFlowSettings = few_step.MeanFlowSettings()
  distill: few_step.DistillSettings = few_step.DistillSettings()
  _cache: dict = dataclasses.field(default_factory=dict, repr=False)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> Diffusion:
    """Reads config.diffusion, config.model, config.data's shape and train.label_dropout. Every
    unknown name and impossible shape is a ValueError naming the field and the fix."""
    f, d, m = config.diffusion, config.data, config.model
    denoiser.check(f.prediction, f.process)
    if f.process == "vp" and f.prediction in ("flow", "edm"):
      raise ValueError(
        f"prediction {f.prediction!r} is for the continuous processes: set "
        "config.diffusion.process to edm, ve, flow or cosine."
      )
    _choice("config.diffusion.weighting", f.weighting, losses.WEIGHTINGS)
    _choice("config.diffusion.variance", f.variance, losses.VARIANCES)
    _choice("config.diffusion.t_sampling", f.t_sampling, losses.T_SAMPLINGS)
    time = "continuous" if f.continuous_time or f.process != "vp" else "discrete"
    if time != "discrete" and f.variance == "learned_range":
      raise ValueError(
        "config.diffusion.variance='learned_range' needs discrete time (the vp process on its "
        "table): set config.diffusion.process='vp' and continuous_time=False, or "
        "variance='fixed_small'."
      )
    if f.variance == "fixed_large" and f.process not in ("vp", "cosine"):
      raise ValueError(
        "config.diffusion.variance='fixed_large' is the beta_t of a variance-preserving process: "
        "set config.diffusion.process to vp or cosine, or variance='fixed_small'."
      )
    if d.channels not in (1, 3) and d.source != "latents":  # latents: the autoencoder's
      raise ValueError(f"config.data.channels must be 1 or 3, got {d.channels}.")
    schedule = schedules.make(f.schedule, f.num_timesteps, **f.schedule_params.to_dict())
    process = processes.Process(
      name=f.process,
      schedule=schedule,
      sigma_min=float(f.sigma_min),
      sigma_max=float(f.sigma_max),
      rho=float(f.rho),
      p_mean=float(f.p_mean),
      p_std=float(f.p_std),
      t_distribution=f.t_distribution,
      logit_mean=float(f.logit_mean),
      logit_std=float(f.logit_std),
    )
    if f.sigma_data <= 0:
      raise ValueError(f"config.diffusion.sigma_data must be > 0, got {f.sigma_data}.")
    model, few = few_step.from_config(config)  # config.model's fields, the few-step fields
    out = 2 * d.channels if f.variance == "learned_range" else d.channels
    cfg = net_config(model)  # MeanFlow conditions on a second time input
    cfg = dataclasses.replace(cfg, second_time=cfg.second_time or few["objective"] == "meanflow")
    lib = unet if isinstance(cfg, unet.UNetConfig) else dit
    try:  # the network's errors name its own fields
      net = lib.create_model(cfg, image_size=d.image_size, channels=d.channels, out_channels=out)
    except ValueError as e:
      raise ValueError(f"config.model ({lib.__name__.split('.')[-1]}): {e}") from None
    init_from = str(m.get("init_from", ""))
    if init_from:
      convert.refuse_pickle(init_from)
      if not os.path.isfile(init_from):
        raise FileNotFoundError(f"config.model.init_from: no file {init_from}.")
    return cls(
      schedule=schedule,
      net=net,
      image_size=d.image_size,
      channels=d.channels,
      process=process,
      prediction=f.prediction,
      sigma_data=float(f.sigma_data),
      weighting=f.weighting,
      min_snr_gamma=float(f.min_snr_gamma),
      variance=f.variance,
      vlb_weight=float(f.vlb_weight),
      time=time,
      t_sampling=f.t_sampling,
      num_classes=int(m.num_classes),
      label_dropout=float(config.train.label_dropout),
      init_from=init_from,
      **few,
    )

  # ---- facts -------------------------------------------------------------------------------

  @property
  def time_input(self) -> str:
    """The vp network's conditioning: t in discrete time, log-SNR in continuous time (the other
    processes are conditioned on c_noise = ln(s) / 4, see denoiser.py)."""
    return "t" if self.time == "discrete" else "log_snr"

  def conditioning(self, s: jax.Array) -> jax.Array:
    """The network's conditioning at noise level s > 0 (any shape): for vp the table's
    fractional timestep (discrete time) or log-SNR = -2 ln s (continuous time); else c_noise."""
    if self.process.name != "vp":
      return denoiser.c_noise(s)
    lam = -2.0 * jnp.log(s)
    if self.time == "discrete":
      return processes.discrete_t_of_log_snr(self.schedule, lam)
    return lam

  @property
  def null_label(self) -> int:
    return self.num_classes  # the extra class the U-Net reserves for "no label"

  @property
  def conditional(self) -> bool:
    return self.num_classes > 0

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return (self.image_size, self.image_size, self.channels)

  def _labels(self, labels: jax.Array | None) -> jax.Array | None:
    return labels if self.conditional else None

  def _apply(
    self, params: Any, *, train: bool = False, dropout_key: jax.Array | None = None, **kw: Any
  ) -> losses.ModelFn:
    """The network as model_fn(x, cond, labels, t2=None); `kw` (example_keys) go to the net."""
    rngs = {"dropout": dropout_key} if dropout_key is not None else None
    return lambda x, cond, y, t2=None: self.net.apply(  # t2: two-time networks only
      params, x, cond, y, train=train, rngs=rngs, **({} if t2 is None else {"t2": t2}), **kw
    )

  # ---- parameters --------------------------------------------------------------------------

  def _init(self, key: jax.Array) -> Any:
    labels = jnp.zeros((1,), jnp.int32) if self.conditional else None
    t2 = {"t2": jnp.zeros((1,))} if getattr(self.net, "second_time", False) else {}
    return self.net.init(
      key, jnp.zeros((1, *self.image_shape)), jnp.zeros((1,)), labels, train=False, **t2
    )

  def init_params(self, key: jax.Array) -> Any:
    """Fresh float32 parameters (a plain pytree) from `key`."""
    return jax.jit(self._init)(key)

  def pretrained_params(self) -> Any | None:
    """config.model.init_from's parameters (host NumPy, checked against this model) or None."""
    if not self.init_from:
      return None
    params = convert.load_params(self.init_from)
    self.check_params(params, f" in config.model.init_from={self.init_from}")
    return params

  def param_shapes(self) -> Any:
    """The parameter pytree as jax.ShapeDtypeStruct leaves, without computing anything."""
    return jax.eval_shape(self._init, jax.random.PRNGKey(0))

  def check_params(self, params: Any, where: str = "") -> None:
    """Raises checkpoints.ShapeMismatchError unless `params` fit this model (`where`: e.g.
    " at step 5 in DIR", for the message)."""
    checkpoints.check_shapes(params, self.param_shapes(), where=where)

  # ---- training ----------------------------------------------------------------------------

  def loss(
    self,
    params: Any,
    images: jax.Array,
    labels: jax.Array,
    key: jax.Array,
    *,
    train: bool = True,
    distill: dict | None = None,
  ) -> losses.LossOutput:
    """Per-example losses of config.diffusion.objective for uint8 images (B, H, W, C) at random
    noise levels; labels int32 (B,) (ignored when unconditional). Traceable; `key` draws the
    noise levels, the noise, label dropout and the network's dropout (when `train`). The
    consistency objective needs `distill` = {"teacher": params, "target": params}. `key` may be
    one key per example (B, 2) when `batched_example_keys` holds (see `losses.loss`)."""
    if losses.per_example_keys(key):
      if not self.batched_example_keys():
        raise ValueError("per-example keys need the denoising objective.")
      k_loss, k_drop = jax.vmap(jax.random.split)(key).swapaxes(0, 1)
      dropout = {"example_keys": k_drop} if train and self._net_dropout else {}
      apply = self._apply(params, train=train, **dropout)
    else:
      k_loss, k_drop = jax.random.split(key)
      apply = self._apply(params, train=train, dropout_key=k_drop if train else None)
    if self.objective != "denoising":
      return few_step.loss(self, apply, normalize(images), labels, k_loss, train, distill)
    return losses.loss(
      apply,
      self.process,
      normalize(images),
      k_loss,
      time=self.time,
      labels=self._labels(labels),
      prediction=self.prediction,
      weighting=self.weighting,
      min_snr_gamma=self.min_snr_gamma,
      sigma_data=self.sigma_data,
      t_sampling=self.t_sampling,
      variance=self.variance,
      vlb_weight=self.vlb_weight,
      label_dropout=self.label_dropout if train else 0.0,
      null_label=self.null_label,
    )

  def batched_example_keys(self) -> bool:
    """Whether `loss` takes one key per example in a single batched network call (the denoising
    objective; the U-Net draws example i's dropout masks from key i)."""
    return self.objective == "denoising"

  @property
  def _net_dropout(self) -> bool:
    return getattr(self.net, "dropout", 0.0) > 0

  # ---- sampling and likelihood -------------------------------------------------------------

  def check_sampling(self, settings: SampleSettings) -> None:
    """Raises ValueError when this model cannot sample with `settings` (checked before training,
    so that the first sample grid cannot fail): the grid, the solver and its options."""
    self.sigmas(settings)
    few_step.check_sampler(self, settings)
    if settings.sampler not in solvers.FEW_STEP:
      self._solver(settings)

  def sample(
    self,
    params: Any,
    key: jax.Array,
    labels: jax.Array,
    n: int,
    settings: SampleSettings,
    *,
    return_trajectory: bool = False,
  ):
    """Traceable: n images in [-1, 1] (n, H, W, C) from fresh noise; with `return_trajectory`
    also the states from x_T to the end, (steps + 1, n, H, W, C), each x~ scaled by
    1 / sqrt(1 + s^2) (the vp state alpha x~, so that every process's states look alike).

    The prior: x_T ~ N(0, I) for a variance-preserving process (x~_T = x_T sqrt(1 + s_0^2),
    DDPM's), x~_T ~ N(0, s_0^2 I) for the others (EDM's)."""
    sigmas = self.sigmas(settings)
    k_noise, k_run = jax.random.split(key)
    s0 = float(sigmas[0])
    scale = np.sqrt(1.0 + s0**2) if self.process.variance_preserving else s0
    x_T = scale * jax.random.normal(k_noise, (n, *self.image_shape))
    if settings.sampler in solvers.FEW_STEP:  # meanflow's two-time map, a consistency function
      few_step.check_sampler(self, settings)
      name, (den, options) = settings.sampler, few_step.denoiser(self, params, labels, settings)
    else:
      name, options = self._solver(settings)
      den = self.denoiser(params, labels, settings, with_variance=name == "ddpm_learned_range")
    out = solvers.sample(
      name, den, x_T, sigmas, k_run, return_trajectory=return_trajectory, **options
    )
    if not return_trajectory:
      return out
    vp = jnp.asarray(1.0 / np.sqrt(1.0 + sigmas**2), jnp.float32)[:, None, None, None, None]
    return out[0], jnp.concatenate([x_T[None], out[1]]) * vp

  def sigmas(self, settings: SampleSettings) -> np.ndarray:
    """The decreasing float64 sigma grid of `settings` (ending in 0): an integer timestep
    spacing of the vp table (`solvers.timestep_grid`), or a sigma grid over
    [sigma_min, sigma_max] (0 = the process's sampling range)."""
    lo, hi = self.process.sampling_range()
    lo, hi = settings.sigma_min or lo, settings.sigma_max or hi
    if settings.sampler in solvers.FEW_STEP:  # their own grids
      return solvers.few_step_sigmas(settings.sampler, settings.num_steps, lo, hi, settings.rho)
    if settings.spacing in solvers.SPACINGS:
      if self.process.name != "vp":
        raise ValueError(
          f"the {self.process.name} process has no integer timesteps: set "
          f"config.sample.spacing to one of {', '.join(solvers.GRIDS)}."
        )
      return solvers.timestep_grid(self.schedule, settings.num_steps, settings.spacing)
    return solvers.grid(settings.spacing, settings.num_steps, lo, hi, rho=settings.rho)

  def _solver(self, settings: SampleSettings) -> tuple[str, dict[str, Any]]:
    """The registered solver and its options for `settings` and this model."""
    name = settings.sampler
    if name == "edm":
      keys = ("s_churn", "s_tmin", "s_tmax", "s_noise")
      return name, {k.replace("s_", "S_"): getattr(settings, k) for k in keys}
    if name == "ddim":
      return name, {"eta": settings.eta}
    if name not in ("ddpm", "ddpm_learned_range"):
      return name, {}
    if self.variance != "learned_range":
      if name == "ddpm_learned_range":
        raise ValueError(
          "sampler ddpm_learned_range needs a model with learned variances "
          "(config.diffusion.variance='learned_range'); set config.sample.sampler='ddpm'."
        )
      return name, {"variance": self.variance}
    if settings.spacing not in solvers.SPACINGS:
      raise ValueError(
        "ddpm with learned_range variances steps on the schedule's integer timesteps: set "
        f"config.sample.spacing to one of {', '.join(solvers.SPACINGS)}."
      )
    ts = solvers.timesteps(self.schedule, settings.num_steps, settings.spacing)
    return "ddpm_learned_range", {"schedule": self.schedule, "timesteps": ts}

  def denoiser(
    self,
    params: Any,
    labels: jax.Array | None,
    settings: SampleSettings,
    *,
    with_variance: bool = False,
    apply: losses.ModelFn | None = None,
  ) -> denoiser.Denoiser:
    """D(x~, s) -> x0_hat for x~ = x_t / alpha at noise level s = sigma / alpha (scalar or (B,)),
    with guidance (limited to settings.guidance_interval) and x0 clipping; `with_variance` appends
    the network's learned-variance channels v (B, H, W, C) to x0_hat. `apply`: the network call
    to use (default: params, no dropout). A MeanFlow model denoises through u(z, t, t)."""
    apply, c = apply or self._apply(params), self.channels
    labels = self._labels(labels)
    guide = labels is not None and settings.guidance_scale != 1.0
    if self.objective == "meanflow":  # r = t: the instantaneous velocity, t2 = 0
      two_time = apply
      apply = lambda x, cond, y: two_time(x, cond, y, jnp.zeros_like(cond))

    def denoise(x: jax.Array, s: jax.Array) -> jax.Array:
      s = jnp.asarray(s, jnp.float32)
      if self.objective == "meanflow":
        t = self.process.t_of_s(s)
        alpha, sigma, cond = 1.0 - t, t, self.meanflow.time_scale * t
      elif self.process.name == "vp":  # alpha^2 + sigma^2 = 1
        alpha, sigma = jax.lax.rsqrt(1.0 + s**2), s * jax.lax.rsqrt(1.0 + s**2)
        cond = self.conditioning(s)
      else:
        alpha, sigma = self.process.alpha_sigma(self.process.t_of_s(s))
        cond = self.conditioning(s)
      col = lambda a: jnp.reshape(a, (-1, 1, 1, 1)) if jnp.ndim(a) else a  # per-example s
      alpha, sigma, s_x = col(alpha), col(sigma), col(s)
      x_t = alpha * x
      inp = denoiser.network_input(self.prediction, x_t, alpha, s_x, self.sigma_data)
      cond = jnp.broadcast_to(jnp.asarray(cond, jnp.float32), (x.shape[0],))
      if guide:
        scale = denoiser.guidance_scale_at(s, settings.guidance_scale, settings.guidance_interval)
        scale = col(scale)
        out = denoiser.guided(
          apply, inp, cond, labels, scale=scale, null_label=self.null_label, channels=c
        )
      else:
        out = apply(inp, cond, labels)
      x0 = denoiser.to_x0(
        self.prediction, out[..., :c], x_t=x_t, alpha=alpha, sigma=sigma, sigma_data=self.sigma_data
      )
      x0 = denoiser.clip_x0(x0, settings.clip_x0).astype(x.dtype)
      return jnp.concatenate([x0, out[..., c:]], -1) if with_variance else x0

    return denoise

  def raw_denoiser(
    self, params: Any, labels: jax.Array | None, *, apply: losses.ModelFn | None = None
  ) -> denoiser.Denoiser:
    """`denoiser` without guidance or clipping (what consistency distillation trains on)."""
    plain = SampleSettings(sampler="euler", spacing="karras", clip_x0="none")
    return self.denoiser(params, labels, plain, apply=apply)

  def sample_fn(
    self, settings: SampleSettings, *, return_trajectory: bool = False
  ) -> Callable[..., Any]:
    """jit-compiled (params, key, labels (n,) int32, n) -> `sample(...)`, n static; built once
    per settings and reused."""
    cache_key = ("sample", settings, return_trajectory)
    if cache_key not in self._cache:
      self._cache[cache_key] = jax.jit(
        functools.partial(self._sample_n, settings=settings, return_trajectory=return_trajectory),
        static_argnames="n",
      )
    return self._cache[cache_key]

  def _sample_n(self, params, key, labels, n: int, *, settings, return_trajectory):
    return self.sample(params, key, labels, n, settings, return_trajectory=return_trajectory)

  def bpd_fn(
    self, method: str = "exact", strata: int = 0
  ) -> Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]:
    """jit-compiled (params, uint8 x (B, H, W, C), labels (B,), key) -> (B, 3): [total, prior,
    decoder] bits/dim. method "exact": the full T-step variational bound (T network evaluations
    per image); "estimate": its unbiased stratified estimate with `strata` ranges of t
    (strata + 1 evaluations per image; losses.bits_per_dim_stratified)."""
    if method not in BPD_METHODS:
      raise ValueError(f"unknown bits/dim method {method!r}; use one of {', '.join(BPD_METHODS)}.")
    cache_key = ("bpd", method, strata if method == "estimate" else 0)
    if cache_key not in self._cache:
      kw = dict(prediction=self.prediction, variance=self.variance, time_input=self.time_input)

      def batch_bpd(params, x_u8, labels, key):
        model_fn, x0, y = self._apply(params), normalize(x_u8), self._labels(labels)
        if method == "estimate":
          out = losses.bits_per_dim_stratified(
            model_fn, self.schedule, x0, key, strata=strata, labels=y, **kw
          )
          return jnp.stack([out["total"], out["prior"], out["decoder"]], axis=1)
        out = losses.bits_per_dim(model_fn, self.schedule, x0, key, labels=y, **kw)
        return jnp.stack([out["total"], out["prior"], out["terms"][0]], axis=1)

      self._cache[cache_key] = jax.jit(batch_bpd)
    return self._cache[cache_key]
