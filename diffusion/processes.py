"""Continuous-time Gaussian processes x_t = alpha(t) x_0 + sigma(t) eps, t in [0, 1], with their
training distributions over noise levels (pure functions of arrays).

Every process maps onto the variance-exploding form of Karras et al. (2022): the scaled state
x~ = x_t / alpha = x_0 + s eps has noise level s = sigma / alpha, and log-SNR = -2 log s. The
samplers of `solvers.py` work in (x~, s), so any process and parameterisation shares them.

| process | alpha(t), sigma(t) | training noise levels |
| vp      | the schedule's continuous log-SNR: alpha^2 = sigmoid(lam), sigma^2 = sigmoid(-lam) |
|         |   as the discrete tables (integer t in discrete time, losses.noise_levels)         |
| ve      | 1, sigma_min (sigma_max / sigma_min)^t (Song et al. 2021) | t ~ U(0, 1) (log-uniform) |
| edm     | 1, (sigma_max^(1/rho) + (1 - t)(sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, t = 1 the
|         |   noisiest | ln sigma ~ N(p_mean, p_std^2) (Karras et al. 2022: -1.2, 1.2) |
| flow    | 1 - t, t (rectified flow / flow matching, Lipman et al. 2023) | t ~ U(0, 1), or
|         |   logit-normal: t = sigmoid(m + s n), n ~ N(0, 1) (SD3: m = 0, s = 1) |
| cosine  | cos(pi t / 2), sin(pi t / 2) (the cosine interpolant) | t ~ U(0, 1) |
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from diffusion.schedules import Schedule, continuous_log_snr

PROCESSES = ("vp", "ve", "edm", "flow", "cosine")
T_DISTRIBUTIONS = ("uniform", "logit_normal")
_T_MAX = 1.0 - 1e-5  # flow at t = 1 has alpha = 0 (s infinite); training and s -> t stay below


@dataclasses.dataclass(frozen=True)
class Process:
  """A process by name with its parameters (see the module docstring). Immutable; the VP
  process holds its discrete schedule, whose continuous log-SNR it follows."""

  name: str = "vp"
  schedule: Schedule | None = None  # vp only
  sigma_min: float = 0.002  # ve, edm: the ends of sigma(t); every process: default sampling range
  sigma_max: float = 80.0
  rho: float = 7.0  # edm: sigma(t) spacing (EDM eq. 5)
  p_mean: float = -1.2  # edm: ln sigma ~ N(p_mean, p_std^2) in training
  p_std: float = 1.2
  t_distribution: str = "uniform"  # flow: uniform | logit_normal
  logit_mean: float = 0.0
  logit_std: float = 1.0

  def __post_init__(self):
    if self.name not in PROCESSES:
      raise ValueError(
        f"unknown process {self.name!r}; set config.diffusion.process to one of: "
        f"{', '.join(PROCESSES)}."
      )
    if self.name == "vp" and self.schedule is None:
      raise ValueError("the vp process needs a schedule.")
    if not 0.0 < self.sigma_min < self.sigma_max:
      raise ValueError(
        f"need 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}; "
        "fix config.diffusion.sigma_min / sigma_max."
      )
    if self.t_distribution not in T_DISTRIBUTIONS:
      raise ValueError(
        f"unknown config.diffusion.t_distribution {self.t_distribution!r}; known: "
        f"{', '.join(T_DISTRIBUTIONS)}."
      )
    if self.p_std <= 0 or self.logit_std <= 0:
      raise ValueError("config.diffusion.p_std and logit_std must be > 0.")

  @property
  def variance_preserving(self) -> bool:
    """alpha^2 + sigma^2 = 1 (where v-prediction is defined)."""
    return self.name in ("vp", "cosine")

  def alpha_sigma(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(alpha(t), sigma(t)) for t in [0, 1] (any shape, float32)."""
    t = jnp.asarray(t, jnp.float32)
    if self.name == "vp":
      lam = continuous_log_snr(self.schedule, t)
      return jnp.sqrt(jax.nn.sigmoid(lam)), jnp.sqrt(jax.nn.sigmoid(-lam))
    if self.name == "ve":
      return jnp.ones_like(t), self.sigma_min * (self.sigma_max / self.sigma_min) ** t
    if self.name == "edm":
      lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
      return jnp.ones_like(t), (hi + (1.0 - t) * (lo - hi)) ** self.rho
    if self.name == "flow":
      return 1.0 - t, t
    return jnp.cos(0.5 * math.pi * t), jnp.sin(0.5 * math.pi * t)

  def t_of_s(self, s: jax.Array) -> jax.Array:
    """The time whose noise level sigma / alpha is s > 0 (the inverse of `s_of_t`)."""
    s = jnp.asarray(s, jnp.float32)
    if self.name == "vp":
      return vp_t_of_log_snr(self.schedule, -2.0 * jnp.log(s))
    if self.name == "ve":
      return jnp.log(s / self.sigma_min) / math.log(self.sigma_max / self.sigma_min)
    if self.name == "edm":
      lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
      return 1.0 - (s ** (1 / self.rho) - hi) / (lo - hi)
    if self.name == "flow":
      return s / (1.0 + s)
    return jnp.arctan(s) * (2.0 / math.pi)

  def s_of_t(self, t: jax.Array) -> jax.Array:
    alpha, sigma = self.alpha_sigma(t)
    return sigma / alpha

  def training_noise(self, key: jax.Array, batch: int) -> tuple[jax.Array, jax.Array]:
    """(alpha, sigma), each (batch,), drawn from the process's training distribution (the vp
    process draws t uniformly here; losses.noise_levels draws its training levels)."""
    if self.name == "edm":
      sigma = jnp.exp(self.p_mean + self.p_std * jax.random.normal(key, (batch,)))
      return jnp.ones_like(sigma), sigma
    if self.name == "flow" and self.t_distribution == "logit_normal":
      t = jax.nn.sigmoid(self.logit_mean + self.logit_std * jax.random.normal(key, (batch,)))
    else:
      t = jax.random.uniform(key, (batch,))
    return self.alpha_sigma(jnp.minimum(t, _T_MAX))

  def sampling_range(self) -> tuple[float, float]:
    """Default (s_min, s_max) of sampling grids: (sigma_min, sigma_max), EDM's 0.002 and 80 by
    default, for every process; for vp within its table's range (a discrete model knows no
    other noise levels). Starting at s = 80 rather than the table's end (s ~ 2e4 for cosine at
    T = 1000) spends the steps where the data is (measured: Heun, 24 karras steps on Gaussian
    data, covariance error 0.36 from s = 2e4, 0.05 from s = 80)."""
    if self.name == "vp":
      lam = jax.device_get(self.schedule.log_snr)
      lo, hi = float(math.exp(-0.5 * lam[0])), float(math.exp(-0.5 * lam[-1]))
      return max(lo, self.sigma_min), min(hi, self.sigma_max)
    return self.sigma_min, self.sigma_max


def vp_t_of_log_snr(schedule: Schedule, lam: jax.Array) -> jax.Array:
  """Continuous t in [0, 1] whose log-SNR is `lam`, by linear interpolation of the discrete
  table (decreasing in t, at u = (t + 1) / T); clamped to the table's ends."""
  table = schedule.log_snr[::-1]  # increasing
  u = (jnp.arange(schedule.num_timesteps, 0, -1, dtype=jnp.float32)) / schedule.num_timesteps
  return jnp.interp(lam, table, u)


def discrete_t_of_log_snr(schedule: Schedule, lam: jax.Array) -> jax.Array:
  """Fractional timestep in [0, T - 1] whose table log-SNR is `lam` (the conditioning of a
  network trained on integer t, used when it samples in sigma space)."""
  return vp_t_of_log_snr(schedule, lam) * schedule.num_timesteps - 1.0
