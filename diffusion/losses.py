"""The denoising loss of every process (one entry point, `loss`), the hybrid loss with learned
variances, and bits/dim.

A model is any callable `model_fn(x_t, cond, labels) -> out`: x_t (B, H, W, C) float (c_in x~
for edm, see denoiser.py), cond (B,) float32 (see `noise_levels`), labels (B,) int32 or None;
out (B, H, W, C), or (B, H, W, 2C) for learned variances.

Time: `discrete` is the vp process on its table's integer t in [0, T), the network conditioned
on t; `continuous` draws t in [0, 1] (vp: the schedule's continuous log-SNR, the network
conditioned on it; the other processes always, conditioned on c_noise = ln(s) / 4).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from diffusion import denoiser
from diffusion import gaussian as G
from diffusion.processes import Process
from diffusion.schedules import Schedule, continuous_log_snr

ModelFn = Callable[[jax.Array, jax.Array, jax.Array | None], jax.Array]
WEIGHTINGS = ("simple", "min_snr", "trunc_snr")
T_SAMPLINGS = ("uniform", "antithetic", "stratified")
VARIANCES = G.VARIANCES
TIME_INPUTS = ("t", "log_snr")
TIMES = ("discrete", "continuous")


def _check(kind: str, value: str, allowed: tuple[str, ...]) -> None:
  if value not in allowed:
    raise ValueError(f"unknown {kind} {value!r}; known: {', '.join(allowed)}.")


def mean_flat(x: jax.Array) -> jax.Array:
  """Mean over all axes but the first: (B, ...) -> (B,)."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def sample_u(key: jax.Array, batch: int, method: str = "uniform") -> jax.Array:
  """(B,) times in [0, 1): iid `uniform`; `antithetic` pairs (u, 1 - u); `stratified` puts one
  sample in each of B equal strata, (u0 + i) / B, the low-discrepancy sampler of VDM."""
  _check("t_sampling", method, T_SAMPLINGS)
  if method == "uniform":
    return jax.random.uniform(key, (batch,))
  if method == "antithetic":
    u = jax.random.uniform(key, ((batch + 1) // 2,))
    return jnp.concatenate([u, 1.0 - u])[:batch] % 1.0
  return (jax.random.uniform(key, ()) + jnp.arange(batch)) / batch


def sample_t(key: jax.Array, batch: int, num_timesteps: int, method: str = "uniform") -> jax.Array:
  """(B,) int32 timesteps, uniform over [0, T) in distribution for every method."""
  u = sample_u(key, batch, method)
  return jnp.minimum((u * num_timesteps).astype(jnp.int32), num_timesteps - 1)


def model_time(schedule: Schedule, t: jax.Array, time_input: str) -> jax.Array:
  """The network's conditioning for integer t: t itself, or the log-SNR table entry."""
  _check("time_input", time_input, TIME_INPUTS)
  return schedule.log_snr[t] if time_input == "log_snr" else t.astype(jnp.float32)


def loss_weight(
  weighting: str,
  prediction: str,
  *,
  alpha: jax.Array,
  sigma: jax.Array,
  sigma_data: float = 0.5,
  gamma: float = 5.0,
) -> jax.Array:
  """Per-example weight on ||out - target||^2 in the `prediction` space, at (alpha, sigma) of
  any shape.

  `simple`: 1 (uniform in that space). Others are set in x0 space, with SNR = alpha^2 / sigma^2,
  and carried to the prediction's space by k = d x0_hat / d out (`denoiser.x0_error_scale`):
  w = w_x0 k^2, e.g. w_eps = w_x0 / SNR and, for alpha^2 + sigma^2 = 1, w_v = w_x0 / (SNR + 1).
  `min_snr`: w_x0 = min(SNR, gamma) (Hang et al. 2023); `trunc_snr`: w_x0 = max(SNR, 1)
  (Salimans & Ho 2022).
  """
  _check("weighting", weighting, WEIGHTINGS)
  _check("prediction", prediction, denoiser.PARAMETERISATIONS)
  if weighting == "simple":
    return jnp.ones_like(sigma)
  snr = (alpha / sigma) ** 2
  w_x0 = jnp.minimum(snr, gamma) if weighting == "min_snr" else jnp.maximum(snr, 1.0)
  return w_x0 * denoiser.x0_error_scale(prediction, alpha, sigma, sigma_data) ** 2


def drop_labels(
  key: jax.Array, labels: jax.Array | None, rate: float, null_label: int
) -> jax.Array | None:
  """Labels (B,) each replaced by `null_label` with probability `rate` (classifier-free
  guidance's training); None stays None."""
  if labels is None or rate <= 0:
    return labels
  return jnp.where(jax.random.bernoulli(key, rate, labels.shape), null_label, labels)


def p_mean_logvar(
  schedule: Schedule,
  out: jax.Array,
  x_t: jax.Array,
  t: jax.Array,
  *,
  prediction: str,
  variance: str,
  clip_x0: bool = False,
):
  """Reverse kernel p(x_{t-1} | x_t) from the network output at integer t: `G.p_mean_logvar`
  at s = t - 1 (the sampler's kernel), with x0 predicted from `out` (optionally clipped to
  [-1, 1]) and, for `learned_range`, v from its last C channels. See `G.p_mean_logvar` for the
  log-variances and the decoder's (t = 0). Returns (mean, log_variance, x0_hat).
  """
  _check("variance", variance, VARIANCES)
  c = x_t.shape[-1]
  alpha, sigma = G.alpha_sigma(schedule, t, x_t.ndim)
  x0_hat, _ = G.split_prediction(prediction, out[..., :c], x_t, alpha, sigma)
  if clip_x0:
    x0_hat = jnp.clip(x0_hat, -1.0, 1.0)
  v = out[..., c:] if variance == "learned_range" else None
  mean, logvar = G.p_mean_logvar(schedule, x0=x0_hat, x_t=x_t, t=t, s=t - 1, variance=variance, v=v)
  return mean, logvar, x0_hat


def vlb_term(
  schedule: Schedule,
  x0: jax.Array,
  x_t: jax.Array,
  t: jax.Array,
  mean: jax.Array,
  logvar: jax.Array,
) -> jax.Array:
  """Per-example VLB term L_t in bits/dim: KL(q(x_{t-1}|x_t,x0) || p) for t > 0, the decoder
  -log p(x0 | x_1) for t = 0 (8-bit data, discretised Gaussian)."""
  true_mean, _, true_logvar = G.q_posterior(schedule, x0, x_t, t)
  kl = mean_flat(G.normal_kl(true_mean, true_logvar, mean, logvar)) / math.log(2.0)
  nll = -mean_flat(G.discretized_gaussian_log_likelihood(x0, mean, 0.5 * logvar)) / math.log(2.0)
  return jnp.where(t == 0, nll, kl)


def prior_bpd(schedule: Schedule, x0: jax.Array) -> jax.Array:
  """KL(q(x_{T-1} | x_0) || N(0, I)) per example, in bits/dim."""
  t = jnp.full((x0.shape[0],), schedule.num_timesteps - 1)
  mean, _, logvar = G.q_mean_variance(schedule, x0, t)
  return mean_flat(G.normal_kl(mean, logvar, 0.0, 0.0)) / math.log(2.0)


class LossOutput(NamedTuple):
  loss: jax.Array  # (B,) what is minimised: weight * mse (+ vlb_weight * T * vlb)
  mse: jax.Array  # (B,) unweighted mean squared error in the prediction space
  vlb: jax.Array  # (B,) the one-step VLB term L_t in bits/dim (learned_range only, else zeros)
  log_snr: jax.Array  # (B,) the sampled noise levels


class NoiseLevels(NamedTuple):
  alpha: jax.Array  # (B,)
  sigma: jax.Array  # (B,)
  log_snr: jax.Array  # (B,)
  cond: jax.Array  # (B,) float32, the network's conditioning
  t: jax.Array | None  # (B,) int32 timesteps in discrete time, else None


def noise_levels(
  process: Process, key: jax.Array, batch: int, *, time: str = "discrete", t_sampling="uniform"
) -> NoiseLevels:
  """`batch` training noise levels of `process` and the network's conditioning at each.

  vp, discrete time: t ~ U{0..T-1} (`sample_t` by `t_sampling`), the table's alpha, sigma and
  log-SNR, conditioned on t. vp, continuous: u by `t_sampling`, log-SNR = `continuous_log_snr`,
  conditioned on it. Other processes (always continuous): `Process.training_noise`, conditioned
  on c_noise(s), s = sigma / alpha.
  """
  _check("time", time, TIMES)
  if process.name != "vp":
    alpha, sigma = process.training_noise(key, batch)
    s = sigma / alpha
    return NoiseLevels(alpha, sigma, jnp.log(1.0 / s**2), denoiser.c_noise(s), None)
  schedule = process.schedule
  if time == "continuous":
    lam = continuous_log_snr(schedule, sample_u(key, batch, t_sampling))
    alpha, sigma = G.alpha_sigma_from_log_snr(lam, 1)
    return NoiseLevels(alpha, sigma, lam, lam, None)
  t = sample_t(key, batch, schedule.num_timesteps, t_sampling)
  alpha, sigma = G.alpha_sigma(schedule, t, 1)
  return NoiseLevels(alpha, sigma, schedule.log_snr[t], model_time(schedule, t, "t"), t)


def per_example_keys(key: jax.Array) -> bool:
  """Whether `key` is a batch of keys, one per example ((B, 2) raw or (B,) typed), not one key."""
  return key.ndim == (1 if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else 2)


def loss(
  model_fn: ModelFn,
  process: Process,
  x0: jax.Array,
  key: jax.Array,
  *,
  time: str = "discrete",
  labels: jax.Array | None = None,
  prediction: str = "eps",
  weighting: str = "simple",
  min_snr_gamma: float = 5.0,
  sigma_data: float = 0.5,
  t_sampling: str = "uniform",
  variance: str = "fixed_small",
  vlb_weight: float = 0.001,
  label_dropout: float = 0.0,
  null_label: int = 0,
) -> LossOutput:
  """Per-example denoising loss of `process` at random noise levels (`noise_levels`).

  x0: (B, H, W, C) in [-1, 1]; x_t = alpha x0 + sigma eps. The network sees
  `denoiser.network_input` and regresses `denoiser.target` of `prediction`, weighted by
  `loss_weight`: for edm `simple` is EDM's loss, lambda(s) ||D - x0||^2 with lambda =
  1 / c_out^2. Labels are replaced by `null_label` with probability `label_dropout`. `key` is one
  key, or one key per example (B, 2): then example i's noise level, noise and label dropout are
  those of a batch of one drawn from key[i], and the network still runs on the whole batch.

  `learned_range` (the vp process in discrete time) makes this improved DDPM's hybrid loss
  L_simple + lambda L_vlb, lambda = `vlb_weight` (1e-3 in the paper), with the mean's gradient
  stopped in L_vlb. L_vlb = sum_t L_t is the whole bound, whose unbiased one-sample estimate at
  uniform t is T L_t, so the added term is vlb_weight * T * L_t (L_t in bits/dim, as `vlb`
  returns it). This is the reference code's `vb * num_timesteps / 1000`; lambda L_t alone would
  make the VLB weight T times too small.
  """
  _check("prediction", prediction, denoiser.PARAMETERISATIONS)
  _check("variance", variance, VARIANCES)
  if variance == "learned_range" and (time != "discrete" or process.name != "vp"):
    raise ValueError(
      "learned_range variances need the vp process in discrete time: set "
      "continuous_time=False or variance='fixed_small'."
    )
  _check("weighting", weighting, WEIGHTINGS)
  nd, c = x0.ndim, x0.shape[-1]
  if per_example_keys(key):  # example i draws from key[i] alone, as if it were a batch of one
    if t_sampling != "uniform":
      raise ValueError(f"per-example keys need t_sampling='uniform', not {t_sampling!r}.")

    def draw(k, label):
      k_t, k_noise, k_drop = jax.random.split(k, 3)
      lv = noise_levels(process, k_t, 1, time=time)
      noise = jax.random.normal(k_noise, (1, *x0.shape[1:]), x0.dtype)[0]
      kept = None if label is None else drop_labels(k_drop, label[None], label_dropout, null_label)
      return jax.tree.map(lambda v: v[0], (lv, kept)), noise

    (lv, labels), noise = jax.vmap(draw)(key, labels)
  else:
    k_t, k_noise, k_drop = jax.random.split(key, 3)
    lv = noise_levels(process, k_t, x0.shape[0], time=time, t_sampling=t_sampling)
    noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
    labels = drop_labels(k_drop, labels, label_dropout, null_label)
  alpha, sigma = G.extract_t(lv.alpha, nd), G.extract_t(lv.sigma, nd)
  x_t = alpha * x0 + sigma * noise
  inp = denoiser.network_input(prediction, x_t, alpha, sigma / alpha, sigma_data)
  out = model_fn(inp, lv.cond, labels)
  tgt = denoiser.target(
    prediction, x0=x0, eps=noise, alpha=alpha, sigma=sigma, sigma_data=sigma_data
  )
  mse = mean_flat((out[..., :c] - tgt) ** 2)
  weight = loss_weight(
    weighting,
    prediction,
    alpha=lv.alpha,
    sigma=lv.sigma,
    sigma_data=sigma_data,
    gamma=min_snr_gamma,
  )
  total, vlb = weight * mse, jnp.zeros_like(mse)
  if variance == "learned_range":
    schedule = process.schedule
    frozen = jnp.concatenate([jax.lax.stop_gradient(out[..., :c]), out[..., c:]], axis=-1)
    mean, logvar, _ = p_mean_logvar(
      schedule, frozen, x_t, lv.t, prediction=prediction, variance=variance
    )
    vlb = vlb_term(schedule, x0, x_t, lv.t, mean, logvar)
    total = total + vlb_weight * schedule.num_timesteps * vlb  # lambda * (T L_t ~ L_vlb)
  return LossOutput(loss=total, mse=mse, vlb=vlb, log_snr=lv.log_snr)


def _vlb_at(model_fn, schedule, x0, t, key, labels, *, prediction, variance, time_input, clip_x0):
  noise = jax.random.normal(key, x0.shape, x0.dtype)
  x_t = G.q_sample(schedule, x0, t, noise)
  out = model_fn(x_t, model_time(schedule, t, time_input), labels)
  mean, logvar, _ = p_mean_logvar(
    schedule, out, x_t, t, prediction=prediction, variance=variance, clip_x0=clip_x0
  )
  return vlb_term(schedule, x0, x_t, t, mean, logvar)


def bits_per_dim(
  model_fn: ModelFn,
  schedule: Schedule,
  x0: jax.Array,
  key: jax.Array,
  *,
  labels: jax.Array | None = None,
  prediction: str = "eps",
  variance: str = "fixed_small",
  time_input: str = "t",
  clip_x0: bool = False,
) -> dict[str, jax.Array]:
  """The full variational bound in bits/dim, summing all T terms (T network evaluations).

  x0: (B, H, W, C) 8-bit data scaled to [-1, 1]. Each L_t uses its own x_t ~ q(x_t | x_0).
  Returns {"total": (B,), "prior": (B,), "terms": (T, B)} with terms[0] the decoder NLL.
  """
  batch, n = x0.shape[0], schedule.num_timesteps
  kw = dict(prediction=prediction, variance=variance, time_input=time_input, clip_x0=clip_x0)

  def body(_, t):
    tb = jnp.full((batch,), t, jnp.int32)
    return None, _vlb_at(model_fn, schedule, x0, tb, jax.random.fold_in(key, t), labels, **kw)

  _, terms = jax.lax.scan(body, None, jnp.arange(n))
  prior = prior_bpd(schedule, x0)
  return {"total": terms.sum(0) + prior, "prior": prior, "terms": terms}


def bits_per_dim_estimate(
  model_fn: ModelFn,
  schedule: Schedule,
  x0: jax.Array,
  key: jax.Array,
  *,
  labels: jax.Array | None = None,
  prediction: str = "eps",
  variance: str = "fixed_small",
  time_input: str = "t",
  clip_x0: bool = False,
) -> jax.Array:
  """Unbiased one-sample estimate of `bits_per_dim(...)["total"]`: T L_t at uniform t, + prior.

  One network evaluation; arguments as for `bits_per_dim`. Returns (B,).
  """
  k_t, k_noise = jax.random.split(key)
  t = sample_t(k_t, x0.shape[0], schedule.num_timesteps)
  kw = dict(prediction=prediction, variance=variance, time_input=time_input, clip_x0=clip_x0)
  term = _vlb_at(model_fn, schedule, x0, t, k_noise, labels, **kw)
  return schedule.num_timesteps * term + prior_bpd(schedule, x0)


def _log_edges(length: int, k: int) -> list[int]:
  """k + 1 strictly increasing integers from 0 to `length` (>= k), gaps growing geometrically."""
  edges = [0]
  for j in range(1, k + 1):
    edges.append(max(edges[-1] + 1, min(round((length + 1) ** (j / k)) - 1, length - k + j)))
  return edges


def strata_edges(num_timesteps: int, strata: int) -> list[int]:
  """strata + 1 edges e_0 = 1 < ... < e_strata = T of the ranges [e_k, e_{k+1}) of t that
  `bits_per_dim_stratified` draws from: half the ranges log-spaced up from t = 1, half down from
  t = T - 1 (single steps at both ends, where L_t is largest and changes fastest)."""
  steps, low = num_timesteps - 1, (strata + 1) // 2
  if not 1 <= strata <= steps:
    raise ValueError(
      f"strata must be in [1, {steps}] (T - 1 for T = {num_timesteps}), got {strata}."
    )
  split = round(steps * low / strata)  # steps in the lower half
  lower = [1 + e for e in _log_edges(split, low)]
  upper = [num_timesteps - e for e in reversed(_log_edges(steps - split, strata - low))]
  return lower + upper[1:]


def bits_per_dim_stratified(
  model_fn: ModelFn,
  schedule: Schedule,
  x0: jax.Array,
  key: jax.Array,
  *,
  strata: int,
  labels: jax.Array | None = None,
  prediction: str = "eps",
  variance: str = "fixed_small",
  time_input: str = "t",
  clip_x0: bool = False,
) -> dict[str, jax.Array]:
  """Unbiased estimate of `bits_per_dim(...)["total"]` from strata + 1 network evaluations.

  The prior and the decoder L_0 are exact; sum_{t=1}^{T-1} L_t is stratified: t = 1..T-1 cut into
  `strata` contiguous ranges of n_k steps (`strata_edges`), one t drawn uniformly in each range
  per image, contributing n_k L_t (expectation: the range's sum). strata = T - 1 evaluates every
  term once, as `bits_per_dim` does. x0: (B, H, W, C) in [-1, 1]; other arguments as for
  `bits_per_dim`. Returns {"total": (B,), "prior": (B,), "decoder": (B,)}.
  """
  edges = strata_edges(schedule.num_timesteps, strata)
  lo = jnp.asarray(edges[:-1], jnp.int32)
  size = jnp.asarray([b - a for a, b in zip(edges[:-1], edges[1:], strict=True)], jnp.int32)
  batch = x0.shape[0]
  kw = dict(prediction=prediction, variance=variance, time_input=time_input, clip_x0=clip_x0)

  def body(_, k):
    k_t, k_noise = jax.random.split(jax.random.fold_in(key, k))
    t = lo[k] + jax.random.randint(k_t, (batch,), 0, size[k])
    return None, size[k] * _vlb_at(model_fn, schedule, x0, t, k_noise, labels, **kw)

  _, terms = jax.lax.scan(body, None, jnp.arange(strata))
  t0 = jnp.zeros((batch,), jnp.int32)
  decoder = _vlb_at(model_fn, schedule, x0, t0, jax.random.fold_in(key, strata), labels, **kw)
  prior = prior_bpd(schedule, x0)
  return {"total": terms.sum(0) + decoder + prior, "prior": prior, "decoder": decoder}
