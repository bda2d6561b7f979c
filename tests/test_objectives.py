"""Tests of diffusion/objectives.py and the few-step samplers of diffusion/solvers.py, exact on
Gaussian data x0 ~ N(mu, diag(var)) in float64.

For such data the flow ODE of z_t = (1 - t) x0 + t eps is affine: the marginal is
N(m_t, s_t^2) per dimension with m_t = (1 - t) mu, s_t^2 = (1 - t)^2 var + t^2, the velocity is
v(z, t) = -mu + (t - (1 - t) var) / s_t^2 (z - m_t) and the flow map from t to r is
Phi(z) = m_r + (s_r / s_t)(z - m_t), so the exact average velocity is
u*(z, r, t) = (z - Phi(z)) / (t - r). In the noise-level coordinates x~ = x0 + s eps the
denoiser is D*(x~, s) = mu + var / (var + s^2)(x~ - mu) and the consistency function (ending at
s_min) f*(x~, s) = mu + sqrt((var + s_min^2) / (var + s^2))(x~ - mu). The references below are
these closed forms (float64 NumPy, or jax.numpy under x64 where a JVP needs them).
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import few_step, objectives, processes, solvers

MU = np.array([0.5, -0.3, 0.1, 0.8])
VAR = np.array([0.2, 0.05, 0.6, 0.3])


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


def _col(a, like):
  a = jnp.asarray(a)
  return a.reshape(a.shape + (1,) * (like.ndim - a.ndim))


def flow_moments(t, xp=jnp):
  """(m_t, s_t, s_t'/s_t) per dimension, t broadcast as given."""
  s2 = (1 - t) ** 2 * VAR + t**2
  return (1 - t) * MU, xp.sqrt(s2), (t - (1 - t) * VAR) / s2


def v_exact(z, t):
  """The marginal velocity E[eps - x0 | z_t = z]; z (B, 4), t (B,)."""
  m, _, k = flow_moments(_col(t, z))
  return -MU + k * (z - m)


def flow_map(z, t, r, xp=jnp):
  """Phi: the ODE's exact map from time t to time r (both (B,) or scalars)."""
  m_t, s_t, _ = flow_moments(t[:, None] if np.ndim(t) else t, xp)
  m_r, s_r, _ = flow_moments(r[:, None] if np.ndim(r) else r, xp)
  return m_r + s_r / s_t * (z - m_t)


def u_exact(z, r, t):
  """u*(z, r, t); the instantaneous velocity where r = t."""
  gap = t - r
  safe = jnp.where(gap > 0, gap, 1.0)
  return jnp.where(_col(gap > 0, z), (z - flow_map(z, t, r)) / _col(safe, z), v_exact(z, t))


def draws(n, seed=0):
  rng = np.random.default_rng(seed)
  x0 = MU + np.sqrt(VAR) * rng.standard_normal((n, 4))
  eps = rng.standard_normal((n, 4))
  t = rng.uniform(0.05, 1.0, n)
  r = np.where(np.arange(n) % 3 == 0, t, t * rng.uniform(0.0, 1.0, n))  # a third with r = t
  return x0, eps, r, t


def test_meanflow_loss_vanishes_at_the_exact_average_velocity_only():
  x0, eps, r, t = draws(64)
  z = (1 - t[:, None]) * x0 + t[:, None] * eps
  v = v_exact(jnp.asarray(z), jnp.asarray(t))
  loss, mse = objectives.meanflow_loss(u_exact, x0, eps, r, t, norm_p=0.0, v=v)
  assert float(jnp.max(loss)) < 1e-20 and float(jnp.max(mse)) < 1e-20

  def bent(z, r, t):
    return u_exact(z, r, t) + 0.1 * jnp.sin(3 * z) * _col(t, z)

  loss, mse = objectives.meanflow_loss(bent, x0, eps, r, t, norm_p=1.0, norm_c=0.01, v=v)
  # u* meets the identity, so the target of u* + e is u* - (t - r) de/dt and the error is
  # e + (t - r) de/dt, de/dt = v . d_z e + d_t e by hand.
  zn, tn, rn = np.asarray(z), t[:, None], r[:, None]
  vn = np.asarray(v)
  e = 0.1 * np.sin(3 * zn) * tn
  de_dt = 0.1 * (3 * np.cos(3 * zn) * vn * tn + np.sin(3 * zn))
  sq = np.sum((e + (tn - rn) * de_dt) ** 2, axis=1)
  np.testing.assert_allclose(loss, sq / (sq + 0.01), rtol=1e-10)
  np.testing.assert_allclose(mse, sq / 4, rtol=1e-10)
  assert np.all(sq > 1e-6)


def test_training_with_the_conditional_velocity_is_stationary_at_the_exact_average_velocity():
  """Training regresses on targets built from v = eps - x0, not the marginal velocity: the
  per-example loss is not 0 at u*, but its gradient along any direction g vanishes in
  expectation there (the target is affine in v) and not away from it. Monte Carlo, 4 s.e."""
  n = 100_000
  x0, eps, r, t = draws(n, seed=7)

  def g(z, r, t):
    return jnp.sin(2 * z) * _col(1.0 + t - r, z)

  def grads(theta):
    def losses(th):
      u = lambda z, r_, t_: u_exact(z, r_, t_) + th * g(z, r_, t_)
      return objectives.meanflow_loss(u, x0, eps, r, t, norm_p=0.0)[0]

    per_example = np.asarray(jax.jacfwd(losses)(theta))
    return per_example.mean(), per_example.std() / np.sqrt(n)

  mean, se = grads(0.0)
  assert abs(mean) < 4 * se, (mean, se)
  mean, se = grads(0.3)
  assert abs(mean) > 20 * se, (mean, se)


def test_jvp_target_equals_a_finite_difference_total_derivative():
  def u_np(z, r, t):  # a smooth nonlinear two-time function, NumPy float64
    return np.tanh(z * t[:, None]) + np.cos(z + r[:, None]) * (t - r)[:, None] ** 2

  def u_jax(z, r, t):
    return jnp.tanh(z * t[:, None]) + jnp.cos(z + r[:, None]) * (t - r)[:, None] ** 2

  x0, eps, r, t = draws(16, seed=1)
  z, v = (1 - t[:, None]) * x0 + t[:, None] * eps, eps - x0
  u, target = objectives.meanflow_target(u_jax, z, r, t, v)
  h = 1e-5
  du_dt = (u_np(z + h * v, r, t + h) - u_np(z - h * v, r, t - h)) / (2 * h)
  np.testing.assert_allclose(u, u_np(z, r, t), rtol=1e-12)
  np.testing.assert_allclose(target, v - (t - r)[:, None] * du_dt, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("num_steps", [1, 2])
def test_meanflow_steps_land_on_the_ode_solution(num_steps):
  eps = np.random.default_rng(2).standard_normal((32, 4))
  got = objectives.meanflow_sample(u_exact, jnp.asarray(eps), num_steps)
  np.testing.assert_allclose(got, MU + np.sqrt(VAR) * eps, rtol=1e-12, atol=1e-12)


def test_meanflow_sampler_in_sigma_space_follows_the_ode():
  """The registered meanflow solver on its grid, through the model's two-time map (a network
  stand-in that decodes (k t, k (t - r)) and returns u*), lands on Phi(z_t0, t0 -> 0); k is
  config.diffusion.meanflow_time_scale, not the default 1000 here."""
  scale = 7.0

  def apply(x, cond, labels, t2):
    t = cond / scale
    return u_exact(x, t - t2 / scale, t)

  fake = types.SimpleNamespace(
    _labels=lambda y: None,
    process=processes.Process(name="flow"),
    _apply=lambda params: apply,
    meanflow=objectives.MeanFlowSettings(time_scale=scale),
  )
  settings = types.SimpleNamespace(sampler="meanflow", guidance_scale=1.0)
  two_time, options = few_step.denoiser(fake, None, None, settings)
  for k in (1, 2, 4):
    sigmas = solvers.few_step_sigmas("meanflow", k, 0.002, 80.0)
    x_T = sigmas[0] * np.random.default_rng(k).standard_normal((16, 4))
    got = solvers.sample("meanflow", two_time, jnp.asarray(x_T), sigmas, None, **options)
    t0 = solvers.MEANFLOW_T_MAX
    want = flow_map(x_T * (1 - t0), np.float64(t0), np.float64(0.0), np)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
    assert solvers.network_evaluations("meanflow", k) == k


def test_sample_times_fraction_and_order():
  r, t = objectives.sample_times(jax.random.PRNGKey(0), 40_000, 0.25)
  r, t = np.asarray(r), np.asarray(t)
  assert np.all((0 <= r) & (r <= t) & (t <= 1))
  frac = np.mean(r < t)
  assert abs(frac - 0.25) < 4 * np.sqrt(0.25 * 0.75 / 40_000)
  assert abs(t.mean() - 2 / 3) < 4 * np.sqrt(1 / 18 / 40_000)  # max of two uniforms


# ---- consistency --------------------------------------------------------------------------------

S_MIN, S_MAX, SD = 0.002, 80.0, 0.5


def d_exact(x, s):
  s = _col(s, x) if jnp.ndim(s) else s
  return MU + VAR / (VAR + s**2) * (x - MU)


def f_exact(x, s):
  s = _col(s, x) if jnp.ndim(s) else s
  return MU + jnp.sqrt((VAR + S_MIN**2) / (VAR + s**2)) * (x - MU)


def ode_map(x, s, s_next):
  """The exact probability-flow map between noise levels (x~ coordinates)."""
  return MU + jnp.sqrt((VAR + _col(s_next, x) ** 2) / (VAR + _col(s, x) ** 2)) * (x - MU)


def test_consistency_parameterisation_meets_the_boundary_and_fits_any_function():
  x = jnp.asarray(np.random.default_rng(3).standard_normal((8, 4)))
  f = objectives.consistency_fn(d_exact, S_MIN, SD)
  np.testing.assert_allclose(f(x, jnp.full(8, S_MIN)), x, rtol=1e-15)
  # f = D + c_skip (x - D) with c_skip = sd^2 / ((s - s_min)^2 + sd^2), by hand:
  s = np.linspace(0.01, 50, 8)
  c = SD**2 / ((s - S_MIN) ** 2 + SD**2)
  d = np.asarray(d_exact(x, jnp.asarray(s)))
  np.testing.assert_allclose(f(x, jnp.asarray(s)), d + c[:, None] * (np.asarray(x) - d), 1e-12)


def test_cd_loss_vanishes_at_the_exact_consistency_function():
  x0 = jnp.asarray(MU + np.sqrt(VAR) * np.random.default_rng(4).standard_normal((256, 4)))
  levels = objectives.cd_levels(18, S_MIN, S_MAX)
  assert levels[0] == S_MIN and levels[-1] == S_MAX and np.all(np.diff(levels) > 0)
  key = jax.random.PRNGKey(0)
  loss, s = objectives.cd_loss(f_exact, f_exact, d_exact, x0, key, levels, teacher_step_fn=ode_map)
  assert float(jnp.max(loss)) < 1e-24
  assert set(np.round(np.asarray(s), 9)) <= set(np.round(levels[1:], 9))
  bent = lambda x, s: f_exact(x, s) + 0.05 * jnp.tanh(x)
  loss, _ = objectives.cd_loss(bent, f_exact, d_exact, x0, key, levels, teacher_step_fn=ode_map)
  assert float(jnp.min(loss)) > 1e-6


@pytest.mark.parametrize("solver,order", [("heun", 2), ("dpm_solver++", 2), ("euler", 1)])
def test_teacher_steps_converge_to_the_exact_ode_map_at_their_order(solver, order):
  """Local error of one step from s to s - h, exact denoiser: O(h^(order + 1))."""
  x = jnp.asarray(MU + np.sqrt(VAR + 1.0) * np.random.default_rng(5).standard_normal((8, 4)))
  s = jnp.full(8, 1.0)
  errs = []
  for h in (0.1, 0.05):
    got = objectives.teacher_step(d_exact, x, s, s - h, solver)
    errs.append(float(jnp.max(jnp.abs(got - ode_map(x, s, s - h)))))
  ratio = errs[0] / errs[1]
  assert 2 ** (order + 1) * 0.75 < ratio < 2 ** (order + 1) * 1.35, (errs, ratio)


@pytest.mark.parametrize("num_steps", [1, 2, 4])
def test_multistep_consistency_sampler_reproduces_the_data(num_steps):
  n = 20_000
  sigmas = solvers.few_step_sigmas("consistency", num_steps, S_MIN, S_MAX)
  assert len(sigmas) == num_steps + 1 and sigmas[0] == S_MAX and sigmas[-1] == 0
  assert np.all(sigmas[:-1] > S_MIN)
  rng = np.random.default_rng(num_steps)
  x_T = MU + np.sqrt(VAR + S_MAX**2) * rng.standard_normal((n, 4))  # the exact marginal
  x = solvers.sample(
    "consistency", f_exact, jnp.asarray(x_T), sigmas, jax.random.PRNGKey(1), sigma_min=S_MIN
  )
  x = np.asarray(x)
  var = VAR + S_MIN**2
  assert np.all(np.abs(x.mean(0) - MU) < 4 * np.sqrt(var / n))
  cov = np.cov(x.T)
  np.testing.assert_array_less(np.abs(np.diag(cov) - var), 4 * var * np.sqrt(2 / n))
  off = cov - np.diag(np.diag(cov))
  assert np.max(np.abs(off)) < 4 * np.sqrt(np.max(var) ** 2 / n)


def test_few_step_samplers_refuse_bad_step_counts():
  for name in solvers.FEW_STEP:
    for k in (0, 5):
      with pytest.raises(ValueError, match="1 to 4 steps"):
        solvers.few_step_sigmas(name, k, S_MIN, S_MAX)
