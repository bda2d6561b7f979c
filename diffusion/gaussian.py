"""The Gaussian forward process and conversions between parameterisations (pure functions).

Images are NHWC float arrays; `t` is an int32 array of shape (B,) (or a scalar) indexing the
schedule tables, and t = -1 stands for "no noise" (abar = 1) where noted. Per-example
coefficients broadcast over the trailing image axes.

Notation: alpha = sqrt(abar_t), sigma = sqrt(1 - abar_t), so x_t = alpha x_0 + sigma eps,
SNR = alpha^2 / sigma^2, v = alpha eps - sigma x_0 (Salimans & Ho 2022).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion.schedules import Schedule

PREDICTIONS = ("eps", "x0", "v")
VARIANCES = ("fixed_small", "fixed_large", "learned_range")  # of `p_mean_logvar`


def extract_t(t: jax.Array, ndim: int) -> jax.Array:
  """t of shape (B,) (or ()) reshaped to rank `ndim` (B, 1, ..., 1) for broadcasting."""
  t = jnp.asarray(t)
  return t.reshape(t.shape + (1,) * (ndim - t.ndim))


def extract(table: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
  """table[t] reshaped to broadcast against an array of rank `ndim` with batch axis first."""
  return table[extract_t(t, ndim)]


def alpha_sigma(schedule: Schedule, t: jax.Array, ndim: int) -> tuple[jax.Array, jax.Array]:
  """(sqrt(abar_t), sqrt(1 - abar_t)) at integer t, broadcastable to rank `ndim`.

  t = -1 gives (1, 0), the clean data.
  """
  t = extract_t(t, ndim)
  tc = jnp.maximum(t, 0)
  alpha = jnp.where(t < 0, 1.0, schedule.sqrt_alphas_cumprod[tc])
  return alpha, jnp.where(t < 0, 0.0, schedule.sqrt_one_minus_alphas_cumprod[tc])


def alpha_sigma_from_log_snr(log_snr: jax.Array, ndim: int) -> tuple[jax.Array, jax.Array]:
  """(alpha, sigma) = (sqrt(sigmoid(logsnr)), sqrt(sigmoid(-logsnr))), for continuous time."""
  lam = extract_t(log_snr, ndim)
  return jnp.sqrt(jax.nn.sigmoid(lam)), jnp.sqrt(jax.nn.sigmoid(-lam))


# ---- forward process ---------------------------------------------------------------------------


def q_mean_variance(schedule: Schedule, x0: jax.Array, t: jax.Array):
  """q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I): returns (mean, variance, log_variance)."""
  abar = extract(schedule.alphas_cumprod, t, x0.ndim)
  return jnp.sqrt(abar) * x0, 1.0 - abar, jnp.log1p(-abar)


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """Samples q(x_t | x_0): x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise.

  x0, noise: (B, ...) float; t: (B,) int in [0, T). Returns x_t with x0's shape.
  """
  alpha = extract(schedule.sqrt_alphas_cumprod, t, x0.ndim)
  sigma = extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim)
  return alpha * x0 + sigma * noise


def q_step_mean_variance(schedule: Schedule, x_prev: jax.Array, t: jax.Array):
  """One-step kernel q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I): (mean, variance).

  (Not sqrt(beta_t) x_{t-1}: the mean shrinks by sqrt(alpha_t) so variance stays bounded.)
  """
  beta = extract(schedule.betas, t, x_prev.ndim)
  return jnp.sqrt(1.0 - beta) * x_prev, beta


def q_step_sample(
  schedule: Schedule, x_prev: jax.Array, t: jax.Array, noise: jax.Array
) -> jax.Array:
  """Samples q(x_t | x_{t-1}) = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) noise."""
  mean, var = q_step_mean_variance(schedule, x_prev, t)
  return mean + jnp.sqrt(var) * noise


def q_posterior(schedule: Schedule, x0: jax.Array, x_t: jax.Array, t: jax.Array):
  """q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta~_t I): `posterior_between` at s = t - 1.

  coef1 = beta_t sqrt(abar_{t-1}) / (1 - abar_t), coef2 = (1 - abar_{t-1}) sqrt(alpha_t) /
  (1 - abar_t), beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t). Returns (mean, variance,
  log_variance_clipped), each of x0's shape (at t = 0 the variance is 0 and its log is clipped to
  the t = 1 value, see `clipped_log_variance`).
  """
  t = jnp.asarray(t)
  mean, var, _ = posterior_between(schedule, x0=x0, x_t=x_t, t=t, s=t - 1)
  full = lambda a: jnp.broadcast_to(a, mean.shape)
  return mean, full(var), full(clipped_log_variance(schedule, var, s=t - 1))


def posterior_between(
  schedule: Schedule, *, x0: jax.Array, x_t: jax.Array, t: jax.Array, s: jax.Array
):
  """q(x_s | x_t, x_0) for any s < t (s = -1 means the clean data, abar = 1): the one posterior.

  Keyword-only (unlike `q_posterior(schedule, x0, x_t, t)`, whose order is public): t and s are
  both integer timesteps, scalars or (B,), and x0, x_t both (B, ...) arrays, easy to swap.

  With abar_{t|s} = abar_t / abar_s and beta_{t|s} = 1 - abar_{t|s}: mean =
  (sqrt(abar_s) beta_{t|s} x_0 + sqrt(abar_{t|s}) (1 - abar_s) x_t) / (1 - abar_t), variance =
  beta_{t|s} (1 - abar_s) / (1 - abar_t). For adjacent steps (s = t - 1) beta_{t|s} is the
  table's beta_t, exact to float32 (`beta_between`, the ratio of two float32 tables, is off by up
  to 6e-5 relative there); otherwise `beta_between`. At s = -1 the mean is x_0 exactly and the
  variance 0. Returns (mean, variance, beta_{t|s}): mean of x0's shape, the other two
  broadcastable to it ((B, 1, ..., 1)).
  """
  n = x0.ndim
  a_t, sg_t = alpha_sigma(schedule, t, n)
  a_s, sg_s = alpha_sigma(schedule, s, n)
  tt, ss = extract_t(t, n), extract_t(s, n)
  beta_ts = jnp.where(
    ss == tt - 1, schedule.betas[jnp.maximum(tt, 0)], beta_between(a_t, sg_t, a_s, sg_s)
  )
  om_t, om_s = sg_t**2, sg_s**2
  coef_x0 = jnp.where(ss < 0, 1.0, a_s * beta_ts / om_t)
  coef_xt = (a_t / a_s) * om_s / om_t
  return coef_x0 * x0 + coef_xt * x_t, beta_ts * om_s / om_t, beta_ts


def beta_between(a_t, sg_t, a_s, sg_s) -> jax.Array:
  """beta_{t|s} = 1 - abar_t / abar_s from alpha = sqrt(abar) and sigma = sqrt(1 - abar).

  Where abar_t is near 1 the ratio form cancels in float32, so there it is formed as
  ((1 - abar_t) - (1 - abar_s)) / abar_s from the sigma tables; elsewhere as the ratio.
  """
  low_noise = sg_t**2 < 0.5
  return jnp.where(low_noise, (sg_t**2 - sg_s**2) / a_s**2, 1.0 - (a_t / a_s) ** 2)


def clipped_log_variance(schedule: Schedule, variance: jax.Array, *, s: jax.Array) -> jax.Array:
  """log of a posterior variance over (t, s), where s = -1 (variance 0) gets DDPM's decoder value
  log beta~_1 = `schedule.posterior_log_variance_clipped[0]` (log 1e-20 when T = 1).

  variance: (B, 1, ..., 1) as `posterior_between` returns it; s: scalar or (B,) ints. Returns
  variance's shape.
  """
  clean = extract_t(s, jnp.ndim(variance)) < 0
  safe = jnp.where(clean, 1.0, variance)  # no log(0), not even in the branch that is dropped
  return jnp.where(clean, schedule.posterior_log_variance_clipped[0], jnp.log(safe))


def p_mean_logvar(
  schedule: Schedule,
  *,
  x0: jax.Array,
  x_t: jax.Array,
  t: jax.Array,
  s: jax.Array,
  variance: str,
  v: jax.Array | None = None,
):
  """The reverse kernel p(x_s | x_t) = N(mean, exp(logvar) I) over any pair s < t, given x0.

  The one rule used by the VLB (s = t - 1, x0 the model's prediction) and by the ancestral
  sampler (s the next timestep of a respaced grid, -1 after the last). The mean is the posterior
  mean of `posterior_between` with x0 plugged in. Log-variance, with beta~ the posterior
  variance and beta_{t|s} = 1 - abar_t / abar_s:
    `fixed_small`    log beta~;
    `fixed_large`    log beta_{t|s} (DDPM's sigma^2 = beta_t for adjacent steps);
    `learned_range`  frac log beta_{t|s} + (1 - frac) log beta~, frac = (v + 1) / 2, v (the
                     extra network channels, x0's shape) nominally in [-1, 1] (improved DDPM).
  s = -1 (the clean data: the VLB's decoder term at t = 0, and the sampler's last step, which
  adds no noise): the posterior is a point mass at x0, mean = x0, and its log variance is
  clipped to DDPM's decoder value log beta~_1 (`clipped_log_variance`); `fixed_large` uses that
  value too (DDPM's choice, for a tighter decoder likelihood than log beta_0), while
  `learned_range` keeps log beta_{t|-1} = log(1 - abar_t) (log beta_0 at t = 0) as its upper
  end, as improved DDPM does. These are the VLB's numbers as the table-based code had them.

  x0, x_t: (B, ...); t, s: scalars or (B,) ints with -1 <= s < t < T. Returns (mean, logvar),
  both of x0's shape.
  """
  if variance not in VARIANCES:
    raise ValueError(f"unknown variance {variance!r}; known: {', '.join(VARIANCES)}.")
  if variance == "learned_range" and v is None:
    raise ValueError("variance 'learned_range' needs v, the network's variance channels.")
  mean, var, beta_ts = posterior_between(schedule, x0=x0, x_t=x_t, t=t, s=s)
  small = clipped_log_variance(schedule, var, s=s)
  if variance == "fixed_small":
    logvar = small
  elif variance == "fixed_large":
    logvar = jnp.where(extract_t(s, x0.ndim) < 0, small, jnp.log(beta_ts))
  else:
    frac = (v + 1.0) / 2.0
    logvar = frac * jnp.log(beta_ts) + (1.0 - frac) * small
  return mean, jnp.broadcast_to(logvar, mean.shape)


# ---- conversions between parameterisations (each written once) --------------------------------
# All from x_t = alpha x_0 + sigma eps with alpha = sqrt(abar_t) in (0, 1], sigma = sqrt(1 - abar_t)
# in [0, 1), alpha^2 + sigma^2 = 1 (e.g. from `alpha_sigma` or `alpha_sigma_from_log_snr`).
# Arrays are (B, ...) of one shape; alpha and sigma broadcast against them ((B, 1, ..., 1) or
# scalars). alpha and sigma are keyword-only: swapped, they would still run and be wrong.


def x0_from_eps(x_t: jax.Array, eps: jax.Array, *, alpha: jax.Array, sigma: jax.Array) -> jax.Array:
  """x_0 = (x_t - sigma eps) / alpha. Needs alpha > 0; error in eps is amplified by sigma/alpha
  (= exp(-logSNR/2)), large at high noise. Returns x_t's shape (data in [-1, 1] for exact eps).
  """
  return (x_t - sigma * eps) / alpha


def eps_from_x0(x_t: jax.Array, x0: jax.Array, *, alpha: jax.Array, sigma: jax.Array) -> jax.Array:
  """eps = (x_t - alpha x_0) / sigma. Needs sigma > 0 (undefined for the clean data, t = -1);
  error in x0 is amplified by alpha/sigma, large at low noise. Returns x_t's shape (~N(0, I))."""
  return (x_t - alpha * x0) / sigma


def v_from_eps_x0(
  *, eps: jax.Array, x0: jax.Array, alpha: jax.Array, sigma: jax.Array
) -> jax.Array:
  """v = alpha eps - sigma x_0 (Salimans & Ho 2022), the velocity d x_t / d phi for
  (alpha, sigma) = (cos phi, sin phi). All keyword-only: eps and x0 are easy to swap. Returns
  eps's shape; with eps ~ N(0, I) independent of x_0, E[v^2] = alpha^2 + sigma^2 E[x_0^2]."""
  return alpha * eps - sigma * x0


def x0_from_v(x_t: jax.Array, v: jax.Array, *, alpha: jax.Array, sigma: jax.Array) -> jax.Array:
  """x_0 = alpha x_t - sigma v (uses alpha^2 + sigma^2 = 1; well-conditioned at every noise
  level). Returns x_t's shape."""
  return alpha * x_t - sigma * v


def eps_from_v(x_t: jax.Array, v: jax.Array, *, alpha: jax.Array, sigma: jax.Array) -> jax.Array:
  """eps = sigma x_t + alpha v (uses alpha^2 + sigma^2 = 1). Returns x_t's shape."""
  return sigma * x_t + alpha * v


def score_from_eps(eps: jax.Array, *, sigma: jax.Array) -> jax.Array:
  """grad_x log q(x_t) = -eps / sigma (for the exact eps-denoiser). Needs sigma > 0; eps (B, ...),
  sigma broadcastable. Returns eps's shape."""
  return -eps / sigma


def eps_from_score(score: jax.Array, *, sigma: jax.Array) -> jax.Array:
  """eps = -sigma grad_x log q(x_t), the inverse of `score_from_eps`. score (B, ...), sigma in
  [0, 1) broadcastable. Returns score's shape."""
  return -sigma * score


def split_prediction(
  prediction: str, out: jax.Array, x_t: jax.Array, alpha: jax.Array, sigma: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Network output in the `prediction` parameterisation -> (x0_hat, eps_hat)."""
  if prediction == "eps":
    return x0_from_eps(x_t, out, alpha=alpha, sigma=sigma), out
  if prediction == "x0":
    return out, eps_from_x0(x_t, out, alpha=alpha, sigma=sigma)
  if prediction == "v":
    return (
      x0_from_v(x_t, out, alpha=alpha, sigma=sigma),
      eps_from_v(x_t, out, alpha=alpha, sigma=sigma),
    )
  raise ValueError(f"unknown prediction {prediction!r}; known: {', '.join(PREDICTIONS)}.")


def prediction_target(
  prediction: str, x0: jax.Array, eps: jax.Array, alpha: jax.Array, sigma: jax.Array
) -> jax.Array:
  """The regression target of the network for the `prediction` parameterisation."""
  if prediction == "eps":
    return eps
  if prediction == "x0":
    return x0
  if prediction == "v":
    return v_from_eps_x0(eps=eps, x0=x0, alpha=alpha, sigma=sigma)
  raise ValueError(f"unknown prediction {prediction!r}; known: {', '.join(PREDICTIONS)}.")


# ---- KL and likelihood helpers -----------------------------------------------------------------


def normal_kl(mean1, logvar1, mean2, logvar2) -> jax.Array:
  """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats.

  Written with expm1(d) - d, d = logvar1 - logvar2, which keeps precision when d is small.
  """
  d = logvar1 - logvar2
  return 0.5 * (jnp.expm1(d) - d + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def discretized_gaussian_log_likelihood(
  x: jax.Array, mean: jax.Array, log_scale: jax.Array
) -> jax.Array:
  """log P(x) for 8-bit data x in [-1, 1] (256 bins of width 2/255) under N(mean, exp(log_scale)^2).

  The edge bins extend to -inf and +inf. Computed in log space on the tail that keeps precision.
  Returns elementwise log-probabilities in nats.
  """
  from jax.scipy.special import log_ndtr

  inv_std = jnp.exp(-log_scale)
  hi = inv_std * (x - mean + 1.0 / 255.0)  # standardised upper bin edge
  lo = inv_std * (x - mean - 1.0 / 255.0)
  # log(Phi(hi) - Phi(lo)); for lo > 0 use the mirror Phi(-lo) - Phi(-hi) to keep precision.
  upper = lo > 0
  a = jnp.where(upper, -lo, hi)
  b = jnp.where(upper, -hi, lo)
  log_a, log_b = log_ndtr(a), log_ndtr(b)
  mid = log_a + jnp.log(-jnp.expm1(jnp.minimum(log_b - log_a, -1e-30)))
  return jnp.where(x < -0.999, log_ndtr(hi), jnp.where(x > 0.999, log_ndtr(-lo), mid))
