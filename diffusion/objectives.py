"""Few-step objectives beside the denoising loss: MeanFlow and consistency distillation. Pure
functions of arrays and callables; they know no network, schedule table or config.

MeanFlow (Geng et al. 2025), on the flow process z_t = (1 - t) x0 + t eps (t = 1 is noise) with
the conditional velocity v = eps - x0. The average velocity over [r, t],

    u(z_t, r, t) = 1 / (t - r) int_r^t v(z_s, s) ds,   so that   z_r = z_t - (t - r) u(z_t, r, t),

moves a state from t to r in one step (u(z, t, t) is the instantaneous velocity). Differentiating
(t - r) u = int_r^t v in t gives the MeanFlow identity u = v - (t - r) du/dt, where the total
derivative along the trajectory is du/dt = v . d_z u + d_t u: the JVP of u in (z, r, t) with
tangents (v, 0, 1). The network is regressed on the stopped target

    u_tgt = sg(v - (t - r) du_theta/dt),   loss = ||u_theta - u_tgt||^2 / sg(||.||^2 + c)^p

(adaptive weighting, p = 1 and c = 1e-3 in the paper). (r, t) are two draws of the process's
t distribution sorted, with r set to t for a fraction 1 - ratio of the batch (plain flow
matching there). Classifier-free guidance is folded into the target: for labelled examples v is
replaced by v_g = w v + (1 - w) u_theta(z_t, t, t | null) (stopped), so one step samples the
guided flow. Networks see the times as (TIME_SCALE t, TIME_SCALE (t - r)).

Consistency models (Song et al. 2023), in the noise-level coordinates of solvers.py
(x~ = x0 + s eps, denoiser D(x~, s) ~ E[x0 | x~]): the consistency function maps every point of a
probability-flow trajectory to its end at s_min. It is parameterised through the model's own
denoiser as

    f(x~, s) = D(x~, s) + c_skip(s) (x~ - D(x~, s)),   c_skip(s) = sd^2 / ((s - s_min)^2 + sd^2),

so f(x~, s_min) = x~ exactly (the boundary condition) and a student initialised from the teacher
starts at f ~ D away from s_min. Distillation (CD): for adjacent levels s_n < s_{n+1} of a
Karras grid, x~_{n+1} = x0 + s_{n+1} z, the teacher's ODE step gives x~_n, and the loss is
||f_student(x~_{n+1}, s_{n+1}) - sg(f_target(x~_n, s_n))||^2 with an EMA target network.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

OBJECTIVES = ("denoising", "meanflow", "consistency")
TEACHER_SOLVERS = ("heun", "dpm_solver++", "euler")
TIME_SCALE = 1.0  # networks see (t, t - r) in [0, 1] (1000 makes d/dt u 1000x larger)

# (z (B, ...), r (B,), t (B,)) -> u (B, ...), the average velocity over [r, t].
AverageVelocity = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
# (x~ (B, ...), s (B,) > 0) -> x0 estimate (B, ...): a denoiser with per-example noise levels.
BatchDenoiser = Callable[[jax.Array, jax.Array], jax.Array]


def _col(a: jax.Array, like: jax.Array) -> jax.Array:
  """(B,) -> (B, 1, ..., 1) to broadcast against `like`; scalars unchanged."""
  a = jnp.asarray(a)
  return a.reshape(a.shape + (1,) * (like.ndim - a.ndim)) if a.ndim else a


def _sum_sq(a: jax.Array) -> jax.Array:
  return jnp.sum(jnp.square(a), axis=tuple(range(1, a.ndim)))


# ---- MeanFlow -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MeanFlowSettings:
  """config.diffusion.meanflow_*: the (r, t) sampling, adaptive weighting and folded guidance."""

  ratio: float = 0.25  # fraction of examples with r < t (the rest: r = t)
  norm_p: float = 1.0  # adaptive weight 1 / (||delta||^2 + norm_c)^norm_p (0 = plain L2)
  norm_c: float = 1e-3
  guidance: float = 1.0  # w of the folded classifier-free guidance (1 = none)
  time_scale: float = TIME_SCALE  # networks see (time_scale t, time_scale (t - r))

  def __post_init__(self):
    if not 0.0 <= self.ratio <= 1.0:
      raise ValueError(f"config.diffusion.meanflow_ratio must lie in [0, 1], got {self.ratio}.")
    if not self.time_scale > 0:
      raise ValueError(f"config.diffusion.meanflow_time_scale must be > 0, got {self.time_scale}.")
    if self.norm_p < 0 or self.norm_c <= 0:
      raise ValueError(
        f"need config.diffusion.meanflow_norm_p >= 0 and meanflow_norm_c > 0, got "
        f"{self.norm_p}, {self.norm_c}."
      )
    if self.guidance < 1.0:
      raise ValueError(f"config.diffusion.meanflow_guidance must be >= 1, got {self.guidance}.")


def sample_times(
  key: jax.Array,
  batch: int,
  ratio: float,
  *,
  logit_normal: bool = False,
  logit_mean: float = 0.0,
  logit_std: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
  """(r, t), each (batch,) float32 in [0, 1] with r <= t: two draws (uniform or logit-normal)
  sorted, and r = t except for a random fraction `ratio` of the examples."""
  k_t, k_keep = jax.random.split(key)
  if logit_normal:
    a = jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(k_t, (2, batch)))
  else:
    a = jax.random.uniform(k_t, (2, batch))
  t, r = jnp.max(a, axis=0), jnp.min(a, axis=0)
  return jnp.where(jax.random.uniform(k_keep, (batch,)) < ratio, r, t), t


def meanflow_target(
  u_fn: AverageVelocity, z: jax.Array, r: jax.Array, t: jax.Array, v: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """(u_theta(z, r, t), sg(v - (t - r) du_theta/dt)), the total derivative by one JVP with
  tangents (v, 0, 1) on (z, r, t). z, v (B, ...); r, t (B,)."""
  u, du_dt = jax.jvp(u_fn, (z, r, t), (v, jnp.zeros_like(r), jnp.ones_like(t)))
  return u, jax.lax.stop_gradient(v - _col(t - r, v) * du_dt)


def meanflow_loss(
  u_fn: AverageVelocity,
  x0: jax.Array,
  eps: jax.Array,
  r: jax.Array,
  t: jax.Array,
  *,
  norm_p: float = 1.0,
  norm_c: float = 1e-3,
  v: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Per-example (weighted loss, mean squared error), each (B,), at z_t = (1 - t) x0 + t eps.
  `v`: the velocity in the target (default eps - x0; the guided v_g with folded guidance)."""
  z = _col(1.0 - t, x0) * x0 + _col(t, x0) * eps
  v = eps - x0 if v is None else v
  u, target = meanflow_target(u_fn, z, r, t, v)
  sq = _sum_sq(u - target)
  weight = jax.lax.stop_gradient(1.0 / (sq + norm_c) ** norm_p)
  return weight * sq, sq / np.prod(x0.shape[1:])


def meanflow_batch_loss(
  u_fn: Callable[[jax.Array, jax.Array, jax.Array, jax.Array | None], jax.Array],
  x0: jax.Array,
  key: jax.Array,
  settings: MeanFlowSettings,
  *,
  labels: jax.Array | None = None,
  label_dropout: float = 0.0,
  null_label: int = 0,
  logit_normal: bool = False,
  logit_mean: float = 0.0,
  logit_std: float = 1.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """MeanFlow's training loss of a batch x0 (B, H, W, C): draws (r, t), eps and label dropout
  from `key`; u_fn(z, r, t, labels) -> u. Returns (loss, mse, t), each (B,)."""
  k_t, k_eps, k_drop = jax.random.split(key, 3)
  b = x0.shape[0]
  r, t = sample_times(
    k_t, b, settings.ratio, logit_normal=logit_normal, logit_mean=logit_mean, logit_std=logit_std
  )
  eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
  v = eps - x0
  if labels is not None:
    dropped = jax.random.uniform(k_drop, (b,)) < label_dropout
    if settings.guidance != 1.0:  # v_g = w v + (1 - w) u(z_t, t, t | null) for kept labels
      z = _col(1.0 - t, x0) * x0 + _col(t, x0) * eps
      u_null = jax.lax.stop_gradient(u_fn(z, t, t, jnp.full_like(labels, null_label)))
      w = settings.guidance
      v = jnp.where(_col(dropped, v), v, w * v + (1.0 - w) * u_null)
    labels = jnp.where(dropped, null_label, labels)
  loss, mse = meanflow_loss(
    lambda z, r_, t_: u_fn(z, r_, t_, labels),
    x0,
    eps,
    r,
    t,
    norm_p=settings.norm_p,
    norm_c=settings.norm_c,
    v=v,
  )
  return loss, mse, t


def meanflow_step(u_fn: AverageVelocity, z: jax.Array, t: jax.Array, r: jax.Array) -> jax.Array:
  """z_r = z_t - (t - r) u(z_t, r, t); t, r scalars or (B,)."""
  b = z.shape[0]
  t, r = jnp.broadcast_to(t, (b,)), jnp.broadcast_to(r, (b,))
  return z - _col(t - r, z) * u_fn(z, r, t)


def meanflow_sample(u_fn: AverageVelocity, noise: jax.Array, num_steps: int) -> jax.Array:
  """num_steps MeanFlow steps from z_1 = noise over t_i = 1 - i / num_steps; returns z_0."""
  z = noise
  for i in range(num_steps):
    z = meanflow_step(u_fn, z, 1.0 - i / num_steps, 1.0 - (i + 1) / num_steps)
  return z


# ---- consistency models -------------------------------------------------------------------------


def c_skip(s: jax.Array, sigma_min: float, sigma_data: float) -> jax.Array:
  """sd^2 / ((s - s_min)^2 + sd^2): 1 at s_min, -> 0 for s >> sd (Song et al. 2023, App. C)."""
  return sigma_data**2 / ((s - sigma_min) ** 2 + sigma_data**2)


def consistency_fn(denoise: BatchDenoiser, sigma_min: float, sigma_data: float) -> BatchDenoiser:
  """f(x~, s) = D + c_skip(s) (x~ - D): the consistency function parameterised by denoiser D;
  s scalar or (B,)."""

  def f(x: jax.Array, s: jax.Array) -> jax.Array:
    d = denoise(x, s)
    return d + _col(c_skip(s, sigma_min, sigma_data), x) * (x - d)

  return f


def teacher_step(
  denoise: BatchDenoiser, x: jax.Array, s: jax.Array, s_next: jax.Array, solver: str = "heun"
) -> jax.Array:
  """One probability-flow ODE step dx~/ds = (x~ - D) / s from s to s_next > 0 (per example,
  (B,) or scalars). heun: EDM's 2nd-order step; dpm_solver++: DPM-Solver++(2S) with its
  intermediate level at the log-midpoint sqrt(s s_next) (Lu et al. 2022, r = 1/2):
  x~_m = D + (s_m / s)(x~ - D), then x~' = D_m + (s' / s)(x~ - D_m); euler: DDIM. 2, 2, 1
  evaluations."""
  c = lambda a: _col(a, x)
  d = denoise(x, s)
  if solver == "euler":
    return d + c(s_next / s) * (x - d)
  if solver == "heun":
    slope = (x - d) / c(s)
    x_e = x + c(s_next - s) * slope
    slope_e = (x_e - denoise(x_e, s_next)) / c(s_next)
    return x + c(s_next - s) * 0.5 * (slope + slope_e)
  if solver == "dpm_solver++":
    s_mid = jnp.sqrt(s * s_next)
    d_mid = denoise(d + c(s_mid / s) * (x - d), s_mid)
    return d_mid + c(s_next / s) * (x - d_mid)
  raise ValueError(
    f"unknown config.distill.solver {solver!r}; known: {', '.join(TEACHER_SOLVERS)}."
  )


def cd_levels(num_scales: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
  """The N = num_scales increasing Karras levels s_1 = sigma_min < ... < s_N = sigma_max of
  consistency distillation (EDM eq. 5; float64)."""
  if num_scales < 2:
    raise ValueError(f"config.distill.num_scales must be >= 2, got {num_scales}.")
  i = np.arange(num_scales, dtype=np.float64) / (num_scales - 1)
  lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
  s = (lo + i * (hi - lo)) ** rho
  s[0], s[-1] = sigma_min, sigma_max
  return s


def cd_loss(
  student: BatchDenoiser,
  target: BatchDenoiser,
  teacher: BatchDenoiser,
  x0: jax.Array,
  key: jax.Array,
  levels: jax.Array,
  *,
  solver: str = "heun",
  teacher_step_fn: Callable[..., jax.Array] | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Consistency-distillation loss per example: (loss (B,), s_{n+1} (B,)).

  student, target: consistency functions (`consistency_fn`); teacher: a denoiser; levels: the
  increasing (N,) `cd_levels`. n ~ U{0..N-2}, x~_{n+1} = x0 + s_{n+1} z, x~_n = the teacher's
  `solver` step (or `teacher_step_fn(x, s, s_next)`), loss = mean over pixels of
  (f_student(x~_{n+1}, s_{n+1}) - sg(f_target(x~_n, s_n)))^2."""
  k_n, k_z = jax.random.split(key)
  levels = jnp.asarray(levels, x0.dtype)
  n = jax.random.randint(k_n, (x0.shape[0],), 0, levels.shape[0] - 1)
  s_lo, s_hi = levels[n], levels[n + 1]
  x_hi = x0 + _col(s_hi, x0) * jax.random.normal(k_z, x0.shape, x0.dtype)
  if teacher_step_fn is None:
    x_lo = teacher_step(teacher, x_hi, s_hi, s_lo, solver)
  else:
    x_lo = teacher_step_fn(x_hi, s_hi, s_lo)
  want = jax.lax.stop_gradient(target(jax.lax.stop_gradient(x_lo), s_lo))
  return _sum_sq(student(x_hi, s_hi) - want) / np.prod(x0.shape[1:]), s_hi


# ---- settings -----------------------------------------------------------------------------------


def check_meanflow(process: str, prediction: str, attention_impl: str) -> None:
  """ValueError (cause and fix) unless MeanFlow can train on these config values."""
  if process != "flow" or prediction != "flow":
    raise ValueError(
      f"config.diffusion.objective=meanflow learns velocities of the flow process, got process "
      f"{process!r} and prediction {prediction!r}: set config.diffusion.process=flow and "
      "prediction=flow."
    )
  if attention_impl == "cudnn":
    raise ValueError(
      "MeanFlow differentiates the network forward (jax.jvp) and the cudnn attention kernel has "
      "no JVP: set config.model.attention_impl='' or 'xla'."
    )


@dataclasses.dataclass(frozen=True)
class DistillSettings:
  """config.distill's training fields (the teacher's workdir is read by --mode distill)."""

  num_scales: int = 18  # N Karras levels between sigma_min and sigma_max (CM: 18 on CIFAR-10)
  solver: str = "heun"  # the teacher's step between adjacent levels: TEACHER_SOLVERS
  target_ema: float = 0.95  # mu of the target network's EMA (CM's CD)

  def __post_init__(self):
    if self.solver not in TEACHER_SOLVERS:
      raise ValueError(
        f"unknown config.distill.solver {self.solver!r}; known: {', '.join(TEACHER_SOLVERS)}."
      )
    if int(self.num_scales) != self.num_scales or self.num_scales < 2:
      raise ValueError(f"config.distill.num_scales must be an integer >= 2, got {self.num_scales}.")
    if not 0.0 <= self.target_ema < 1.0:
      raise ValueError(f"config.distill.target_ema must lie in [0, 1), got {self.target_ema}.")
