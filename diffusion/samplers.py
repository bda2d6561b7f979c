"""Samplers: step functions registered by name, run by one `lax.scan` loop.

`sample(name, model_fn, schedule, x_T, key, ...)` is a pure, traceable function: jit it once
per (shape, number of steps) with the parameters as an argument of the jitted function, e.g.
`jax.jit(lambda params, x, key: sample("ddim", lambda x, c, y: apply(params, x, c, y), ...))`.
Steps run over a decreasing subsequence t_0 > t_1 > ... > t_{S-1} of [0, T), each from t to
t_prev (the next entry, or -1 meaning the clean data, abar = 1, after the last).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion import denoiser as D
from diffusion import gaussian as G
from diffusion.losses import ModelFn, model_time
from diffusion.schedules import Schedule

SPACINGS = ("uniform", "leading", "trailing", "quadratic", "logsnr")
X0_CLIPS = ("none", "clip", "dynamic")


def _round_div(p: np.ndarray, q: int) -> np.ndarray:
  """round(p / q) for non-negative integers p and q > 0, halves to even (as np.round), exactly."""
  quo, rem = np.divmod(p, q)
  up = (2 * rem > q) | ((2 * rem == q) & (quo % 2 == 1))
  return quo + up


def timesteps(schedule: Schedule, num_steps: int, spacing: str = "uniform") -> np.ndarray:
  """Strictly decreasing int32 timesteps, shape (num_steps,), in [0, T).

  With S = num_steps and i = 0..S-1 (values listed increasing, returned decreasing):
  `uniform`: round(i (T-1) / (S-1)), from 0 to T-1; `leading`: i floor(T/S) (DDIM; starts at
  0, ends below T-1); `trailing`: round(T - i T/S) - 1, from T-1 down (ends above 0; Lin et al.
  2024); `quadratic`: round((T-1) i^2 / (S-1)^2) (dense near t = 0, DDIM's CIFAR setting);
  `logsnr`: the t nearest to S points evenly spaced in log-SNR between the ends (what
  DPM-Solver recommends). Computed in integer arithmetic (rounding halves to even), so there
  are always exactly S distinct values; where rounding repeats small values (quadratic,
  logsnr) they are pushed up to stay distinct, and never past T-1. S = 1 gives [T-1].
  """
  n = schedule.num_timesteps
  if spacing not in SPACINGS:
    raise ValueError(f"unknown spacing {spacing!r}; known: {', '.join(SPACINGS)}.")
  if not 1 <= num_steps <= n or int(num_steps) != num_steps:
    raise ValueError(f"num_steps must be an integer in [1, {n}] (T), got {num_steps!r}.")
  s = int(num_steps)
  if s == 1:
    return np.array([n - 1], np.int32)
  i = np.arange(s, dtype=np.int64)  # increasing t below
  if spacing == "uniform":
    ts = _round_div(i * (n - 1), s - 1)
  elif spacing == "leading":
    ts = i * (n // s)
  elif spacing == "trailing":
    ts = _round_div(n * (i + 1), s) - 1  # = round(T - j T/S) - 1 for j = S-1-i
  elif spacing == "quadratic":
    ts = _round_div(i * i * (n - 1), (s - 1) ** 2)
  else:
    lam = np.asarray(schedule.log_snr, np.float64)  # decreasing in t
    targets = np.linspace(lam[0], lam[-1], s)
    ts = np.abs(lam[None, :] - targets[:, None]).argmin(axis=1).astype(np.int64)
  ts = np.maximum.accumulate(ts - i) + i  # ts[k] = max(ts[k], ts[k-1] + 1): distinct...
  ts = np.minimum(ts, np.arange(n - s, n))  # ...and never past T-1 (still distinct)
  return ts.astype(np.int32)[::-1].copy()


class Denoised(NamedTuple):
  x0: jax.Array  # predicted clean image
  eps: jax.Array  # predicted noise, consistent with x0 and x_t
  out: jax.Array  # raw (guided) network output, including variance channels


class Context(NamedTuple):
  schedule: Schedule
  denoise: Callable[[jax.Array, jax.Array], Denoised]  # (x_t, scalar t) -> Denoised
  variance: str  # ddpm: fixed_small | fixed_large | learned_range
  eta: float  # ddim


def make_denoiser(
  model_fn: ModelFn,
  schedule: Schedule,
  *,
  prediction: str = "eps",
  time_input: str = "t",
  labels: jax.Array | None = None,
  guidance_scale: float = 1.0,
  null_label: int = 0,
  clip_x0: str = "none",
  dynamic_percentile: float = 0.995,
):
  """(x_t, t) -> Denoised for a scalar integer t.

  Classifier-free guidance (scale w != 1 with labels): out = out_u + w (out_c - out_u) on the
  prediction channels, one network call on the doubled batch; variance channels from out_c.
  `clip_x0`: `clip` to [-1, 1], or `dynamic` thresholding (Imagen: s = max(1, percentile of
  |x0|), x0 <- clip(x0, -s, s) / s); eps is recomputed from the clipped x0.
  """
  if clip_x0 not in X0_CLIPS:
    raise ValueError(f"unknown clip_x0 {clip_x0!r}; known: {', '.join(X0_CLIPS)}.")
  guided = labels is not None and guidance_scale != 1.0

  def denoise(x: jax.Array, t: jax.Array) -> Denoised:
    b, c = x.shape[0], x.shape[-1]
    tb = jnp.full((b,), t, jnp.int32)
    cond = model_time(schedule, tb, time_input)
    out = (
      D.guided(model_fn, x, cond, labels, scale=guidance_scale, null_label=null_label, channels=c)
      if guided
      else model_fn(x, cond, labels)
    )
    alpha, sigma = G.alpha_sigma(schedule, tb, x.ndim)
    x0, eps = G.split_prediction(prediction, out[..., :c], x, alpha, sigma)
    if clip_x0 != "none":
      x0 = D.clip_x0(x0, clip_x0, dynamic_percentile)
      eps = G.eps_from_x0(x, x0, alpha=alpha, sigma=sigma)
    return Denoised(x0, eps, out)

  return denoise


def ddim_step(
  schedule: Schedule,
  x_t: jax.Array,
  t: jax.Array,
  t_prev: jax.Array,
  eps: jax.Array,
  eta: float | jax.Array,
  noise: jax.Array,
) -> jax.Array:
  """One DDIM step (Song et al. 2021, eq. 12) from t to t_prev < t (t_prev = -1: abar = 1).

  x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t);
  sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev), i.e. eta times
  the posterior's standard deviation (`G.posterior_between`);
  x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma noise.
  t, t_prev: scalars or (B,) ints. eta = 0 is deterministic; eta = 1 matches DDPM's variance.
  """
  nd = x_t.ndim
  a_t, sg_t = G.alpha_sigma(schedule, t, nd)
  a_prev, sg_prev = G.alpha_sigma(schedule, t_prev, nd)
  x0 = G.x0_from_eps(x_t, eps, alpha=a_t, sigma=sg_t)
  _, post_var, _ = G.posterior_between(schedule, x0=x0, x_t=x_t, t=t, s=t_prev)
  sigma = eta * jnp.sqrt(post_var)
  direction = jnp.sqrt(jnp.maximum(sg_prev**2 - sigma**2, 0.0)) * eps
  return a_prev * x0 + direction + sigma * noise


def ddpm_step(
  schedule: Schedule,
  x_t: jax.Array,
  t: jax.Array,
  t_prev: jax.Array,
  d: Denoised,
  *,
  variance: str,
  noise: jax.Array,
) -> jax.Array:
  """Ancestral step: x_prev ~ p(x_prev | x_t) = `G.p_mean_logvar` over the (respaced) pair
  (t, t_prev), the reverse kernel the VLB uses, with x0 = d.x0.

  x_t, noise: (B, H, W, C); t > t_prev: scalars or (B,) ints, t_prev = -1 meaning the clean
  data; d: the denoiser's output at (x_t, t), whose `out` carries the variance channels for
  `learned_range` ((B, H, W, 2C), v in [-1, 1]). `variance` and `noise` are keyword-only
  (`ddim_step` takes eta and noise positionally, a public order kept for compatibility).
  Variance: `fixed_small` the posterior's, `fixed_large` beta_{t|prev} = 1 - abar_t/abar_prev,
  `learned_range` exp(frac log beta_{t|prev} + (1 - frac) log posterior), frac = (v + 1)/2.
  No noise is added on the last step (t_prev = -1), which returns x0_hat. Returns x_prev.
  """
  c = x_t.shape[-1]
  v = d.out[..., c:] if variance == "learned_range" else None
  mean, logvar = G.p_mean_logvar(schedule, x0=d.x0, x_t=x_t, t=t, s=t_prev, variance=variance, v=v)
  keep = (G.extract_t(t_prev, x_t.ndim) >= 0).astype(x_t.dtype)
  return mean + keep * jnp.exp(0.5 * logvar) * noise


class Sampler(NamedTuple):
  init: Callable[[jax.Array], dict]  # x_T -> carry (a dict with "x")
  # (ctx, carry, t, t_prev, key) -> carry
  step: Callable[[Context, dict, jax.Array, jax.Array, jax.Array], dict]
  stochastic: bool


def _x_only(x: jax.Array) -> dict:
  return {"x": x}


def _ddpm(ctx: Context, carry: dict, t, t_prev, key) -> dict:
  x = carry["x"]
  noise = jax.random.normal(key, x.shape, x.dtype)
  return {
    "x": ddpm_step(
      ctx.schedule, x, t, t_prev, ctx.denoise(x, t), variance=ctx.variance, noise=noise
    )
  }


def _ddim(ctx: Context, carry: dict, t, t_prev, key) -> dict:
  x = carry["x"]
  noise = jax.random.normal(key, x.shape, x.dtype)
  return {"x": ddim_step(ctx.schedule, x, t, t_prev, ctx.denoise(x, t).eps, ctx.eta, noise)}


def _lam(schedule: Schedule, t) -> jax.Array:
  """Half log-SNR, lambda = log(alpha / sigma), at integer t >= 0."""
  return 0.5 * schedule.log_snr[jnp.maximum(t, 0)]


def _dpm_init(x: jax.Array) -> dict:
  return {
    "x": x,
    "x0_prev": jnp.zeros_like(x),
    "lam_prev": jnp.zeros(()),
    "first": jnp.asarray(True),
  }


# DPM-Solver++(2M) takes a first-order step where r = h_prev / h < this: the multistep
# correction 1/(2r) (x0 - x0_prev) would extrapolate the last difference more than once.
MIN_STEP_RATIO = 0.5


def _dpm_solver_pp_2m(ctx: Context, carry: dict, t, t_prev, key) -> dict:
  """DPM-Solver++(2M) (Lu et al. 2022), data prediction, multistep in lambda = logSNR / 2.

  x_next = (sigma_next / sigma) x - alpha_next expm1(-h) D, h = lambda_next - lambda, with
  D = (1 + 1/(2r)) x0 - 1/(2r) x0_prev, r = h_prev / h, except on the steps that are first
  order (D = x0, i.e. DDIM): the first, the last (to the clean data: x_next = x0, as with
  diffusers' zero final sigma), and any step with r < MIN_STEP_RATIO. The last rule bounds the
  step ratio, as variable-step multistep methods need (the extrapolation's error grows like
  1/r): a grid that ends on t = 0 (uniform or leading spacing) makes its last step a large jump
  in lambda (h ~ 4 h_prev for the linear schedule), and extrapolating there cost ~9x the
  covariance error on Gaussian data at 20 steps. Lu et al.'s and diffusers' "lower_order_final"
  (first order on the final step below 10 or 15 steps) was measured too: it repairs the same
  grids at 10 steps but not at 20, and makes trailing grids worse, so it is not used.
  """
  del key
  x, s = carry["x"], ctx.schedule
  x0 = ctx.denoise(x, t).x0
  final = t_prev < 0
  lam, lam_next = _lam(s, t), _lam(s, t_prev)
  h = jnp.where(final, 1.0, lam_next - lam)
  r = (lam - carry["lam_prev"]) / h
  second = jnp.logical_not(carry["first"] | final | (r < MIN_STEP_RATIO))
  d = jnp.where(second, (1 + 0.5 / r) * x0 - (0.5 / r) * carry["x0_prev"], x0)
  a, sg = G.alpha_sigma(s, t, x.ndim)
  a_next, sg_next = G.alpha_sigma(s, t_prev, x.ndim)
  x_next = jnp.where(final, x0, (sg_next / sg) * x - a_next * jnp.expm1(-h) * d)
  return {"x": x_next, "x0_prev": x0, "lam_prev": lam, "first": jnp.asarray(False)}


def _heun(ctx: Context, carry: dict, t, t_prev, key) -> dict:
  """Heun's 2nd-order method on the probability-flow ODE in (x/alpha, sigma/alpha) (Karras et
  al. 2022): d(x/alpha)/d(sigma/alpha) = eps. Euler on the last step; 2 evaluations otherwise."""
  del key
  x, s = carry["x"], ctx.schedule
  a, sg = G.alpha_sigma(s, t, x.ndim)
  a_next, sg_next = G.alpha_sigma(s, t_prev, x.ndim)
  eps = ctx.denoise(x, t).eps
  dsig = sg_next / a_next - sg / a
  euler = x / a + dsig * eps  # in scaled coordinates x / alpha

  def correct(_):
    eps_next = ctx.denoise(a_next * euler, jnp.maximum(t_prev, 0)).eps
    return x / a + dsig * 0.5 * (eps + eps_next)

  scaled = jax.lax.cond(t_prev >= 0, correct, lambda _: euler, None)
  return {"x": a_next * scaled}


SAMPLERS: dict[str, Sampler] = {
  "ddpm": Sampler(_x_only, _ddpm, stochastic=True),
  "ddim": Sampler(_x_only, _ddim, stochastic=True),  # stochastic when eta > 0
  "dpm_solver++": Sampler(_dpm_init, _dpm_solver_pp_2m, stochastic=False),
  "heun": Sampler(_x_only, _heun, stochastic=False),
}


def register(name: str, sampler: Sampler) -> None:
  """Adds a sampler under `name` (an init and a step function; see `Sampler`)."""
  SAMPLERS[name] = sampler


def get(name: str) -> Sampler:
  """The registered sampler `name` (`ddpm`, `ddim`, `dpm_solver++`, `heun`, or one added by
  `register`): its init (x_T (B, H, W, C) -> carry) and step functions, see `Sampler`.

  Raises ValueError listing the known names for an unknown one; callers use it to fail early.
  """
  if name not in SAMPLERS:
    raise ValueError(f"unknown sampler {name!r}; known samplers: {', '.join(SAMPLERS)}.")
  return SAMPLERS[name]


def network_evaluations(name: str, num_steps: int) -> int:
  """Network evaluations per image (ignoring the doubling by guidance)."""
  return 2 * num_steps - 1 if name == "heun" else num_steps


def sample(
  name: str,
  model_fn: ModelFn,
  schedule: Schedule,
  x_T: jax.Array,
  key: jax.Array,
  *,
  num_steps: int,
  spacing: str = "uniform",
  prediction: str = "eps",
  variance: str = "fixed_small",
  eta: float = 0.0,
  time_input: str = "t",
  labels: jax.Array | None = None,
  guidance_scale: float = 1.0,
  null_label: int = 0,
  clip_x0: str = "none",
  return_trajectory: bool = False,
):
  """Runs sampler `name` from x_T ~ N(0, I) (B, H, W, C) over `num_steps` steps.

  Returns x_0 (B, H, W, C), in [-1, 1] for a well-trained model; with `return_trajectory`
  also the states after every step, (num_steps, B, H, W, C). Deterministic given `key`.
  """
  sampler = get(name)
  denoise = make_denoiser(
    model_fn,
    schedule,
    prediction=prediction,
    time_input=time_input,
    labels=labels,
    guidance_scale=guidance_scale,
    null_label=null_label,
    clip_x0=clip_x0,
  )
  ctx = Context(schedule, denoise, variance, eta)
  ts = timesteps(schedule, num_steps, spacing)
  ts_prev = np.append(ts[1:], -1).astype(np.int32)

  def body(carry, inputs):
    t, t_prev, i = inputs
    carry = sampler.step(ctx, carry, t, t_prev, jax.random.fold_in(key, i))
    return carry, carry["x"] if return_trajectory else None

  carry, traj = jax.lax.scan(
    body, sampler.init(x_T), (jnp.asarray(ts), jnp.asarray(ts_prev), jnp.arange(len(ts)))
  )
  return (carry["x"], traj) if return_trajectory else carry["x"]
