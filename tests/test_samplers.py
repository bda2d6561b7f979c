"""The solvers on the integer timesteps of a discrete vp schedule (solvers.timesteps,
timestep_grid), with exact denoisers of known data: closed forms of DDIM, the DDPM posterior and
its respaced kernels, Gaussian moments, convergence orders, mixtures. References are float64
NumPy from the papers (Ho et al. 2020 eq. 7, Song et al. 2021 eq. 12, Nichol & Dhariwal 2021).

The solvers step in (x~ = x_t / alpha, s = sigma / alpha) on the grid s_t = sqrt((1 - abar_t) /
abar_t); a vp state is x_t = x~ / sqrt(1 + s^2). States are compared in float32 within the
tolerances given where they are checked: the grid is the float32 table of s_t widened, and the
steps divide by s where a table-indexed DDPM step multiplied by table coefficients, so the two
agree to float32 rounding (relative 1e-6 per step), not bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import denoiser
from diffusion import schedules as S
from diffusion import solvers as SV

KEY = jax.random.PRNGKey(0)
SCH = S.make("linear", 1000)
MU = jnp.array([0.5, -0.3])
SIGMA = jnp.array([[0.5, 0.2], [0.2, 0.3]])


def gaussian_denoiser(mu, cov):
  """Exact D(x~, s) = E[x0 | x0 + s eps = x~] for x0 ~ N(mu, cov), images (B, 1, 1, D): with
  cov = Q diag(lam) Q^T (eigendecomposed once, in float64), mu + Q diag(lam / (lam + s^2)) Q^T
  (x~ - mu)."""
  lam, q = np.linalg.eigh(np.asarray(cov, np.float64))
  lam, q = jnp.asarray(lam, jnp.float32), jnp.asarray(q, jnp.float32)

  def denoise(x, s):
    xf = x.reshape(x.shape[0], -1)
    return (mu + ((xf - mu) @ q * (lam / (lam + s**2))) @ q.T).reshape(x.shape)

  return denoise


def run(name, steps, x_T, key=KEY, spacing="uniform", denoise=None, **opts):
  """Solver `name` over `steps` timesteps from the vp prior's x_T ~ N(0, I) (B, 1, 1, D):
  x~_T = x_T sqrt(1 + s_0^2). Returns x0 as (B, D) rows."""
  denoise = denoise or gaussian_denoiser(MU, SIGMA)
  sig = SV.timestep_grid(SCH, steps, spacing)
  f = jax.jit(lambda x, k: SV.sample(name, denoise, x, sig, k, **opts))
  return np.asarray(f(x_T * np.sqrt(1 + sig[0] ** 2), key)).reshape(x_T.shape[0], -1)


def affine_map(name, steps, **kw):
  """A deterministic sampler on Gaussian data is x0 = M x_T + b: exact mean b, covariance M M^T."""
  basis = jnp.concatenate([jnp.zeros((1, 2)), jnp.eye(2)]).reshape(3, 1, 1, 2)
  out = run(name, steps, basis, **kw)
  m = (out[1:] - out[0]).T
  return out[0], m @ m.T


@pytest.mark.parametrize("spacing", SV.SPACINGS)
@pytest.mark.parametrize("steps", [1, 7, 50, 1000])
def test_timesteps_are_a_decreasing_subsequence(spacing, steps):
  ts = SV.timesteps(SCH, steps, spacing)
  assert ts.shape == (steps,) and ts.dtype == np.int32
  assert np.all(np.diff(ts) < 0) and ts[-1] >= 0 and ts[0] <= 999
  if spacing in ("uniform", "trailing", "logsnr"):
    assert ts[0] == 999
  if spacing in ("uniform", "leading", "quadratic", "logsnr") and steps > 1:
    assert ts[-1] == 0


@pytest.mark.parametrize("T", [10, 50, 100, 1000])
def test_every_num_steps_gives_exactly_that_many_distinct_timesteps(T):
  """For every S in 1..T and every spacing: S distinct, strictly decreasing values in [0, T-1];
  trailing always starts at T-1. (Float `arange(T, 0, -T/S)` gave S+1 values for T=100, S=29.)"""
  sch = S.make("cosine", T)
  for spacing in SV.SPACINGS:
    for steps in range(1, T + 1):
      ts = SV.timesteps(sch, steps, spacing)
      ok = (
        ts.shape == (steps,)
        and np.all(np.diff(ts) < 0)
        and ts[-1] >= 0
        and ts[0] <= T - 1
        and (spacing != "trailing" or ts[0] == T - 1)
      )
      assert ok, (spacing, steps, ts)


@pytest.mark.parametrize(
  "T,steps", [(100, 29), (1000, 7), (1000, 50), (1000, 333), (50, 12), (10, 3), (10, 10)]
)
def test_spacings_match_their_formulas_in_exact_arithmetic(T, steps):
  """DDIM/diffusers definitions evaluated with Fractions and Python's round (halves to even):
  uniform round(linspace(0, T-1, S)), leading arange(S) * (T // S), trailing (Lin et al.)
  round(arange(T, 0, -T/S)) - 1."""
  from fractions import Fraction

  sch = S.make("cosine", T)
  uniform = [round(Fraction(i * (T - 1), steps - 1)) if steps > 1 else T - 1 for i in range(steps)]
  trailing = [round(T - Fraction(j * T, steps)) - 1 for j in range(steps)]
  leading = [i * (T // steps) for i in range(steps)] if steps > 1 else [T - 1]
  np.testing.assert_array_equal(SV.timesteps(sch, steps, "uniform"), sorted(uniform)[::-1])
  np.testing.assert_array_equal(SV.timesteps(sch, steps, "trailing"), trailing)
  np.testing.assert_array_equal(SV.timesteps(sch, steps, "leading"), leading[::-1])


def test_timestep_grid_is_sigma_over_alpha_at_the_timesteps():
  """s_t = sqrt((1 - abar_t) / abar_t), abar_t = prod (1 - beta) in float64 from DDPM's linear
  betas, to float32 rounding; then 0."""
  ts = SV.timesteps(SCH, 10, "quadratic")
  abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[ts]
  grid = SV.timestep_grid(SCH, 10, "quadratic")
  assert grid.dtype == np.float64 and grid.shape == (11,) and grid[-1] == 0
  np.testing.assert_allclose(grid[:-1], np.sqrt((1 - abar) / abar), rtol=1e-6)


def test_timesteps_errors():
  with pytest.raises(ValueError, match="known: uniform"):
    SV.timesteps(SCH, 10, "cubic")
  with pytest.raises(ValueError, match="num_steps"):
    SV.timesteps(SCH, 1001)


def test_ddim_closed_form_on_white_data():
  """x0 ~ N(0, I): x0_hat = alpha x_t, eps_hat = sigma x_t, so a deterministic DDIM step
  multiplies the vp state by alpha' alpha + sigma' sigma = cos(theta' - theta), theta =
  atan2(sigma, alpha)."""
  x = jax.random.normal(KEY, (4, 1, 1, 2))
  out = run("ddim", 50, x, denoise=gaussian_denoiser(jnp.zeros(2), jnp.eye(2)))
  s = SV.timestep_grid(SCH, 50)
  theta = np.arctan(s)  # atan2(sigma, alpha) with sigma / alpha = s
  factor = np.prod(np.cos(np.diff(theta)))
  np.testing.assert_allclose(out, factor * np.asarray(x).reshape(4, 2), rtol=2e-4)


def one_step(name, s, s_next, x, d, **opts):
  """One step of solver `name` from s to s_next (> 0) on x~ (B, 8, 8, 1) with D = d, in float64:
  (mean, standard deviation) per row, read off exactly from the step's own noise z =
  normal(fold_in(KEY, 0)) (the step is mean + sd z, per row)."""
  with jax.enable_x64(True):
    x = jnp.asarray(x, jnp.float64)
    _, traj = SV.sample(
      name,
      lambda x_, s_: jnp.asarray(d, jnp.float64),
      x,
      np.array([s, s_next, 0.0]),
      KEY,
      return_trajectory=True,
      **opts,
    )
    z = np.asarray(jax.random.normal(jax.random.fold_in(KEY, 0), x.shape, jnp.float64))
  out = np.asarray(traj[0]).reshape(len(x), -1)
  z = z.reshape(len(x), -1)
  zc = z - z.mean(1, keepdims=True)
  sd = (zc * (out - out.mean(1, keepdims=True))).sum(1) / (zc**2).sum(1)
  return (out - sd[:, None] * z).mean(1), sd


def posterior_f64(t, s):
  """Float64 abar, posterior mean coefficients and variances over the pairs (t, s), s = -1
  meaning abar = 1: Ho et al. eq. 7 between any two timesteps."""
  abar = np.concatenate([[1.0], np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))])
  at, as_ = abar[t + 1], abar[s + 1]
  beta_ts = 1 - at / as_
  post = beta_ts * (1 - as_) / (1 - at)
  coef_x0, coef_xt = np.sqrt(as_) * beta_ts / (1 - at), np.sqrt(at / as_) * (1 - as_) / (1 - at)
  return at, as_, coef_x0, coef_xt, post, beta_ts


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ddpm_step_over_respaced_pairs_is_the_reverse_kernel(variance):
  """ddpm from s_t to s_s, mapped to the vp state x = x~ alpha, has the mean of q(x_s | x_t,
  x0_hat) and the standard deviation of the kernel, for adjacent and respaced pairs: fixed_small
  beta_{t|s} (1 - abar_s) / (1 - abar_t), fixed_large beta_{t|s} = 1 - abar_t / abar_s. DDIM
  with eta = 1 is the fixed_small step."""
  t = np.array([999, 999, 500, 300, 40, 10, 5])
  s = np.array([998, 979, 250, 299, 0, 3, 1])
  at, as_, c0, ct, post, beta_ts = posterior_f64(t, s)
  sig_t, sig_s = np.sqrt((1 - at) / at), np.sqrt((1 - as_) / as_)
  rng = np.random.default_rng(0)
  x0, xt = rng.uniform(-1, 1, len(t)), rng.normal(size=len(t))
  var = post if variance == "fixed_small" else beta_ts
  for i in range(len(t)):
    xs = np.full((1, 8, 8, 1), xt[i] / np.sqrt(at[i]))
    mean, sd = one_step("ddpm", sig_t[i], sig_s[i], xs, x0[i], variance=variance)
    a_s = np.sqrt(as_[i])
    np.testing.assert_allclose(a_s * mean, c0[i] * x0[i] + ct[i] * xt[i], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(a_s * sd, np.sqrt(var[i]), rtol=1e-9)
    if variance == "fixed_small":
      got = one_step("ddim", sig_t[i], sig_s[i], xs, x0[i], eta=1.0)
      np.testing.assert_allclose(got, (mean, sd), rtol=1e-9, atol=1e-12)


def test_learned_range_step_is_the_improved_ddpm_kernel_on_integer_timesteps():
  """ddpm_learned_range over respaced pairs (then to t = -1): mean of q(x_s | x_t, x0_hat), log
  variance frac log beta_{t|s} + (1 - frac) log beta~, frac = (v + 1) / 2 (float64 closed form,
  float32 tables: rtol 1e-4); no noise on the last step, which returns x0_hat exactly."""
  t = np.array([999, 500, 40, 5])
  s = np.array([979, 250, 0, -1])
  at, as_, c0, ct, post, beta_ts = posterior_f64(t, s)
  rng = np.random.default_rng(1)
  x0, xt, v = rng.uniform(-1, 1, 4), rng.normal(size=4), rng.uniform(-1, 1, 4)
  frac = (v + 1) / 2
  sd = np.exp(0.5 * (frac * np.log(beta_ts) + (1 - frac) * np.log(np.where(s < 0, 1, post))))
  for i in range(4):
    ts = np.array([t[i]] + ([s[i]] if s[i] >= 0 else []))
    grid = np.append(np.asarray(SCH.sqrt_recipm1_alphas_cumprod, np.float64)[ts], 0.0)
    x = jnp.full((1, 8, 8, 1), xt[i] / np.sqrt(at[i]), jnp.float32)
    out = jnp.concatenate([jnp.full_like(x, x0[i]), jnp.full_like(x, v[i])], -1)
    _, traj = SV.sample(
      "ddpm_learned_range",
      lambda x_, s_, out=out: out,
      x,
      grid,
      KEY,
      return_trajectory=True,
      schedule=SCH,
      timesteps=ts,
    )
    if s[i] < 0:
      np.testing.assert_array_equal(traj[0], np.float32(x0[i]))
      continue
    z = np.asarray(jax.random.normal(jax.random.fold_in(KEY, 0), x.shape)).ravel()
    got = np.sqrt(as_[i]) * np.asarray(traj[0], np.float64).ravel()
    want = c0[i] * x0[i] + ct[i] * xt[i] + sd[i] * z
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
  "name,steps,kw",
  [
    ("ddpm", 1000, {}),
    ("ddpm", 250, {"variance": "fixed_large"}),
    ("ddim", 1000, {"eta": 1.0}),
  ],
)
def test_stochastic_samplers_reproduce_gaussian_moments(name, steps, kw):
  n = 20_000
  out = run(name, steps, jax.random.normal(KEY, (n, 1, 1, 2)), key=jax.random.PRNGKey(1), **kw)
  se_mean = np.sqrt(np.diag(SIGMA) / n)
  assert np.all(np.abs(out.mean(0) - MU) < 4.5 * se_mean)
  cov = np.cov(out.T)
  s = np.asarray(SIGMA)
  se_cov = np.sqrt((s * s + np.outer(np.diag(s), np.diag(s))) / n)  # std of sample covariance
  assert np.all(np.abs(cov - s) < 4.5 * se_cov), cov


@pytest.mark.parametrize(
  "name,steps,spacing,tol",
  [
    # Covariance errors measured: dpm_solver++ 20 steps uniform 0.021 (0.18 before its last,
    # large-h step was made first order), trailing 0.019, logsnr 0.015, quadratic 0.014; heun
    # 0.016. For scale: 4.5 standard errors of a 20 000-sample covariance are 0.022 on Sigma_00.
    ("dpm_solver++", 20, "uniform", 0.025),
    ("dpm_solver++", 20, "trailing", 0.025),
    ("dpm_solver++", 20, "logsnr", 0.02),
    ("dpm_solver++", 20, "quadratic", 0.02),
    ("heun", 20, "quadratic", 0.02),
  ],
)
def test_deterministic_samplers_reproduce_gaussian_moments(name, steps, spacing, tol):
  mean, cov = affine_map(name, steps, spacing=spacing)
  # The mean is off by ~0.002 whatever the sampler: x_T ~ N(0, I) ignores sqrt(abar_T) mu.
  np.testing.assert_allclose(mean, MU, atol=0.005)
  np.testing.assert_allclose(cov, SIGMA, atol=tol)


def ddim_gaussian_closed_form(sig):
  """Deterministic DDIM over the grid sig (ending with 0) on N(MU, SIGMA) data, from x_T ~
  N(0, I). In an eigendirection of SIGMA with variance c, z = x_t - alpha_t mu scaled as
  y = z / (alpha sqrt(c)) is white data under noise kappa = sigma / (alpha sqrt(c)) = tan theta,
  and a DDIM step is y' = y (1 + kappa kappa') / (1 + kappa^2), which is the exact flow's
  y sqrt(1 + kappa'^2) / sqrt(1 + kappa^2) times cos(theta - theta'): DDIM is Euler in kappa.
  So z_0 = m z_T, m = prod_i cos(dtheta_i) / sqrt(alpha_T^2 + sigma_T^2 / c): mean MU - alpha_T
  M MU, covariance M M^T."""
  c, vecs = np.linalg.eigh(np.asarray(SIGMA, np.float64))
  a, sg = 1 / np.sqrt(1 + sig**2), sig / np.sqrt(1 + sig**2)
  theta = np.arctan2(sg[None], a[None] * np.sqrt(c)[:, None])  # (eigen, step)
  m = np.prod(np.cos(np.diff(theta, axis=1)), axis=1) / np.sqrt(a[0] ** 2 + sg[0] ** 2 / c)
  mat = vecs @ np.diag(m) @ vecs.T
  return np.asarray(MU) - a[0] * mat @ np.asarray(MU), mat @ mat.T, c, vecs, theta[:, 0]


@pytest.mark.parametrize("spacing", SV.SPACINGS)
def test_ddim_50_has_exactly_its_first_order_bias(spacing):
  """DDIM is first order: each step keeps cos^2(dtheta) of the variance (see the closed form),
  and since the dtheta add up to theta_T ~ pi/2, the variance deficit in every eigendirection
  is at least 1 - cos^(2S)(theta_T / S) ~ (pi/2)^2 / S = 4.8% at S = 50 (equal steps in theta
  attain it). For Sigma's top eigenvalue 0.62 that is a 0.030 absolute error, above the 0.022
  (4.5 standard errors) Monte-Carlo error of a 20 000-sample covariance, so no spacing gets
  DDIM-50 within that Monte-Carlo error; quadratic comes closest (0.031, within 2% of the
  bound), uniform gives 0.043."""
  steps = 50
  mean, cov = affine_map("ddim", steps, spacing=spacing)
  mean_cf, cov_cf, c, vecs, theta_T = ddim_gaussian_closed_form(SV.timestep_grid(SCH, 50, spacing))
  np.testing.assert_allclose(mean, mean_cf, atol=2e-5)
  np.testing.assert_allclose(cov, cov_cf, atol=2e-5)
  kept = np.diag(vecs.T @ cov @ vecs) / c  # variance kept per eigendirection
  abar_T = float(SCH.alphas_cumprod[-1])
  prior = 1 / (abar_T * c + 1 - abar_T)  # ~1: x_T ~ N(0, I) vs the true marginal at T-1
  best = np.cos(theta_T / steps) ** (2 * steps) * prior
  assert np.all(best < 0.953) and np.all(kept <= best + 1e-5), (kept, best)
  if spacing == "quadratic":
    assert np.all(kept > best - 0.02), (kept, best)
    assert np.abs(cov - np.asarray(SIGMA)).max() < 0.033
  else:
    assert np.abs(cov - np.asarray(SIGMA)).max() < 0.05


@pytest.mark.parametrize(
  "name,spacing,steps,order",
  [
    ("ddim", "logsnr", (25, 100), 1),
    ("dpm_solver++", "logsnr", (15, 60), 2),
    ("dpm_solver++", "uniform", (15, 60), 2),
    ("heun", "quadratic", (15, 60), 2),
  ],
)
def test_convergence_order(name, spacing, steps, order):
  """Covariance error shrinks like steps^-order when steps grow 4x (allowing some slack)."""
  errs = [np.abs(affine_map(name, n, spacing=spacing)[1] - np.asarray(SIGMA)).max() for n in steps]
  assert errs[1] < errs[0] / (4**order * 0.6), errs


def test_samplers_find_mixture_weights():
  """Data 0.8 N(-0.6, 0.05^2) + 0.2 N(0.6, 0.05^2): the sample proportions are the weights."""
  w, m, v = (0.8, 0.2), (-0.6, 0.6), 0.05**2

  def denoise(x, s):  # on flat vectors: XLA:CPU is slow on a trailing axis of 2
    xf, var = x.reshape(-1), v + s**2
    # The second component's posterior weight: a sigmoid of the log-likelihood ratio.
    r = jax.nn.sigmoid(np.log(w[1] / w[0]) + ((xf - m[0]) ** 2 - (xf - m[1]) ** 2) / (2 * var))
    x0 = sum(p * (mk + v / var * (xf - mk)) for p, mk in ((1 - r, m[0]), (r, m[1])))
    return x0.reshape(x.shape)

  n = 10_000
  for name, steps, kw in [("ddpm", 1000, {}), ("dpm_solver++", 25, {"spacing": "logsnr"})]:
    x = jax.random.normal(KEY, (n, 1, 1, 1))
    out = run(name, steps, x, denoise=denoise, **kw).ravel()
    assert abs((out > 0).mean() - 0.2) < 4.5 * np.sqrt(0.16 / n)
    assert abs(out[out > 0].std() - 0.05) < 0.01


def test_classifier_free_guidance_combines_predictions():
  def model(x, cond, labels):
    return jnp.zeros_like(x) + labels.astype(x.dtype).reshape(-1, 1, 1, 1)

  labels = jnp.array([2, 5])
  for w in (0.0, 1.0, 3.0):
    x = jnp.zeros((2, 1, 1, 1))
    out = denoiser.guided(model, x, jnp.zeros(2), labels, scale=w, null_label=10, channels=1)
    np.testing.assert_allclose(out.ravel(), 10 + w * (np.array([2, 5]) - 10), rtol=1e-6)


def test_x0_clipping_and_dynamic_thresholding():
  x0 = jnp.full((2, 2, 1, 1), 5.0).at[:, 0].set(0.5)
  get = lambda mode: np.asarray(denoiser.clip_x0(x0, mode))
  assert get("none").max() == 5.0
  assert get("clip").max() == 1.0
  dyn = get("dynamic")  # s = 99.5th percentile of |x0| (about 5): x0 / s
  assert dyn.max() == pytest.approx(1.0, abs=1e-6) and dyn.min() == pytest.approx(0.1, rel=0.02)
  with pytest.raises(ValueError, match="known: none, clip, dynamic"):
    denoiser.clip_x0(x0, "yes")


def test_learned_range_interpolates_between_fixed_variances():
  """v = -1 is fixed_small and v = +1 fixed_large, over 100 respaced steps with the same noise.
  The integer-t step works in the vp state with the tables' coefficients, the ddpm step in
  (x~, s): float32 rounding, compounded over the steps, bounds the agreement (rtol, atol 2e-4)."""
  base = gaussian_denoiser(MU, SIGMA)
  x = jax.random.normal(KEY, (8, 1, 1, 2))
  ts = SV.timesteps(SCH, 100)
  for v, fixed in ((-1.0, "fixed_small"), (1.0, "fixed_large")):
    den = lambda x, s, v=v: jnp.concatenate([base(x, s), jnp.full_like(x, v)], -1)
    got = run("ddpm_learned_range", 100, x, denoise=den, schedule=SCH, timesteps=ts)
    np.testing.assert_allclose(got, run("ddpm", 100, x, variance=fixed), rtol=2e-4, atol=2e-4)


def test_sampling_is_deterministic_by_key_and_compiles_once():
  traces = []
  base = gaussian_denoiser(MU, SIGMA)

  def denoise(x, s):
    traces.append(1)
    return base(x, s)

  sig = SV.timestep_grid(SCH, 20)
  f = jax.jit(lambda x, k: SV.sample("ddpm", denoise, x, sig, k))
  x = jax.random.normal(KEY, (4, 1, 1, 2))
  a, b = f(x, jax.random.PRNGKey(1)), f(x, jax.random.PRNGKey(1))
  c = f(x, jax.random.PRNGKey(2))
  assert len(traces) == 1  # one trace of the loop body, reused for every step and call
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)


def test_trajectory_and_network_evaluations():
  x = jax.random.normal(KEY, (2, 1, 1, 2))
  sig = SV.timestep_grid(SCH, 5)
  final, traj = SV.sample("heun", gaussian_denoiser(MU, SIGMA), x, sig, KEY, return_trajectory=True)
  assert traj.shape == (5, 2, 1, 1, 2)
  np.testing.assert_array_equal(traj[-1], final)
  assert SV.network_evaluations("heun", 5) == 9 and SV.network_evaluations("ddim", 5) == 5
  assert SV.network_evaluations("ddpm_learned_range", 5) == 5
