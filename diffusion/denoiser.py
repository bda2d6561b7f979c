"""Every parameterisation as one denoiser D(x~; s) ~ E[x_0 | x~], with x~ = x_t / alpha and
s = sigma / alpha (pure functions; the network is any `ModelFn`).

Parameterisations (config.diffusion.prediction): what the network F outputs, and its target.
| eps  | eps                                       | any process                          |
| x0   | x_0                                       | any process                          |
| v    | alpha eps - sigma x_0 (Salimans & Ho 2022) | alpha^2 + sigma^2 = 1 (vp, cosine)   |
| flow | d x_t / dt = eps - x_0, the linear path's velocity (Lipman et al. 2023) | flow only |
| edm  | the preconditioned F of Karras et al. (2022), Table 1: D = c_skip x~ + c_out F(c_in x~;
|      | c_noise), c_skip = sd^2/(s^2 + sd^2), c_out = s sd / sqrt(s^2 + sd^2),
|      | c_in = 1 / sqrt(s^2 + sd^2), c_noise = ln(s) / 4, sd = sigma_data;
|      | target (x_0 - c_skip x~) / c_out | any process |
Networks of the continuous processes are conditioned on c_noise = ln(s) / 4 (all of them;
a function of the noise level alone, so every sampler can drive every model). The edm network
sees c_in x~; the others see x_t.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from diffusion import gaussian as G

PARAMETERISATIONS = ("eps", "x0", "v", "flow", "edm")
X0_CLIPS = ("none", "clip", "dynamic")
# D(x~, s): (x~ (B, H, W, C), s: scalar > 0 in x~'s dtype) -> x0_hat (B, H, W, C), an estimate
# of E[x0 | x~]; the solvers in solvers.py see a model only through it. A model with learned
# variances gives `solvers`' ddpm_learned_range (B, H, W, 2C): x0_hat, then its v in [-1, 1].
Denoiser = Callable[[jax.Array, jax.Array], jax.Array]


def check(prediction: str, process: str) -> None:
  """ValueError unless `prediction` is defined on `process`."""
  if prediction not in PARAMETERISATIONS:
    raise ValueError(
      f"unknown config.diffusion.prediction {prediction!r}; known: {', '.join(PARAMETERISATIONS)}."
    )
  if prediction == "v" and process not in ("vp", "cosine"):
    raise ValueError(
      f"v-prediction needs alpha^2 + sigma^2 = 1 (process vp or cosine), not "
      f"{process!r}; use prediction eps, x0 or edm."
    )
  if prediction == "flow" and process != "flow":
    raise ValueError(
      f"prediction 'flow' is the velocity of the linear path: set "
      f"config.diffusion.process='flow' (got {process!r})."
    )


class Precond(NamedTuple):
  c_skip: jax.Array
  c_out: jax.Array
  c_in: jax.Array
  c_noise: jax.Array


def edm_precond(s: jax.Array, sigma_data: float) -> Precond:
  """EDM's preconditioning (Karras et al. 2022, Table 1) at noise level s (any shape)."""
  total = s**2 + sigma_data**2
  return Precond(
    sigma_data**2 / total,
    s * sigma_data * jax.lax.rsqrt(total),
    jax.lax.rsqrt(total),
    jnp.log(s) / 4.0,
  )


def edm_loss_weight(s: jax.Array, sigma_data: float) -> jax.Array:
  """lambda(s) = (s^2 + sd^2) / (s sd)^2, EDM's weight on ||D - x_0||^2 (= 1 / c_out^2)."""
  return (s**2 + sigma_data**2) / (s * sigma_data) ** 2


def c_noise(s: jax.Array) -> jax.Array:
  """The network's conditioning for a continuous process: ln(s) / 4."""
  return jnp.log(s) / 4.0


def network_input(
  prediction: str, x_t: jax.Array, alpha: jax.Array, s: jax.Array, sigma_data: float
) -> jax.Array:
  """What the network sees: c_in x~ for edm, x_t otherwise."""
  if prediction == "edm":
    return edm_precond(s, sigma_data).c_in * (x_t / alpha)
  return x_t


def target(
  prediction: str,
  *,
  x0: jax.Array,
  eps: jax.Array,
  alpha: jax.Array,
  sigma: jax.Array,
  sigma_data: float,
) -> jax.Array:
  """The regression target of F for x_t = alpha x0 + sigma eps."""
  if prediction == "edm":
    s = sigma / alpha
    p = edm_precond(s, sigma_data)
    return (x0 - p.c_skip * (x0 + s * eps)) / p.c_out
  if prediction == "flow":
    return eps - x0
  return G.prediction_target(prediction, x0, eps, alpha, sigma)


def to_x0(
  prediction: str,
  out: jax.Array,
  *,
  x_t: jax.Array,
  alpha: jax.Array,
  sigma: jax.Array,
  sigma_data: float,
) -> jax.Array:
  """x_0 from the network output `out` at x_t (the inverse of `target`)."""
  if prediction == "edm":
    s = sigma / alpha
    p = edm_precond(s, sigma_data)
    return p.c_skip * (x_t / alpha) + p.c_out * out
  if prediction == "flow":
    return x_t - sigma * out  # x_t = (1 - t) x0 + t eps, out = eps - x0, sigma = t
  if prediction == "eps":
    return G.x0_from_eps(x_t, out, alpha=alpha, sigma=sigma)
  if prediction == "x0":
    return out
  return G.x0_from_v(x_t, out, alpha=alpha, sigma=sigma)


def x0_error_scale(
  prediction: str, alpha: jax.Array, sigma: jax.Array, sigma_data: float
) -> jax.Array:
  """d x0_hat / d F = k: an x0-space loss weight w becomes w k^2 on F's error."""
  if prediction == "edm":
    return edm_precond(sigma / alpha, sigma_data).c_out
  return {"eps": -sigma / alpha, "x0": jnp.ones_like(sigma), "v": -sigma, "flow": -sigma}[
    prediction
  ]


def clip_x0(x0: jax.Array, mode: str, percentile: float = 0.995) -> jax.Array:
  """`clip` to [-1, 1], or `dynamic` thresholding (Imagen: s = max(1, percentile of |x0|),
  x0 <- clip(x0, -s, s) / s per image); `none` leaves x0 as it is."""
  if mode not in X0_CLIPS:
    raise ValueError(f"unknown clip_x0 {mode!r}; known: {', '.join(X0_CLIPS)}.")
  if mode == "clip":
    return jnp.clip(x0, -1.0, 1.0)
  if mode == "dynamic":
    b = x0.shape[0]
    s = jnp.quantile(jnp.abs(x0).reshape(b, -1), percentile, axis=1)
    s = jnp.maximum(s, 1.0).reshape((b,) + (1,) * (x0.ndim - 1))
    return jnp.clip(x0, -s, s) / s
  return x0


def guided(
  model_fn,
  x: jax.Array,
  cond: jax.Array,
  labels: jax.Array | None,
  *,
  scale: jax.Array | float,
  null_label: int,
  channels: int,
) -> jax.Array:
  """Classifier-free guidance: out_u + scale (out_c - out_u) on the first `channels` outputs (one
  network call on the doubled batch; other channels from out_c). Plain call without labels."""
  if labels is None:
    return model_fn(x, cond, labels)
  both = model_fn(
    jnp.concatenate([x, x]),
    jnp.concatenate([cond, cond]),
    jnp.concatenate([labels, jnp.full_like(labels, null_label)]),
  )
  b, c = x.shape[0], channels
  out_c, out_u = both[:b], both[b:]
  mixed = out_u[..., :c] + scale * (out_c[..., :c] - out_u[..., :c])
  return jnp.concatenate([mixed, out_c[..., c:]], axis=-1)


def guidance_scale_at(s: jax.Array, scale: float, interval: tuple[float, float]) -> jax.Array:
  """Guidance limited to noise levels s in [lo, hi] (Kynkäänniemi et al. 2024); 1 (the plain
  conditional model) outside."""
  lo, hi = interval
  return jnp.where((s >= lo) & (s <= hi), scale, 1.0)
