"""Sigma-space solvers on Gaussian data, whose denoiser, probability-flow map and DDPM posterior
are known in closed form; references are float64 NumPy written from the papers (EDM Algorithms
1-2, Lu et al. 2022 Algorithm 2, Ho et al. 2020 eq. 7, Song et al. 2021 eq. 12)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import schedules
from diffusion import solvers as SV

# x0 ~ N(MU, SIGMA) in 4 dimensions, images shaped (B, 2, 2, 1).
MU = np.array([0.5, -0.3, 0.2, 0.1])
SIGMA = np.array(
  [[1.0, 0.4, 0.2, 0.0], [0.4, 0.6, 0.1, 0.1], [0.2, 0.1, 0.3, 0.05], [0.0, 0.1, 0.05, 0.15]]
)
LAM, U = np.linalg.eigh(SIGMA)
S_MIN, S_MAX = 0.002, 80.0
ORDERS = {"euler": 1, "heun": 2, "dpm_solver++": 2}


def denoise(x, s):
  """Exact E[x0 | x~ = x0 + s eps] = MU + SIGMA (SIGMA + s^2 I)^-1 (x~ - MU), in x's dtype."""
  y = (x.reshape(x.shape[0], 4) - MU) @ U
  return (MU + (y * (LAM / (LAM + s**2))) @ U.T).astype(x.dtype).reshape(x.shape)


def ref_denoise(x, s):
  return MU + np.linalg.solve(SIGMA + s**2 * np.eye(4), SIGMA @ (x - MU).T).T


def ref_step(name, x, z, sig, i, S_churn=0.0, S_tmin=0.0, S_tmax=np.inf, S_noise=1.0):
  """One step from sig[i] to sig[i+1] on x (n, 4), noise z (n, 4): EDM Algorithm 1 (euler
  without its correction, heun) and 2 (edm); the DDPM posterior (ddpm)."""
  n, s, sn = len(sig) - 1, sig[i], sig[i + 1]
  if name == "euler":
    return x + (sn - s) * (x - ref_denoise(x, s)) / s
  if name == "ddpm":
    return (
      ref_denoise(x, s)
      + sn**2 / s**2 * (x - ref_denoise(x, s))
      + sn / s * math.sqrt(s**2 - sn**2) * z
    )
  gamma = min(S_churn / n, math.sqrt(2) - 1) if S_tmin <= s <= S_tmax else 0.0
  sh = s + gamma * s
  xh = x + math.sqrt(sh**2 - s**2) * S_noise * z
  d_cur = (xh - ref_denoise(xh, sh)) / sh
  x_next = xh + (sn - sh) * d_cur
  if i < n - 1:
    d_prime = (x_next - ref_denoise(x_next, sn)) / sn
    x_next = xh + (sn - sh) * (0.5 * d_cur + 0.5 * d_prime)
  return x_next


def ref_dpm_solver_pp_2m(x, sig):
  """Lu et al. 2022, Algorithm 2 with alpha = 1, sigma = s, lambda = -log s; first order on the
  first and last step and where r = h_prev / h < 1/2."""
  d_prev = h_prev = None
  for i in range(len(sig) - 1):
    s, sn = sig[i], sig[i + 1]
    d = ref_denoise(x, s)
    if sn == 0:
      return d
    h = math.log(s) - math.log(sn)
    big = d
    if d_prev is not None and h_prev / h >= 0.5:
      r = h_prev / h
      big = (1 + 1 / (2 * r)) * d - 1 / (2 * r) * d_prev
    x = (sn / s) * x - math.expm1(-h) * big
    d_prev, h_prev = d, h
  return x


def ref_run(name, x, sig, **opts):
  if name == "dpm_solver++":
    return ref_dpm_solver_pp_2m(x, sig)
  for i in range(len(sig) - 1):
    x = ref_step(name, x, 0.0, sig, i, **opts)
  return x


def affine(f, d):
  """(M, c) with f(x) = M x + c for an affine f of (n, d) rows, from the basis points."""
  out = f(np.concatenate([np.zeros((1, d)), np.eye(d)]))
  return (out[1:] - out[0]).T, out[0]


def ref_moments(name, sig, **opts):
  """Exact mean and covariance of the output from x_T ~ N(0, sig[0]^2 I): each step is affine
  in (x, z), x' = A x + B z + b, so m' = A m + b, C' = A C A^T + B B^T (float64)."""
  m, c = np.zeros(4), sig[0] ** 2 * np.eye(4)
  for i in range(len(sig) - 1):
    mat, b = affine(lambda xz, i=i: ref_step(name, xz[:, :4], xz[:, 4:], sig, i, **opts), 8)
    a, bz = mat[:, :4], mat[:, 4:]
    m, c = a @ m + b, a @ c @ a.T + bz @ bz.T
  return m, c


def exact_flow(s_max):
  """The probability-flow ODE from s_max to 0, closed form: in SIGMA's eigenbasis
  d(x - MU)/ds = s / (lam + s^2) (x - MU), so x - MU scales by sqrt(lam + s^2). Returns (F, c)
  with x0 = F x_T + c, and the output covariance from x_T ~ N(0, s_max^2 I),
  SIGMA s_max^2 (SIGMA + s_max^2 I)^-1 (which misses SIGMA by SIGMA^2 / s_max^2: x_T is not
  exactly the marginal N(MU, SIGMA + s_max^2 I))."""
  f = U @ np.diag(np.sqrt(LAM / (LAM + s_max**2))) @ U.T
  return f, MU - f @ MU, U @ np.diag(LAM * s_max**2 / (LAM + s_max**2)) @ U.T


def solver_map(name, sig):
  """The solver's own affine map x_T -> x0, run in float64."""
  basis = np.concatenate([np.zeros((1, 4)), np.eye(4)]).reshape(5, 2, 2, 1)
  with jax.enable_x64(True):
    out = jax.jit(lambda x, s: SV.sample(name, denoise, x, s, None))(
      jnp.asarray(basis), jnp.asarray(sig)
    )
    out = np.asarray(out, np.float64).reshape(5, 4)
  return (out[1:] - out[0]).T, out[0]


def test_karras_grid_is_edm_eq5():
  n, rho = 18, 7.0
  sig = SV.karras_sigmas(n, S_MIN, S_MAX, rho)
  eq5 = [
    (S_MAX ** (1 / rho) + i / (n - 1) * (S_MIN ** (1 / rho) - S_MAX ** (1 / rho))) ** rho
    for i in range(n)
  ]
  assert sig.dtype == np.float64 and sig.shape == (n + 1,)
  assert sig[0] == S_MAX and sig[n - 1] == S_MIN and sig[n] == 0.0
  np.testing.assert_allclose(sig[:n], eq5, rtol=1e-13)
  np.testing.assert_array_equal(SV.grid("karras", n, S_MIN, S_MAX), sig)
  np.testing.assert_allclose(SV.karras_sigmas(5, 0.1, 10.0, rho=1.0)[:-1], np.linspace(10, 0.1, 5))
  np.testing.assert_array_equal(SV.karras_sigmas(1, S_MIN, S_MAX), [S_MAX, 0.0])


def test_log_grid_is_uniform_in_log_sigma():
  sig = SV.grid("log", 10, S_MIN, S_MAX)
  assert sig[0] == S_MAX and sig[9] == S_MIN and sig[10] == 0.0
  np.testing.assert_allclose(np.diff(np.log(sig[:-1])), math.log(S_MIN / S_MAX) / 9, rtol=1e-12)


@pytest.mark.parametrize(
  "args",
  [
    (0, S_MIN, S_MAX),
    (2.5, S_MIN, S_MAX),
    (4, 0.0, S_MAX),
    (4, 1.0, 1.0),
    (4, 2.0, 1.0),
    (4, S_MIN, np.inf),
  ],
)
@pytest.mark.parametrize("name", ["karras", "log"])
def test_grid_arguments_are_checked(name, args):
  with pytest.raises(ValueError, match="num_steps|sigma_min"):
    SV.grid(name, *args)


def test_unknown_names_options_and_bad_grids_raise():
  x = jnp.zeros((2, 2, 2, 1))
  sig = SV.karras_sigmas(4, S_MIN, S_MAX)
  with pytest.raises(ValueError, match="known grids: karras, log"):
    SV.grid("cosine", 4, S_MIN, S_MAX)
  with pytest.raises(ValueError, match="known solvers: euler, heun, edm, dpm_solver\\+\\+, ddpm"):
    SV.sample("unipc", denoise, x, sig, None)
  with pytest.raises(ValueError, match="accepts: S_churn, S_tmin, S_tmax, S_noise"):
    SV.sample("edm", denoise, x, sig, jax.random.PRNGKey(0), S_chrun=40.0)
  with pytest.raises(ValueError, match="accepts: none"):
    SV.sample("heun", denoise, x, sig, None, S_churn=40.0)
  with pytest.raises(ValueError, match="PRNG key"):
    SV.sample("ddpm", denoise, x, sig, None)
  for bad in (sig[::-1], np.array([80.0]), np.array([80.0, -1.0]), np.array([1.0, 2.0, 0.0])):
    with pytest.raises(ValueError, match="sigmas"):
      SV.sample("euler", denoise, x, bad, None)


@pytest.mark.parametrize("name", list(ORDERS))
def test_deterministic_solvers_converge_at_their_order(name):
  """The solver's float64 affine map equals the float64 NumPy reference, and its output
  covariance from x_T ~ N(0, 80^2 I) approaches the exact flow's (hence SIGMA, to within
  SIGMA^2 / 80^2 < 3e-4) with log-log slope -order over 16/32/64 Karras steps."""
  f, c, cov = exact_flow(S_MAX)
  assert np.abs(cov - SIGMA).max() < 3e-4
  steps, errors = [16, 32, 64], []
  for n in steps:
    sig = SV.karras_sigmas(n, S_MIN, S_MAX)
    m, b = solver_map(name, sig)
    m_ref, b_ref = affine(lambda x, sig=sig: ref_run(name, x, sig), 4)
    np.testing.assert_allclose(m, m_ref, rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(b, b_ref, rtol=1e-9, atol=1e-12)
    errors.append(np.abs(S_MAX**2 * m @ m.T - cov).max())
  slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
  assert abs(slope - ORDERS[name]) < 0.25, (errors, slope)
  assert errors[-1] < (0.1 if ORDERS[name] == 1 else 0.01), errors


@pytest.mark.parametrize("name", [*ORDERS, "edm"])
def test_float32_batch_matches_the_float64_map(name):
  """The default-precision sampler on a batch of noise equals the reference affine map."""
  sig = SV.karras_sigmas(18, S_MIN, S_MAX)
  x = S_MAX * jax.random.normal(jax.random.PRNGKey(1), (64, 2, 2, 1))
  out = jax.jit(lambda x: SV.sample(name, denoise, x, sig, jax.random.PRNGKey(2)))(x)
  m, c = affine(lambda x: ref_run("heun" if name == "edm" else name, x, sig), 4)
  want = np.asarray(x, np.float64).reshape(64, 4) @ m.T + c
  np.testing.assert_allclose(np.asarray(out).reshape(64, 4), want, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("coords", ["vp", "flow"])
def test_euler_is_ddim(coords):
  """Euler in sigma space is DDIM (eta = 0) in any process's coordinates: run Song et al.'s
  eq. 12 x' = alpha' x0 + sigma' eps_hat, eps_hat = (x - alpha x0) / sigma, in float64 with
  VP (alpha = 1 / sqrt(1 + s^2)) or flow-matching (alpha = 1 - t, sigma = t = s / (1 + s))
  coordinates, where it is also Euler on the velocity eps_hat - x0; every state divided by
  alpha equals the Euler trajectory."""
  sig = SV.grid("log", 12, S_MIN, S_MAX)
  if coords == "vp":
    alpha, sigma = 1 / np.sqrt(1 + sig**2), sig / np.sqrt(1 + sig**2)
  else:
    alpha, sigma = 1 / (1 + sig), sig / (1 + sig)
  x_T = S_MAX * jax.random.normal(jax.random.PRNGKey(3), (8, 2, 2, 1))
  _, traj = SV.sample("euler", denoise, x_T, sig, None, return_trajectory=True)
  x = alpha[0] * np.asarray(x_T, np.float64).reshape(8, 4)
  for i in range(12):
    x0 = ref_denoise(x / alpha[i], sig[i])
    eps = (x - alpha[i] * x0) / sigma[i]
    x = alpha[i + 1] * x0 + sigma[i + 1] * eps
    if coords == "flow":  # the same step as Euler on dx/dt = eps - x0
      t, t_next = sigma[i], sigma[i + 1]
      x_flow = alpha[i] * x0 + t * eps + (t_next - t) * (eps - x0)
      np.testing.assert_allclose(x_flow, x, rtol=1e-12, atol=1e-12)
    got = np.asarray(traj[i], np.float64).reshape(8, 4)
    np.testing.assert_allclose(got, x / alpha[i + 1], rtol=2e-5, atol=2e-5 * max(sig[i + 1], 1))


def _mc_check(samples, mean, cov, k=5.0):
  """Sample mean and covariance within k standard errors of (mean, cov) (Gaussian SEs)."""
  n = samples.shape[0]
  var = np.diag(cov)
  np.testing.assert_array_less(np.abs(samples.mean(0) - mean), k * np.sqrt(var / n))
  se = np.sqrt((np.outer(var, var) + cov**2) / n)
  np.testing.assert_array_less(np.abs(np.cov(samples.T) - cov), k * se)


EDM_IMAGENET = dict(S_churn=40.0, S_tmin=0.05, S_tmax=50.0, S_noise=1.003)


@pytest.mark.parametrize(
  "name,opts,steps,weak_order", [("ddpm", {}, 64, 1.0), ("edm", EDM_IMAGENET, 32, 1.3)]
)
def test_stochastic_solvers_reproduce_the_gaussian_moments(name, opts, steps, weak_order):
  """20k samples match the exact float64 moments of the chain within Monte-Carlo error; with
  S_noise = 1 those moments approach (MU, SIGMA) as the steps double (ancestral sampling is
  first order: covariance error 0.15 at 64 Karras steps, 0.02 at 512; churned Heun is faster)."""
  errors = []
  for n in (steps, 2 * steps, 4 * steps):
    sig = SV.karras_sigmas(n, S_MIN, S_MAX)
    mean, cov = ref_moments(name, sig, **{**opts, **({"S_noise": 1.0} if opts else {})})
    errors.append(max(np.abs(mean - MU).max(), np.abs(cov - SIGMA).max()))
  assert errors[0] < 0.2 and np.all(np.log2(errors[:-1]) - np.log2(errors[1:]) > weak_order - 0.2)
  sig = SV.karras_sigmas(steps, S_MIN, S_MAX)
  mean, cov = ref_moments(name, sig, **opts)
  x = S_MAX * jax.random.normal(jax.random.PRNGKey(4), (20000, 2, 2, 1))
  out = jax.jit(lambda x, k: SV.sample(name, denoise, x, sig, k, **opts))(x, jax.random.PRNGKey(5))
  _mc_check(np.asarray(out, np.float64).reshape(-1, 4), mean, cov)


def test_ddpm_step_is_the_ddpm_posterior():
  """One step from s to s' with D = x0 fixed: mean and variance are Ho et al.'s eq. 7 with
  abar = 1 / (1 + s^2), mapped by x / sqrt(abar')."""
  s, s_next, x0, xs = 3.0, 1.2, 0.7, -2.0
  abar, abar_n = 1 / (1 + s**2), 1 / (1 + s_next**2)
  a_t, beta = abar / abar_n, 1 - abar / abar_n
  mean = (
    math.sqrt(abar_n) * beta / (1 - abar) * x0
    + math.sqrt(a_t) * (1 - abar_n) / (1 - abar) * math.sqrt(abar) * xs
  )
  var = (1 - abar_n) / (1 - abar) * beta
  x = jnp.full((20000, 2, 2, 1), xs)
  _, traj = SV.sample(
    "ddpm",
    lambda x, s: jnp.full_like(x, x0),
    x,
    np.array([s, s_next, 0.0]),
    jax.random.PRNGKey(6),
    return_trajectory=True,
  )
  got = np.asarray(traj[0], np.float64).reshape(-1, 4)
  want_mean, want_var = mean / math.sqrt(abar_n), var / abar_n
  _mc_check(got, np.full(4, want_mean), want_var * np.eye(4))
  np.testing.assert_allclose(traj[1], x0)  # no noise on the last step


def test_edm_without_churn_is_heun():
  """S_churn = 0, or no level inside [S_tmin, S_tmax], gives Heun exactly."""
  sig = SV.karras_sigmas(10, S_MIN, S_MAX)
  x = S_MAX * jax.random.normal(jax.random.PRNGKey(7), (4, 2, 2, 1))

  @jax.jit
  def runs(x, key):
    edm = lambda **o: SV.sample("edm", denoise, x, sig, key, **o)
    return (
      SV.sample("heun", denoise, x, sig, None),
      edm(),
      edm(S_churn=40.0, S_tmin=100.0, S_tmax=200.0),
      edm(S_churn=40.0),
    )

  heun, plain, outside, churned = runs(x, jax.random.PRNGKey(8))
  np.testing.assert_array_equal(plain, heun)
  np.testing.assert_array_equal(outside, heun)
  assert np.abs(churned - heun).max() > 1e-3


@pytest.mark.parametrize("name", list(SV.SOLVERS))
def test_network_evaluations_counts_denoiser_calls(name):
  calls = []
  learned = name == "ddpm_learned_range"  # integer timesteps; x0 and v from the denoiser

  def counting(x, s, *s_next):  # meanflow's is a two-time map (x~, s, s') -> x~' (here DDIM's)
    jax.debug.callback(lambda s: calls.append(float(s)), s)
    if learned:
      return jnp.concatenate([denoise(x, s), jnp.zeros_like(x)], -1)
    d = denoise(x, s)
    return d + (s_next[0] / s) * (x - d) if s_next else d

  sig = SV.karras_sigmas(5, S_MIN, S_MAX)
  opts = {}
  if learned:
    sch = schedules.make("linear", 100)
    opts = {"schedule": sch, "timesteps": SV.timesteps(sch, 5)}
    sig = SV.timestep_grid(sch, 5)
  out = SV.sample(name, counting, jnp.ones((2, 2, 2, 1)), sig, jax.random.PRNGKey(0), **opts)
  out.block_until_ready()
  jax.effects_barrier()
  assert len(calls) == SV.network_evaluations(name, 5) and min(calls) > 0


def test_one_compilation_per_number_of_steps():
  traces = []

  @jax.jit
  def run(x, sig):
    traces.append(1)
    return SV.sample("dpm_solver++", denoise, x, sig, None)

  x = jnp.ones((2, 2, 2, 1))
  a = run(x, SV.karras_sigmas(6, S_MIN, S_MAX))
  b = run(x, SV.grid("log", 6, 0.01, 20.0))
  assert len(traces) == 1 and not np.allclose(a, b)
  run(x, SV.karras_sigmas(7, S_MIN, S_MAX))
  assert len(traces) == 2
