"""Power-function EMA and post-hoc EMA reconstruction (EDM2: Karras et al. 2024, sec. 3, app. C).

Profiles. A power-function EMA of exponent gamma > -1 at time t averages the trajectory
theta(s) with the density p_t(s) = (gamma + 1) s^gamma / t^(gamma + 1) on [0, t]. Its relative
width sigma_rel (the standard deviation of s / t) satisfies
  sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)),
which rises from 0 at gamma = -1 to SIGMA_REL_MAX ~ 0.3003 at gamma = (sqrt(5) - 3) / 2 and
falls back to 0 as gamma -> inf; `std_to_exp` takes the branch right of that maximum (the
largest root of the cubic), so larger gamma means a shorter average.

Steps. t counts optimiser updates: theta_0 are the initial parameters and theta_t those after t
updates. The tracker is called as `update(state, theta_t, t)` for t = 1, 2, ... with
  ema_t = beta_t ema_{t-1} + (1 - beta_t) theta_t,   beta_t = (1 - 1/t)^(gamma + 1),
so beta_1 = 0: the EMA after the first update is theta_1 and theta_0 gets no weight (t <= 1 is
treated as 1, a reset to the given parameters). Unrolled, ema_t = sum_{tau=1..t} w_tau theta_tau
with w_tau = (tau^(gamma+1) - (tau-1)^(gamma+1)) / t^(gamma+1), which is exactly the integral of
p_t over (tau - 1, tau]: the discrete tracker *is* the continuous profile applied to the
piecewise-constant trajectory theta(s) = theta_ceil(s), so the continuous inner products below
involve no discretisation error. (EDM2 counts images, beta = (1 - batch/images)^(gamma + 1);
with a constant batch size that is the same rule.) In `train.py`'s step, whose `state.step` is
the count before the update, pass `state.step + 1`.

Reconstruction. Given snapshots ema_i taken at steps t_i with exponents gamma_i, the profile of a
target (t_r, gamma_r) is approximated in L2([0, inf)) by sum_i x_i p_{t_i, gamma_i}: the normal
equations A x = b with A_ij = <p_i, p_j>, b_i = <p_i, p_r> in closed form (`profile_dot`);
the reconstructed parameters are sum_i x_i ema_i.

Host-side maths (std_to_exp, exp_to_std, profile_dot, solve_coefficients, reconstruct) is float64
NumPy; the tracker (init, update) is JAX with float32 EMAs and is traceable inside a jitted step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_SIGMA_RELS = (0.05, 0.10)  # EDM2's two tracked profiles
GAMMA_AT_MAX = (math.sqrt(5.0) - 3.0) / 2.0  # argmax of sigma_rel(gamma), ~ -0.382
SIGMA_REL_MAX = math.sqrt((GAMMA_AT_MAX + 1) / ((GAMMA_AT_MAX + 2) ** 2 * (GAMMA_AT_MAX + 3)))


# ---- sigma_rel <-> gamma ------------------------------------------------------------------------


def exp_to_std(gamma: Any) -> np.ndarray:
  """Relative standard deviation of the power profile of exponent `gamma` (any shape, > -1):
  sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))), float64 of gamma's shape."""
  g = np.asarray(gamma, np.float64)
  if np.any(~(g > -1.0)):
    raise ValueError(f"power-EMA exponents must be > -1, got {gamma}.")
  return np.sqrt((g + 1.0) / ((g + 2.0) ** 2 * (g + 3.0)))


def std_to_exp(sigma_rel: Any) -> np.ndarray:
  """Exponent gamma of the power profile with relative standard deviation `sigma_rel` (any shape,
  in (0, SIGMA_REL_MAX)); float64 of sigma_rel's shape. E.g. 0.05 -> 16.97, 0.10 -> 6.94.

  Clearing denominators in sigma^2 = (g+1) / ((g+2)^2 (g+3)) gives the cubic
  g^3 + 7 g^2 + (16 - s) g + (12 - s) = 0 with s = sigma^-2; its largest real root is the
  exponent on the decreasing branch (the other real roots lie in (-1, GAMMA_AT_MAX] or below -1).
  """
  sig = np.asarray(sigma_rel, np.float64)
  if np.any(~((sig > 0.0) & (sig < SIGMA_REL_MAX))):
    raise ValueError(f"sigma_rel must lie in (0, {SIGMA_REL_MAX:.4f}), got {sigma_rel}.")
  roots = [np.roots([1.0, 7.0, 16.0 - s, 12.0 - s]) for s in sig.ravel() ** -2.0]
  return np.array([r[np.abs(r.imag) < 1e-9].real.max() for r in roots]).reshape(sig.shape)


# ---- the tracker (JAX) --------------------------------------------------------------------------


@flax.struct.dataclass
class PowerEMAState:
  """One float32 EMA of the parameters per tracked profile (a pytree; checkpoint it whole).

  emas: tuple of K parameter pytrees (float32, the parameters' shapes).
  sigma_rels, gammas: float32 (K,): each EMA's relative width and exponent, carried as leaves so
  a checkpoint says which profiles it holds (the exponents feed `solve_coefficients`).
  """

  emas: tuple[Any, ...]
  sigma_rels: jax.Array
  gammas: jax.Array


def init(params: Any, sigma_rels: Sequence[float] = DEFAULT_SIGMA_RELS) -> PowerEMAState:
  """Every EMA starts as a float32 copy of `params` (step 0; the first update overwrites it)."""
  sigma_rels = tuple(float(s) for s in sigma_rels)
  if not sigma_rels:
    raise ValueError("post-hoc EMA needs at least one sigma_rel.")
  gammas = std_to_exp(np.array(sigma_rels))
  emas = tuple(jax.tree.map(lambda p: jnp.array(p, jnp.float32), params) for _ in sigma_rels)
  return PowerEMAState(
    emas=emas,
    sigma_rels=jnp.asarray(sigma_rels, jnp.float32),
    gammas=jnp.asarray(gammas, jnp.float32),
  )


def update_weight(step: jax.Array, gamma: jax.Array) -> jax.Array:
  """1 - beta_t = 1 - (1 - 1/t)^(gamma + 1) at t = max(step, 1), float32 (broadcasts).

  Computed as -expm1((gamma + 1) log1p(-1/t)): accurate to float32 rounding of the weight itself
  even at t ~ 1e7, where 1 - 1/t rounds to 1 in float32. Equals 1 at t <= 1."""
  t = jnp.maximum(jnp.asarray(step, jnp.float32), 1.0)
  return -jnp.expm1((jnp.asarray(gamma, jnp.float32) + 1.0) * jnp.log1p(-1.0 / t))


def update(state: PowerEMAState, params: Any, step: jax.Array) -> PowerEMAState:
  """EMAs after optimiser update `step` (1-based: `params` are theta_step; see the module
  docstring). Traceable (`step` may be a traced int32 scalar); params may be any float dtype."""
  reset = jnp.asarray(step) <= 1
  w = update_weight(step, state.gammas)  # (K,)

  def one(k: int, ema: Any) -> Any:
    def leaf(e: jax.Array, p: jax.Array) -> jax.Array:
      p = p.astype(jnp.float32)
      return jnp.where(reset, p, e + w[k] * (p - e))  # lerp form: no drift from beta + w != 1

    return jax.tree.map(leaf, ema, params)

  return state.replace(emas=tuple(one(k, e) for k, e in enumerate(state.emas)))


# ---- reconstruction (float64 NumPy) ------------------------------------------------------------


def profile_dot(t_a: Any, gamma_a: Any, t_b: Any, gamma_b: Any) -> np.ndarray:
  """<p_a, p_b> = integral_0^inf p_{t_a,gamma_a}(s) p_{t_b,gamma_b}(s) ds (broadcasts, float64).

  With m = min(t_a, t_b), M = max(t_a, t_b) and g_M the exponent of the profile ending at M:
  (gamma_a + 1)(gamma_b + 1) / ((gamma_a + gamma_b + 1) M) * (m / M)^g_M.
  """
  ta, ga, tb, gb = (np.asarray(v, np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
  lo, hi = np.minimum(ta, tb), np.maximum(ta, tb)
  g_hi = np.where(ta >= tb, ga, gb)
  return (ga + 1.0) * (gb + 1.0) / ((ga + gb + 1.0) * hi) * (lo / hi) ** g_hi


def solve_coefficients(
  snapshot_steps: Sequence[float],
  snapshot_gammas: Sequence[float],
  target_step: float,
  target_gamma: float,
  *,
  normalize: bool = True,
) -> np.ndarray:
  """Least-squares weights x (N,) so that sum_i x_i p_{t_i,gamma_i} ~ p_{target_step,target_gamma}.

  snapshot_steps, snapshot_gammas: (N,), one entry per stored EMA (a checkpoint holding K
  profiles gives K entries with the same step); steps >= 1; (step, gamma) pairs distinct.
  Solves A x = b in float64 (A_ij = <p_i, p_j>, b_i = <p_i, p_target>). `normalize` rescales
  x to sum to 1 (EDM2 does; the raw sum is already ~1 when the fit is good), so a constant
  trajectory is reproduced exactly. Typical target: target_gamma = std_to_exp(sigma_rel) at
  target_step <= max(snapshot_steps); coefficients may be large with alternating signs, which
  is why `reconstruct` accumulates in float64.
  """
  t = np.asarray(snapshot_steps, np.float64).ravel()
  g = np.asarray(snapshot_gammas, np.float64).ravel()
  if t.shape != g.shape or t.size == 0:
    raise ValueError(f"need as many snapshot steps as exponents (>= 1), got {t.size} and {g.size}.")
  if np.any(~(t >= 1.0)) or not target_step >= 1.0:
    raise ValueError("snapshot and target steps must be >= 1 (steps count optimiser updates).")
  if np.any(~(g > -0.5)) or not target_gamma > -0.5:
    raise ValueError("exponents must be > -0.5 (sigma_rel from std_to_exp always is).")
  if len(set(zip(t.tolist(), g.tolist(), strict=True))) != t.size:
    raise ValueError("duplicate (step, gamma) snapshots make the normal equations singular.")
  a = profile_dot(t[:, None], g[:, None], t[None, :], g[None, :])
  b = profile_dot(t, g, target_step, target_gamma)
  x = np.linalg.solve(a, b)
  return x / x.sum() if normalize else x


def reconstruct(snapshots: Sequence[Any], coefficients: Sequence[float]) -> Any:
  """sum_i coefficients[i] * snapshots[i], leaf by leaf: float64 accumulation on the host, float32
  NumPy result. snapshots: N parameter pytrees of one structure (host or fully addressable
  arrays); coefficients: (N,)."""
  c = np.asarray(coefficients, np.float64)
  if c.shape != (len(snapshots),):
    raise ValueError(f"{len(snapshots)} snapshots but coefficients of shape {c.shape}.")

  def combine(*leaves: Any) -> np.ndarray:
    acc = np.zeros(np.shape(leaves[0]), np.float64)
    for ci, x in zip(c, leaves, strict=True):
      if ci != 0.0:
        acc += ci * np.asarray(x, np.float64)
    return acc.astype(np.float32)

  return jax.tree.map(combine, *snapshots)


def flatten_snapshots(
  saved: Sequence[tuple[int, PowerEMAState]],
) -> tuple[np.ndarray, np.ndarray, list[Any]]:
  """[(step, state), ...] (e.g. restored checkpoints) -> (steps (N,), gammas (N,), N pytrees)
  with N = sum of K over the states, the arguments of `solve_coefficients` and `reconstruct`."""
  steps, gammas, trees = [], [], []
  for step, state in saved:
    for k, ema in enumerate(state.emas):
      steps.append(float(step))
      gammas.append(float(np.asarray(state.gammas)[k]))
      trees.append(ema)
  return np.array(steps), np.array(gammas), trees
