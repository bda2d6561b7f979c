"""Samplers in sigma space: one continuous-time API for VP, VE, EDM and flow matching.

With x_t = alpha_t x0 + sigma_t eps, the scaled state x~ = x_t / alpha_t = x0 + s eps has the
noise level s = sigma_t / alpha_t: in these coordinates every process is the VE process (VP:
s = sqrt(1 - abar) / sqrt(abar); flow matching x_t = (1 - t) x0 + t eps: s = t / (1 - t); EDM
and VE: s = sigma). Every process and parameterisation is turned (elsewhere) into one denoiser
D(x~; s) ~ E[x0 | x~]; this module knows only D. Its probability-flow ODE is
dx~/ds = (x~ - D(x~; s)) / s (Karras et al. 2022, eqs. 1 and 3 with sigma(t) = t).

`sample(name, denoise, x_T, sigmas, key)` runs solver `name` over a decreasing grid
s_0 > s_1 > ... > s_N = 0 (`karras_sigmas`, `grid`, or `timestep_grid`: a discrete schedule's
integer timesteps t as s_t = sqrt((1 - abar_t) / abar_t)) by one `lax.scan`, step i going from
s_i to s_{i+1}, and returns x0 (B, H, W, C). It is pure and traceable, and the grid is an array
input, so `jax.jit(lambda params, x, key, sigmas: sample(...))` compiles once per (shape, number of
steps) whatever sigma_min, sigma_max or rho. The caller draws x_T ~ N(0, s_0^2 I), already
scaled (EDM's prior; a VP model's N(0, I) divided by alpha_T has variance 1 + s_0^2, the same
for s_0 >> 1). The denoiser is never called at s = 0.

| solver             | method                             | NFE    | options |
| euler              | Euler on the ODE (= DDIM, eta = 0) | N      |
| ddim               | Song et al. eq. 12 in (x~, s)      | N      | eta |
| heun               | EDM Algorithm 1                    | 2N - 1 |
| edm                | EDM Algorithm 2 (churn + Heun) | 2N - 1 | S_churn, S_tmin, S_tmax, S_noise |
| dpm_solver++       | DPM-Solver++(2M), data prediction  | N      |
| ddpm               | ancestral: q(x~' | x~, x0 = D)     | N      | variance |
| ddpm_learned_range | ancestral on integer t, learned v  | N      | schedule, timesteps |

Only `ddpm_learned_range` needs integer timesteps: its variance interpolates between two
variances of the schedule's table (`gaussian.p_mean_logvar`), which no noise level alone gives.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion import gaussian
from diffusion.denoiser import Denoiser
from diffusion.schedules import Schedule

SPACINGS = ("uniform", "leading", "trailing", "quadratic", "logsnr")  # integer timesteps

# DPM-Solver++(2M) takes a first-order step where r = h_prev / h < this (see `_dpm_solver_pp_2m`).
MIN_STEP_RATIO = 0.5


# ---- sigma grids (float64 NumPy, decreasing, ending with 0) ------------------------------------


def _check_range(num_steps: int, sigma_min: float, sigma_max: float) -> None:
  if isinstance(num_steps, bool) or int(num_steps) != num_steps or num_steps < 1:
    raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}.")
  if not (math.isfinite(sigma_min) and math.isfinite(sigma_max) and 0 < sigma_min < sigma_max):
    raise ValueError(
      f"need 0 < sigma_min < sigma_max (finite), got sigma_min={sigma_min!r}, "
      f"sigma_max={sigma_max!r}."
    )


def karras_sigmas(
  num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0
) -> np.ndarray:
  """EDM eq. 5: s_i = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho, i < N,
  and s_N = 0. Float64, shape (N + 1,), from sigma_max down to sigma_min, then 0.

  rho = 7 (EDM) shortens the steps near sigma_min; rho = 1 is uniform in s, rho -> inf uniform
  in log s. N = 1 gives [sigma_max, 0]. EDM uses (0.002, 80) with N = 18 on CIFAR-10.
  """
  _check_range(num_steps, sigma_min, sigma_max)
  if not rho > 0:
    raise ValueError(f"rho must be > 0, got {rho!r}.")
  n = int(num_steps)
  ramp = np.arange(n, dtype=np.float64) / max(n - 1, 1)
  hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
  s = (hi + ramp * (lo - hi)) ** rho
  s[0], s[-1] = sigma_max, (sigma_min if n > 1 else sigma_max)  # ends exact, not rounded
  return np.append(s, 0.0)


def log_sigmas(num_steps: int, sigma_min: float, sigma_max: float) -> np.ndarray:
  """N levels uniform in log s (uniform in log-SNR, as DPM-Solver recommends) from sigma_max to
  sigma_min, then 0. Float64, shape (N + 1,); N = 1 gives [sigma_max, 0]."""
  _check_range(num_steps, sigma_min, sigma_max)
  n = int(num_steps)
  s = np.exp(np.linspace(np.log(sigma_max), np.log(sigma_min), n)) if n > 1 else [sigma_max]
  s = np.asarray(s, np.float64)
  s[0], s[-1] = sigma_max, (sigma_min if n > 1 else sigma_max)
  return np.append(s, 0.0)


GRIDS: dict[str, Callable[..., np.ndarray]] = {"karras": karras_sigmas, "log": log_sigmas}


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


def timestep_grid(schedule: Schedule, num_steps: int, spacing: str = "uniform") -> np.ndarray:
  """The sigma grid of `timesteps(schedule, num_steps, spacing)`: s_t = sqrt((1 - abar_t) /
  abar_t) at each chosen t, then 0. Float64, shape (num_steps + 1,), strictly decreasing.

  From the schedule's float32 table of s_t (`sqrt_recipm1_alphas_cumprod`, built in float64),
  widened: accurate to float32 rounding also near t = 0, where 1 - abar_t cancels."""
  ts = timesteps(schedule, num_steps, spacing)
  s = np.asarray(schedule.sqrt_recipm1_alphas_cumprod, np.float64)[ts]
  return np.append(s, 0.0)


def grid(name: str, num_steps: int, sigma_min: float, sigma_max: float, **kw: Any) -> np.ndarray:
  """The sigma grid `name` (`karras`, which takes rho, or `log`): float64, (num_steps + 1,),
  decreasing from sigma_max, ending with 0. Unknown names list the known ones."""
  if name not in GRIDS:
    raise ValueError(f"unknown sigma grid {name!r}; known grids: {', '.join(GRIDS)}.")
  return GRIDS[name](num_steps, sigma_min, sigma_max, **kw)


def check_sigmas(sigmas: np.ndarray) -> None:
  """Raises ValueError unless `sigmas` is 1-D, finite, of length >= 2, strictly decreasing and
  positive except for the last entry, which may be 0 (the clean data: the usual case)."""
  s = np.asarray(sigmas, np.float64)
  if s.ndim != 1 or s.shape[0] < 2:
    raise ValueError(f"sigmas must be 1-D with at least 2 entries, got shape {s.shape}.")
  bad = np.flatnonzero(~np.isfinite(s) | (s < 0) | np.append(s[:-1] == 0, False))
  if bad.size:
    raise ValueError(
      f"sigmas must be finite and positive (the last may be 0): sigmas[{bad[0]}] = {s[bad[0]]}."
    )
  up = np.flatnonzero(np.diff(s) >= 0)
  if up.size:
    i = up[0]
    raise ValueError(
      f"sigmas must be strictly decreasing: sigmas[{i + 1}] = {s[i + 1]} >= sigmas[{i}] = {s[i]}."
    )


# ---- solver steps ------------------------------------------------------------------------------


class Context(NamedTuple):
  denoise: Denoiser
  num_steps: int  # N, static: the grid has N + 1 entries
  options: dict[str, Any]  # the solver's options, defaults filled in


class Solver(NamedTuple):
  init: Callable[[jax.Array], dict]  # x_T -> carry (a dict with "x")
  # (ctx, carry, s, s_next, key) -> carry; s > s_next >= 0 scalars in x's dtype
  step: Callable[[Context, dict, jax.Array, jax.Array, jax.Array], dict]
  stochastic: Callable[[dict[str, Any]], bool]  # options -> whether the steps draw noise
  evaluations: Callable[[int], int]  # num_steps -> network evaluations per image
  options: dict[str, Any] = {}  # accepted keyword options and their defaults


def _x_only(x: jax.Array) -> dict:
  return {"x": x}


def _euler(ctx: Context, carry: dict, s, s_next, key) -> dict:
  """Euler on dx~/ds = (x~ - D) / s (EDM Algorithm 1 without the correction):
  x~_next = x~ + (s_next - s) (x~ - D) / s = D + (s_next / s) (x~ - D).

  This is DDIM with eta = 0 (Song et al. 2021, eq. 12): x_{t'} = alpha' x0 + sigma' eps_hat with
  eps_hat = (x_t - alpha x0) / sigma, divided by alpha', is x~' = x0 + s' (x~ - x0) / s. It is
  also DPM-Solver++(1), and in flow-matching coordinates Euler on the velocity eps_hat - x0.
  The last step (s_next = 0) returns D. One evaluation per step.
  """
  del key
  x = carry["x"]
  d = ctx.denoise(x, s)
  return {"x": x + (s_next - s) * ((x - d) / s)}


def _heun_step(denoise: Denoiser, x: jax.Array, s: jax.Array, s_next: jax.Array) -> jax.Array:
  """Heun's 2nd-order step from s to s_next (EDM Algorithm 1, lines 4-8); Euler when s_next = 0."""
  dx = (x - denoise(x, s)) / s
  euler = x + (s_next - s) * dx

  def correct(_):
    dx_next = (euler - denoise(euler, s_next)) / s_next
    return x + (s_next - s) * (0.5 * dx + 0.5 * dx_next)

  return jax.lax.cond(s_next > 0, correct, lambda _: euler, None)


def _heun(ctx: Context, carry: dict, s, s_next, key) -> dict:
  """EDM Algorithm 1: Heun's method on the probability-flow ODE, Euler on the last step to 0.
  2N - 1 evaluations for N steps."""
  del key
  return {"x": _heun_step(ctx.denoise, carry["x"], s, s_next)}


# EDM Algorithm 2 options. S_churn = 0 is deterministic Heun (EDM's choice for CIFAR-10 with its
# own models: 18 steps, 35 evaluations). EDM Table 5, stochastic sampling of the original
# CIFAR-10 models: VP S_churn=30, S_tmin=0.01, S_tmax=1, S_noise=1.007; VE S_churn=80,
# S_tmin=0.05, S_tmax=1, S_noise=1.007; ImageNet-64 (EDM model, 256 steps): S_churn=40,
# S_tmin=0.05, S_tmax=50, S_noise=1.003.
EDM_OPTIONS = {"S_churn": 0.0, "S_tmin": 0.0, "S_tmax": float("inf"), "S_noise": 1.0}


def _edm(ctx: Context, carry: dict, s, s_next, key) -> dict:
  """EDM Algorithm 2: gamma = min(S_churn / N, sqrt(2) - 1) where S_tmin <= s <= S_tmax (else
  0); s_hat = (1 + gamma) s; x~_hat = x~ + sqrt(s_hat^2 - s^2) S_noise z, z ~ N(0, I); then
  Heun from s_hat to s_next (Euler on the last step). 2N - 1 evaluations for N steps."""
  o, x = ctx.options, carry["x"]
  on = (o["S_tmin"] <= s) & (s <= o["S_tmax"])
  gamma = jnp.where(on, jnp.minimum(o["S_churn"] / ctx.num_steps, math.sqrt(2) - 1), 0.0)
  gamma = gamma.astype(x.dtype)
  s_hat = s * (1 + gamma)
  z = jax.random.normal(key, x.shape, x.dtype)
  x_hat = x + (s * jnp.sqrt(gamma * (2 + gamma)) * o["S_noise"]) * z  # sqrt(s_hat^2 - s^2)
  return {"x": _heun_step(ctx.denoise, x_hat, s_hat, s_next)}


def _dpm_init(x: jax.Array) -> dict:
  return {"x": x, "d_prev": jnp.zeros_like(x), "h_prev": jnp.zeros((), x.dtype)}


def _dpm_solver_pp_2m(ctx: Context, carry: dict, s, s_next, key) -> dict:
  """DPM-Solver++(2M) (Lu et al. 2022), data prediction, multistep in lambda = -log s.

  With alpha = 1 in these coordinates, h = lambda_next - lambda = log(s / s_next) and
  x~_next = (s_next / s) x~ - expm1(-h) D' = D' + (s_next / s) (x~ - D'), where
  D' = (1 + 1/(2r)) D - 1/(2r) D_prev, r = h_prev / h, except on the first-order steps (D' = D:
  DDIM, i.e. `_euler`): the first, the last (to s = 0, which returns D), and any with
  r < MIN_STEP_RATIO, where the multistep correction would extrapolate the last difference more
  than once (the error grows like 1/r): a grid that ends on t = 0 (uniform or leading timestep
  spacing) makes its last step a large jump in lambda (h ~ 4 h_prev for the linear schedule),
  and extrapolating there cost ~9x the covariance error on Gaussian data at 20 steps. Lu et
  al.'s and diffusers' "lower_order_final" (first order on the final step below 10 or 15 steps)
  repairs the same grids at 10 steps but not at 20, and makes trailing grids worse, so it is not
  used. N evaluations for N steps.
  """
  del key
  x = carry["x"]
  d = ctx.denoise(x, s)
  final = s_next <= 0
  ratio = s_next / s  # = exp(-h)
  h = -jnp.log(jnp.where(final, 0.5, ratio))  # any positive value on the last step
  r = carry["h_prev"] / h  # 0 on the first step
  second = jnp.logical_not(final) & (r >= MIN_STEP_RATIO)
  d_eff = jnp.where(second, d + (0.5 / jnp.where(second, r, 1.0)) * (d - carry["d_prev"]), d)
  return {"x": d_eff + ratio * (x - d_eff), "d_prev": d, "h_prev": h}


def _ddpm(ctx: Context, carry: dict, s, s_next, key) -> dict:
  """Ancestral sampling: x~_next ~ q(x~_next | x~, x0 = D), the DDPM posterior,
  N(D + (s_next^2 / s^2)(x~ - D), s_next^2 (s^2 - s_next^2) / s^2 I).

  Derivation: given x0, the scaled process is x~_u = x0 + u eps with independent increments,
  x~_s = x~_{s_next} + sqrt(s^2 - s_next^2) z, so (x~_{s_next}, x~_s) are jointly Gaussian with
  Var(x~_{s_next}) = s_next^2, Var(x~_s) = s^2 and covariance s_next^2; conditioning gives mean
  x0 + (s_next^2 / s^2)(x~_s - x0) and variance s_next^2 - s_next^4 / s^2. The VP kernel
  x_t = (alpha_t / alpha_u) x_u + sqrt(sigma_t^2 - (alpha_t / alpha_u)^2 sigma_u^2) z divided by
  alpha_t is this same increment (s_t^2 - s_u^2 = sigma_t^2/alpha_t^2 - sigma_u^2/alpha_u^2), so
  the posterior is exact for VP and VE alike: it is Ho et al.'s eq. 7 (`fixed_small` variance)
  mapped by x / alpha. Option `variance='fixed_large'` keeps the mean and takes Ho et al.'s
  beta_{t|s} = 1 - abar_t / abar_s instead, which assumes alpha^2 + sigma^2 = 1 (abar =
  1 / (1 + s^2)): in these coordinates beta (1 + s_next^2) = (s^2 - s_next^2)(1 + s_next^2) /
  (1 + s^2). The last step (s_next = 0) adds no noise and returns D. N evaluations.
  """
  variance = ctx.options["variance"]
  if variance not in ("fixed_small", "fixed_large"):
    raise ValueError(
      f"ddpm variance {variance!r}: use fixed_small or fixed_large (learned_range samples with "
      "ddpm_learned_range)."
    )
  x = carry["x"]
  d = ctx.denoise(x, s)
  keep = (s_next / s) ** 2
  if variance == "fixed_small":
    sd = s_next * jnp.sqrt(1 - keep)
  else:
    sd = jnp.sqrt((s**2 - s_next**2) * (1 + s_next**2) / (1 + s**2)) * (s_next > 0)
  z = jax.random.normal(key, x.shape, x.dtype)
  return {"x": d + keep * (x - d) + sd * z}


def _ddim(ctx: Context, carry: dict, s, s_next, key) -> dict:
  """DDIM (Song et al. 2021, eq. 12) divided by alpha': with eps_hat = (x~ - D) / s and the
  posterior's standard deviation in these coordinates, sd = s_next sqrt(1 - s_next^2 / s^2)
  (see `_ddpm`), x~_next = D + sqrt(s_next^2 - (eta sd)^2) eps_hat + eta sd z. eta = 0 is
  `_euler`; eta = 1 is `_ddpm` (sqrt(s_next^2 - sd^2) = s_next^2 / s). N evaluations."""
  x, eta = carry["x"], ctx.options["eta"]
  d = ctx.denoise(x, s)
  sd = eta * s_next * jnp.sqrt(1 - (s_next / s) ** 2)
  z = jax.random.normal(key, x.shape, x.dtype)
  direction = jnp.sqrt(jnp.maximum(s_next**2 - sd**2, 0.0)) / s
  return {"x": d + direction * (x - d) + sd * z}


def _counted_init(x: jax.Array) -> dict:
  return {"x": x, "i": jnp.zeros((), jnp.int32)}


def _ddpm_learned_range(ctx: Context, carry: dict, s, s_next, key) -> dict:
  """Ancestral sampling with improved DDPM's learned variances, on a discrete schedule's integer
  timesteps. Options: `schedule`, and `timesteps` (N,) int, the grid's t (`timesteps`; the grid
  must be `timestep_grid` of the same call). The denoiser returns (B, H, W, 2C): x0, then the
  network's v in [-1, 1]. In the vp state x_t = alpha_t x~ the step draws
  x_prev ~ N(`gaussian.p_mean_logvar`(schedule, x0, x_t, t, t_prev, 'learned_range', v)), the
  VLB's kernel, and returns x_prev / alpha_prev. The last step (t_prev = -1) returns x0."""
  o, x, i = ctx.options, carry["x"], carry["i"]
  if o["schedule"] is None or o["timesteps"] is None:
    raise ValueError("ddpm_learned_range needs the options schedule= and timesteps=.")
  sched, c = o["schedule"], x.shape[-1]
  ts = jnp.append(jnp.asarray(o["timesteps"], jnp.int32), -1)
  t, t_prev = ts[i], ts[i + 1]
  out = ctx.denoise(x, s)
  a_t, _ = gaussian.alpha_sigma(sched, t, x.ndim)
  a_prev, _ = gaussian.alpha_sigma(sched, t_prev, x.ndim)
  mean, logvar = gaussian.p_mean_logvar(
    sched, x0=out[..., :c], x_t=a_t * x, t=t, s=t_prev, variance="learned_range", v=out[..., c:]
  )
  z = jax.random.normal(key, x.shape, x.dtype)
  x_prev = mean + (t_prev >= 0).astype(x.dtype) * jnp.exp(0.5 * logvar) * z
  return {"x": (x_prev / a_prev).astype(x.dtype), "i": i + 1}


_once: Callable[[int], int] = lambda n: n
_twice_but_last: Callable[[int], int] = lambda n: 2 * n - 1
_never: Callable[[dict[str, Any]], bool] = lambda options: False
_always: Callable[[dict[str, Any]], bool] = lambda options: True


SOLVERS: dict[str, Solver] = {
  "euler": Solver(_x_only, _euler, _never, _once),
  "heun": Solver(_x_only, _heun, _never, _twice_but_last),
  "edm": Solver(_x_only, _edm, _always, _twice_but_last, EDM_OPTIONS),
  "dpm_solver++": Solver(_dpm_init, _dpm_solver_pp_2m, _never, _once),
  "ddpm": Solver(_x_only, _ddpm, _always, _once, {"variance": "fixed_small"}),
  "ddim": Solver(_x_only, _ddim, lambda o: o["eta"] != 0, _once, {"eta": 0.0}),
  "ddpm_learned_range": Solver(
    _counted_init, _ddpm_learned_range, _always, _once, {"schedule": None, "timesteps": None}
  ),
}


def register(name: str, solver: Solver) -> None:
  """Adds a solver under `name` (init, step, stochastic, evaluations, options; see `Solver`)."""
  SOLVERS[name] = solver


def get(name: str) -> Solver:
  """The registered solver `name`; ValueError listing the known names for an unknown one."""
  if name not in SOLVERS:
    raise ValueError(f"unknown solver {name!r}; known solvers: {', '.join(SOLVERS)}.")
  return SOLVERS[name]


def network_evaluations(name: str, num_steps: int) -> int:
  """Denoiser evaluations per image for `num_steps` steps (ignoring doubling by guidance)."""
  return get(name).evaluations(int(num_steps))


def sample(
  name: str,
  denoise: Denoiser,
  x_T: jax.Array,
  sigmas: np.ndarray | jax.Array,
  key: jax.Array | None,
  *,
  return_trajectory: bool = False,
  **options: Any,
):
  """Runs solver `name` from x_T ~ N(0, sigmas[0]^2 I) (B, H, W, C) over `sigmas` (N + 1,).

  `sigmas`: decreasing, positive, usually ending with 0 (`karras_sigmas`, `grid`); a concrete
  grid is checked (`check_sigmas`), a traced one is trusted. Computation is in x_T's dtype.
  `key` is needed by stochastic solvers (step i uses fold_in(key, i)); None is allowed for the
  deterministic ones. `options`: the solver's own (e.g. S_churn for `edm`); unknown ones raise.
  Returns x0 (B, H, W, C); with `return_trajectory` also the states after every step,
  (N, B, H, W, C), the last being x0.
  """
  solver = get(name)
  if not jnp.issubdtype(x_T.dtype, jnp.floating):
    raise ValueError(f"x_T must be a float array, got {x_T.dtype}.")
  unknown = sorted(set(options) - set(solver.options))
  if unknown:
    known = ", ".join(solver.options) or "none"
    raise ValueError(f"solver {name!r} got unknown options {unknown}; it accepts: {known}.")
  if key is None:
    if solver.stochastic({**solver.options, **options}):
      raise ValueError(f"solver {name!r} is stochastic: pass a PRNG key.")
    key = jax.random.PRNGKey(0)
  if not isinstance(sigmas, jax.core.Tracer):
    check_sigmas(np.asarray(sigmas))
  sig = jnp.asarray(sigmas, x_T.dtype)
  n = sig.shape[0] - 1
  ctx = Context(denoise, n, {**solver.options, **options})

  def body(carry, inputs):
    s, s_next, i = inputs
    carry = solver.step(ctx, carry, s, s_next, jax.random.fold_in(key, i))
    return carry, carry["x"] if return_trajectory else None

  carry, traj = jax.lax.scan(body, solver.init(x_T), (sig[:-1], sig[1:], jnp.arange(n)))
  return (carry["x"], traj) if return_trajectory else carry["x"]


# ---- few-step samplers: MeanFlow and consistency models (diffusion/objectives.py) --------------

FEW_STEP = ("meanflow", "consistency")
FEW_STEP_MAX = 4  # their step counts: 1..4
MEANFLOW_T_MAX = 1.0 - 1e-5  # flow time of the first level (t = 1 has s = t / (1 - t) infinite)


def _meanflow(ctx: Context, carry: dict, s, s_next, key) -> dict:
  """MeanFlow's step z_r = z_t - (t - r) u(z_t, r, t) (Geng et al. 2025, Algorithm 2). Here
  `denoise` is the model's two-time map (x~, s, s_next) -> x~_next, which converts to flow time
  (t = s / (1 + s), z = x~ / (1 + s)) and back. One evaluation per step."""
  del key
  return {"x": ctx.denoise(carry["x"], s, s_next)}


def _consistency(ctx: Context, carry: dict, s, s_next, key) -> dict:
  """Multistep consistency sampling (Song et al. 2023, Algorithm 1): `denoise` is the consistency
  function f, x0 = f(x~, s), then re-noised to the next level from f's end at sigma_min:
  x~' = x0 + sqrt(s'^2 - sigma_min^2) z. The last step (s' = 0) returns x0. One evaluation."""
  x0 = ctx.denoise(carry["x"], s)
  z = jax.random.normal(key, x0.shape, x0.dtype)
  scale = jnp.sqrt(jnp.maximum(s_next**2 - ctx.options["sigma_min"] ** 2, 0.0))
  return {"x": jnp.where(s_next > 0, x0 + scale * z, x0)}


register("meanflow", Solver(_x_only, _meanflow, _never, _once))
register("consistency", Solver(_x_only, _consistency, _always, _once, {"sigma_min": 0.002}))


def few_step_sigmas(
  name: str, num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0
) -> np.ndarray:
  """The float64 grid (num_steps + 1,) of a few-step sampler, decreasing, ending with 0.
  meanflow: flow times t_i = 1 - i / N (t_0 = MEANFLOW_T_MAX) as s = t / (1 - t); consistency:
  the first N of N + 1 Karras levels from sigma_max to sigma_min (the sampler re-noises to each;
  a level at sigma_min itself would be an identity step)."""
  if name not in FEW_STEP:
    raise ValueError(f"{name!r} is not a few-step sampler ({', '.join(FEW_STEP)}).")
  n = int(num_steps)
  if not 1 <= n <= FEW_STEP_MAX:
    raise ValueError(
      f"the {name} sampler takes 1 to {FEW_STEP_MAX} steps, got {num_steps}; set "
      "config.sample.num_steps (or the eval sampler's :steps) to 1, 2, 3 or 4."
    )
  if name == "meanflow":
    t = np.linspace(1.0, 0.0, n + 1)
    t[0] = MEANFLOW_T_MAX
    return t / (1.0 - t)
  return np.append(karras_sigmas(n + 1, sigma_min, sigma_max, rho)[:n], 0.0)
