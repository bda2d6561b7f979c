"""Noise schedules as immutable tables over discrete t = 0..T-1, plus continuous log-SNR.

Conventions (DDPM): x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps for t in [0, T), with
abar_t = prod_{s<=t} (1 - beta_s). log-SNR(t) = log(abar_t / (1 - abar_t)). Continuous time
u in [0, 1] maps onto the grid by u_t = (t + 1) / T, so every schedule also has a log-SNR
function of u (closed form where the family is defined by one, else interpolated).

Tables are built in float64 NumPy and stored as float32 jax arrays; JAX never sees float64.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Families defined by abar(u) or log-SNR(u) for continuous u in [0, 1]: name -> (fn, defaults).
# Each fn maps float64 u (array) and its params to log-SNR (array).
_LogSNR = Callable[..., np.ndarray]


def _logit(p: np.ndarray) -> np.ndarray:
  return np.log(p) - np.log1p(-p)


def _cosine_logsnr(u, *, s: float = 0.008, xp=np):
  # improved DDPM: abar(u) = f(u) / f(0), f(u) = cos^2(a(u)), a(u) = pi/2 (u + s) / (1 + s).
  # 1 - abar = (cos^2 a0 - cos^2 a) / f(0) = sin(a - a0) sin(a + a0) / f(0): stable near u = 0.
  a, a0 = (u + s) / (1 + s) * math.pi / 2, s / (1 + s) * math.pi / 2
  return 2.0 * xp.log(xp.abs(xp.cos(a))) - xp.log(xp.sin(a - a0) * xp.sin(a + a0))


def _sigmoid_logsnr(u, *, start: float = -3.0, end: float = 3.0, tau: float = 1.0, xp=np):
  # Chen 2023: abar(u) = (v_end - sigmoid(z)) / (v_end - v_start), z = (u (end-start) + start)/tau.
  sig = lambda z: 1.0 / (1.0 + xp.exp(-z))
  v_start, v_end = sig(start / tau), sig(end / tau)
  z = sig((u * (end - start) + start) / tau)
  return xp.log(v_end - z) - xp.log(z - v_start)


def _logsnr_cosine(
  u, *, logsnr_min: float = -15.0, logsnr_max: float = 15.0, shift: float = 0.0, xp=np
):
  # simple diffusion: -2 log tan(pi u / 2), with u squeezed so log-SNR spans [min, max], + shift.
  t_min = math.atan(math.exp(-0.5 * logsnr_max))
  t_max = math.atan(math.exp(-0.5 * logsnr_min))
  return -2.0 * xp.log(xp.tan(t_min + u * (t_max - t_min))) + shift


def _logsnr_cosine_shifted(
  u,
  *,
  image_size: int = 64,
  base_size: int = 64,
  logsnr_min: float = -15.0,
  logsnr_max: float = 15.0,
  xp=np,
):
  # Shift by 2 log(base / size): larger images need more noise at the same u (Hoogeboom 2023).
  shift = 2.0 * math.log(base_size / image_size)
  return _logsnr_cosine(u, logsnr_min=logsnr_min, logsnr_max=logsnr_max, shift=shift, xp=xp)


def _logsnr_linear(u, *, logsnr_min: float = -10.0, logsnr_max: float = 10.0, xp=np):
  return logsnr_max + u * (logsnr_min - logsnr_max)


_CONTINUOUS: dict[str, _LogSNR] = {
  "cosine": _cosine_logsnr,
  "sigmoid": _sigmoid_logsnr,
  "logsnr_cosine": _logsnr_cosine,
  "logsnr_cosine_shifted": _logsnr_cosine_shifted,
  "logsnr_linear": _logsnr_linear,
}
# Families defined by betas directly; continuous log-SNR interpolates their table.
_BETA_DEFINED = ("linear", "scaled_linear")
NAMES: tuple[str, ...] = (*_BETA_DEFINED, *_CONTINUOUS)
LOGSNR_MAX = 30.0  # continuous log-SNR is clipped here near u = 0 (abar = 1 - 1e-13)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Schedule:
  """Float32 tables of shape (T,) indexed by integer t in [0, T), built in float64.

  `alphas_cumprod_prev[t]` is abar_{t-1} with abar_{-1} = 1. The DDPM tables
  `sqrt_recip_alphas_cumprod` = 1 / sqrt(abar_t) and `sqrt_recipm1_alphas_cumprod` =
  sqrt(1 / abar_t - 1) give x_0 = x_t * the first - eps * the second;
  `log_one_minus_alphas_cumprod` = log(1 - abar_t). The posterior q(x_{t-1}|x_t, x_0)
  has mean coef1 * x_0 + coef2 * x_t and variance `posterior_variance`; its log is clipped at
  t = 0 (where the variance is 0) to the t = 1 value, as in DDPM.
  """

  betas: jax.Array
  alphas: jax.Array
  alphas_cumprod: jax.Array
  alphas_cumprod_prev: jax.Array
  sqrt_alphas_cumprod: jax.Array
  sqrt_one_minus_alphas_cumprod: jax.Array
  sqrt_recip_alphas_cumprod: jax.Array
  sqrt_recipm1_alphas_cumprod: jax.Array
  log_one_minus_alphas_cumprod: jax.Array
  log_snr: jax.Array
  posterior_variance: jax.Array
  posterior_log_variance_clipped: jax.Array
  posterior_mean_coef1: jax.Array
  posterior_mean_coef2: jax.Array
  name: str = dataclasses.field(default="custom", metadata=dict(static=True))
  params: tuple[tuple[str, Any], ...] = dataclasses.field(default=(), metadata=dict(static=True))

  @property
  def num_timesteps(self) -> int:
    """T, the number of discrete timesteps: tables are indexed by integer t in [0, T).

    A Python int read from the tables' static shape, so usable under jit.
    """
    return int(self.betas.shape[0])


def _check_params(name: str, fn: Callable, params: dict[str, Any]) -> None:
  import inspect

  allowed = [p for p in inspect.signature(fn).parameters if p not in ("u", "xp", "num_timesteps")]
  unknown = sorted(set(params) - set(allowed))
  if unknown:
    raise ValueError(f"schedule {name!r} got unknown parameters {unknown}; it takes {allowed}.")


def _linear_betas(num_timesteps: int, *, beta_start: float = 1e-4, beta_end: float = 0.02):
  scale = 1000.0 / num_timesteps  # improved DDPM: keep the same total noise for any T
  big = max(beta_start, beta_end)
  if 0 < min(beta_start, beta_end) and big < 1 <= scale * big:
    # Valid betas that the scaling alone pushes to >= 1: say so, not "check start < end".
    raise ValueError(
      f"schedule 'linear' with num_timesteps={num_timesteps}: betas are scaled by "
      f"1000/T = {scale:g} (improved DDPM, to keep the total noise of T = 1000), which takes "
      f"{big:g} to {scale * big:g}, outside (0, 1). Use num_timesteps > {1000 * big:g}, or "
      f"pass beta_start and beta_end below T/1000 = {num_timesteps / 1000:g} (they are "
      "scaled too), or use another schedule (e.g. 'cosine')."
    )
  return np.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=np.float64)


def _scaled_linear_betas(
  num_timesteps: int, *, beta_start: float = 0.00085, beta_end: float = 0.012
):
  return np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64) ** 2


def make(name: str, num_timesteps: int, **params: Any) -> Schedule:
  """Builds the named schedule with T = `num_timesteps` steps.

  Names: `linear` (DDPM, beta_start=1e-4 -> beta_end=0.02 at T=1000, scaled by 1000/T, so
  T > 1000 beta_end = 20 is needed for betas < 1),
  `scaled_linear` (linear in sqrt(beta); beta_start=0.00085, beta_end=0.012), `cosine`
  (improved DDPM, s=0.008, beta clipped at 0.999), `sigmoid` (Chen 2023; start=-3, end=3,
  tau=1), and log-SNR families of continuous u in [0, 1]: `logsnr_cosine` (logsnr_min=-15,
  logsnr_max=15, shift=0), `logsnr_cosine_shifted` (image_size, base_size=64), `logsnr_linear`.
  """
  if name not in NAMES:
    raise ValueError(f"unknown schedule {name!r}; known schedules: {', '.join(NAMES)}.")
  if not isinstance(num_timesteps, int | np.integer) or num_timesteps < 1:
    raise ValueError(f"num_timesteps must be an integer >= 1, got {num_timesteps!r}.")
  if name in _BETA_DEFINED:
    fn = _linear_betas if name == "linear" else _scaled_linear_betas
    _check_params(name, fn, params)
    betas = fn(num_timesteps, **params)
  else:
    fn = _CONTINUOUS[name]
    _check_params(name, fn, params)
    u = np.arange(1, num_timesteps + 1, dtype=np.float64) / num_timesteps
    with np.errstate(divide="ignore", over="ignore"):
      abar = 1.0 / (1.0 + np.exp(-fn(u, **params)))  # abar_t at u = (t + 1) / T
    betas = 1.0 - abar / np.concatenate([[1.0], abar[:-1]])  # abar_{-1} = 1
    if name in ("cosine", "sigmoid"):  # abar(1) = 0 exactly: clip as improved DDPM does
      betas = np.minimum(betas, 0.999)
  return from_betas(betas, name=name, params=tuple(sorted(params.items())))


def from_betas(
  betas: np.ndarray, *, name: str = "custom", params: tuple[tuple[str, Any], ...] = ()
) -> Schedule:
  """Builds all tables from betas (T,) in (0, 1); the other constructors end here."""
  betas = np.asarray(betas, dtype=np.float64)
  if betas.ndim != 1 or betas.size < 1:
    raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}.")
  if not np.all(np.isfinite(betas)) or np.any(betas <= 0) or np.any(betas >= 1):
    bad = np.flatnonzero(~((betas > 0) & (betas < 1)))[:5]
    raise ValueError(
      f"schedule {name!r}: every beta must lie in (0, 1); bad at t={bad.tolist()} "
      f"(values {betas[bad].tolist()}). Check the schedule parameters (e.g. start < end)."
    )
  alphas = 1.0 - betas
  abar = np.cumprod(alphas)
  # Exact arithmetic makes abar strictly decreasing and > 0 for betas in (0, 1); float64 does
  # not: the product underflows (e.g. 120 betas of 0.999), and 1 - beta rounds to 1 for beta
  # below ~1e-16. Either would put abar = 0 or 1 - abar = 0 in a denominator.
  if abar[-1] < np.finfo(np.float64).tiny:
    t0 = int(np.argmax(abar < np.finfo(np.float64).tiny))
    raise ValueError(
      f"schedule {name!r}: alpha-bar underflows float64 (< 1e-307) at t={t0} of T={betas.size}: "
      "the betas are too close to 1 for too many steps; use smaller betas or fewer timesteps."
    )
  flat = np.flatnonzero(np.diff(np.concatenate([[1.0], abar])) >= 0)[:5]
  if flat.size:
    raise ValueError(
      f"schedule {name!r}: alpha-bar must decrease strictly, but betas {betas[flat].tolist()} at "
      f"t={flat.tolist()} are too small to lower it in float64; use betas >= 1e-15."
    )
  abar_prev = np.concatenate([[1.0], abar[:-1]])
  post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
  post_logvar = np.log(
    np.concatenate([post_var[1:2], post_var[1:]]) if abar.size > 1 else np.maximum(post_var, 1e-20)
  )
  tables = dict(
    betas=betas,
    alphas=alphas,
    alphas_cumprod=abar,
    alphas_cumprod_prev=abar_prev,
    sqrt_alphas_cumprod=np.sqrt(abar),
    sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - abar),
    sqrt_recip_alphas_cumprod=np.sqrt(1.0 / abar),
    sqrt_recipm1_alphas_cumprod=np.sqrt((1.0 - abar) / abar),
    log_one_minus_alphas_cumprod=np.log1p(-abar),
    log_snr=_logit(abar),
    posterior_variance=post_var,
    posterior_log_variance_clipped=post_logvar,
    posterior_mean_coef1=betas * np.sqrt(abar_prev) / (1.0 - abar),
    posterior_mean_coef2=(1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
  )
  return Schedule(
    **{k: jnp.asarray(v, dtype=jnp.float32) for k, v in tables.items()}, name=name, params=params
  )


def continuous_log_snr(schedule: Schedule, u: jax.Array) -> jax.Array:
  """log-SNR at continuous time u in [0, 1] (any shape); agrees with the table at u = (t+1)/T.

  Closed form for the families defined by a function of u (clipped to [table's last value,
  LOGSNR_MAX], so `cosine` and `sigmoid` stay finite at u = 1 and u = 0); linear
  interpolation of the table (extrapolated
  below u = 1/T) for beta-defined schedules.
  """
  u = jnp.asarray(u, jnp.float32)
  if schedule.name in _CONTINUOUS:
    fn = _CONTINUOUS[schedule.name]
    lam = fn(u, **dict(schedule.params), xp=jnp)
    return jnp.clip(lam, schedule.log_snr[-1], LOGSNR_MAX)
  n = schedule.num_timesteps
  if n == 1:
    return jnp.broadcast_to(schedule.log_snr[0], u.shape)
  pos = u * n - 1.0
  i = jnp.clip(jnp.floor(pos), 0, n - 2).astype(jnp.int32)
  lo, hi = schedule.log_snr[i], schedule.log_snr[i + 1]
  return lo + (pos - i) * (hi - lo)
