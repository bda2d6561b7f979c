"""Samplers with exact denoisers of known data: no training needed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import gaussian as G
from diffusion import samplers as SM
from diffusion import schedules as S

KEY = jax.random.PRNGKey(0)
SCH = S.make("linear", 1000)
MU = jnp.array([0.5, -0.3])
SIGMA = jnp.array([[0.5, 0.2], [0.2, 0.3]])


def gaussian_model(schedule, mu, cov):
  """Exact eps-denoiser for x0 ~ N(mu, cov), images shaped (B, 1, 1, D). With cov = Q diag(lam) Q^T
  (eigendecomposed once, in float64): E[x0 | x_t] = mu + Q diag(a lam / (a^2 lam + s^2)) Q^T
  (x_t - a mu), no per-sample matrix inverse."""
  lam, q = np.linalg.eigh(np.asarray(cov, np.float64))
  lam, q = jnp.asarray(lam, jnp.float32), jnp.asarray(q, jnp.float32)

  def model(x, cond, labels):
    a, s = G.alpha_sigma(schedule, cond.astype(jnp.int32), 2)
    xf = x.reshape(x.shape[0], -1)
    x0 = mu + ((xf - a * mu) @ q * (a * lam / (a**2 * lam + s**2))) @ q.T
    return ((xf - a * x0) / s).reshape(x.shape)

  return model


def run(name, steps, x, key=KEY, schedule=SCH, model=None, **kw):
  model = model or gaussian_model(schedule, MU, SIGMA)
  f = jax.jit(lambda x, k: SM.sample(name, model, schedule, x, k, num_steps=steps, **kw))
  return np.asarray(f(x, key)).reshape(x.shape[0], -1)


def affine_map(name, steps, **kw):
  """A deterministic sampler on Gaussian data is x0 = M x_T + b: exact mean b, covariance M M^T."""
  basis = jnp.concatenate([jnp.zeros((1, 2)), jnp.eye(2)]).reshape(3, 1, 1, 2)
  out = run(name, steps, basis, **kw)
  m = (out[1:] - out[0]).T
  return out[0], m @ m.T


@pytest.mark.parametrize("spacing", SM.SPACINGS)
@pytest.mark.parametrize("steps", [1, 7, 50, 1000])
def test_timesteps_are_a_decreasing_subsequence(spacing, steps):
  ts = SM.timesteps(SCH, steps, spacing)
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
  for spacing in SM.SPACINGS:
    for steps in range(1, T + 1):
      ts = SM.timesteps(sch, steps, spacing)
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
  np.testing.assert_array_equal(SM.timesteps(sch, steps, "uniform"), sorted(uniform)[::-1])
  np.testing.assert_array_equal(SM.timesteps(sch, steps, "trailing"), trailing)
  np.testing.assert_array_equal(SM.timesteps(sch, steps, "leading"), leading[::-1])


def test_timesteps_errors():
  with pytest.raises(ValueError, match="known: uniform"):
    SM.timesteps(SCH, 10, "cubic")
  with pytest.raises(ValueError, match="num_steps"):
    SM.timesteps(SCH, 1001)


def test_ddim_step_closed_form_on_white_data():
  """x0 ~ N(0, I): x0_hat = alpha x, eps_hat = sigma x, so a deterministic DDIM step multiplies x
  by alpha_prev alpha + sigma_prev sigma = cos(theta_prev - theta), theta = atan2(sigma, alpha)."""
  x = jax.random.normal(KEY, (4, 1, 1, 2))
  model = gaussian_model(SCH, jnp.zeros(2), jnp.eye(2))
  out = run("ddim", 50, x, model=model)
  ts = SM.timesteps(SCH, 50)
  abar = np.append(np.asarray(SCH.alphas_cumprod, np.float64)[ts], 1.0)
  theta = np.arctan2(np.sqrt(1 - abar), np.sqrt(abar))
  factor = np.prod(np.cos(np.diff(theta)))
  np.testing.assert_allclose(out, factor * np.asarray(x).reshape(4, 2), rtol=2e-4)


def test_ddim_step_eta_one_has_the_posterior_variance_and_ends_at_x0():
  x = jax.random.normal(KEY, (3, 2, 2, 1))
  eps = jax.random.normal(jax.random.PRNGKey(1), x.shape)
  t, tp = jnp.array([10, 500, 999]), jnp.array([9, 499, 998])
  spread = SM.ddim_step(SCH, x, t, tp, eps, 1.0, jnp.ones_like(x)) - SM.ddim_step(
    SCH, x, t, tp, eps, 1.0, jnp.zeros_like(x)
  )
  np.testing.assert_allclose(spread[:, 0, 0, 0], np.sqrt(SCH.posterior_variance[t]), rtol=1e-4)
  a, s = G.alpha_sigma(SCH, t, 4)
  end = SM.ddim_step(SCH, x, t, jnp.full(3, -1), eps, 0.0, jnp.zeros_like(x))
  np.testing.assert_allclose(end, G.x0_from_eps(x, eps, alpha=a, sigma=s), rtol=1e-5, atol=1e-5)


def test_full_ddpm_step_is_the_true_posterior():
  x0 = jax.random.normal(KEY, (3, 2, 2, 1))
  xt = jax.random.normal(jax.random.PRNGKey(1), x0.shape)
  t = jnp.array([1, 300, 999])
  d = SM.Denoised(x0, jnp.zeros_like(x0), jnp.zeros_like(x0))
  mean, var, _ = G.q_posterior(SCH, x0, xt, t)
  step0 = SM.ddpm_step(SCH, xt, t, t - 1, d, variance="fixed_small", noise=jnp.zeros_like(x0))
  step1 = SM.ddpm_step(SCH, xt, t, t - 1, d, variance="fixed_small", noise=jnp.ones_like(x0))
  np.testing.assert_allclose(step0, mean, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose((step1 - step0) ** 2, var, rtol=1e-3)


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large", "learned_range"])
def test_ddpm_step_over_respaced_pairs_is_the_reverse_kernel(variance):
  """ddpm_step with noise 0 is the posterior mean of q(x_s | x_t, x0_hat), and noise 1 adds the
  kernel's standard deviation, for adjacent and respaced pairs (float64 closed forms): fixed_small
  beta_{t|s} (1 - abar_s) / (1 - abar_t), fixed_large beta_{t|s} = 1 - abar_t / abar_s,
  learned_range exp(frac log of the second + (1 - frac) log of the first), frac = (v + 1) / 2.
  The last step (s = -1) returns x0_hat exactly, whatever the noise. DDIM with eta = 1 adds the
  fixed_small standard deviation."""
  t = np.array([999, 999, 500, 300, 40, 10, 5])
  s = np.array([998, 979, 250, 299, 0, 3, -1])
  k1, k2, k3 = jax.random.split(KEY, 3)
  x0 = jax.random.uniform(k1, (7, 1, 1, 2), minval=-1, maxval=1)
  xt, v = jax.random.normal(k2, x0.shape), jax.random.uniform(k3, x0.shape, minval=-1, maxval=1)
  d = SM.Denoised(x0, jnp.zeros_like(x0), jnp.concatenate([jnp.zeros_like(x0), v], -1))
  step = lambda nz: np.asarray(
    SM.ddpm_step(
      SCH, xt, jnp.array(t), jnp.array(s), d, variance=variance, noise=jnp.full_like(xt, nz)
    )
  )
  abar = np.concatenate([[1.0], np.cumprod(1 - np.asarray(SCH.betas, np.float64))])
  at, as_ = abar[t + 1][:, None, None, None], abar[s + 1][:, None, None, None]
  x0n, xtn, vn = (np.asarray(a, np.float64) for a in (x0, xt, v))
  beta_ts, post = 1 - at / as_, (1 - at / as_) * (1 - as_) / (1 - at)
  mean = (np.sqrt(as_) * beta_ts * x0n + np.sqrt(at / as_) * (1 - as_) * xtn) / (1 - at)
  log_post = np.log(np.where(as_ < 1, post, 1.0))  # s = -1 (variance 0) is checked apart
  frac = (vn + 1) / 2
  var = {
    "fixed_small": post,
    "fixed_large": beta_ts,
    "learned_range": np.exp(frac * np.log(beta_ts) + (1 - frac) * log_post),
  }[variance]
  step0, step1 = step(0.0), step(1.0)
  np.testing.assert_allclose(step0[:-1], mean[:-1], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
    (step1 - step0)[:-1], np.broadcast_to(np.sqrt(var), mean.shape)[:-1], rtol=1e-4, atol=1e-6
  )
  np.testing.assert_array_equal(step0[-1], x0[-1])
  np.testing.assert_array_equal(step1[-1], x0[-1])
  if variance == "fixed_small":
    a_t, sg_t = G.alpha_sigma(SCH, jnp.array(t), 4)
    eps = G.eps_from_x0(xt, x0, alpha=a_t, sigma=sg_t)
    spread = SM.ddim_step(
      SCH, xt, jnp.array(t), jnp.array(s), eps, 1.0, jnp.ones_like(xt)
    ) - SM.ddim_step(SCH, xt, jnp.array(t), jnp.array(s), eps, 1.0, jnp.zeros_like(xt))
    np.testing.assert_allclose(
      np.asarray(spread)[:, 0, 0, 0], np.sqrt(post[:, 0, 0, 0]), rtol=1e-4, atol=1e-6
    )


@pytest.mark.parametrize(
  "name,steps,kw",
  [("ddpm", 1000, {}), ("ddpm", 250, {"variance": "fixed_large"}), ("ddim", 1000, {"eta": 1.0})],
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


def ddim_gaussian_closed_form(ts):
  """Deterministic DDIM over the grid ts (then to t = -1) on N(MU, SIGMA) data, from x_T ~
  N(0, I). In an eigendirection of SIGMA with variance c, z = x_t - alpha_t mu scaled as
  y = z / (alpha sqrt(c)) is white data under noise kappa = sigma / (alpha sqrt(c)) = tan theta,
  and a DDIM step is y' = y (1 + kappa kappa') / (1 + kappa^2), which is the exact flow's
  y sqrt(1 + kappa'^2) / sqrt(1 + kappa^2) times cos(theta - theta'): DDIM is Euler in kappa.
  So z_0 = m z_T, m = prod_i cos(dtheta_i) /
  sqrt(alpha_T^2 + sigma_T^2 / c): mean MU - alpha_T M MU, covariance M M^T."""
  c, vecs = np.linalg.eigh(np.asarray(SIGMA, np.float64))
  abar = np.append(np.asarray(SCH.alphas_cumprod, np.float64)[ts], 1.0)
  a, sg = np.sqrt(abar), np.sqrt(1 - abar)
  theta = np.arctan2(sg[None], a[None] * np.sqrt(c)[:, None])  # (eigen, step)
  m = np.prod(np.cos(np.diff(theta, axis=1)), axis=1) / np.sqrt(a[0] ** 2 + sg[0] ** 2 / c)
  mat = vecs @ np.diag(m) @ vecs.T
  return np.asarray(MU) - a[0] * mat @ np.asarray(MU), mat @ mat.T, c, vecs, theta[:, 0]


@pytest.mark.parametrize("spacing", SM.SPACINGS)
def test_ddim_50_has_exactly_its_first_order_bias(spacing):
  """DDIM is first order: each step keeps cos^2(dtheta) of the variance (see the closed form),
  and since the dtheta add up to theta_T ~ pi/2, the variance deficit in every eigendirection
  is at least 1 - cos^(2S)(theta_T / S) ~ (pi/2)^2 / S = 4.8% at S = 50 (equal steps in theta
  attain it). For Sigma's top eigenvalue 0.62 that is a 0.030 absolute error, above the 0.022
  (4.5 standard errors) Monte-Carlo error of a 20 000-sample covariance, so no spacing gets
  DDIM-50 within that Monte-Carlo error; quadratic comes closest (0.031, within 2% of the
  bound), uniform gives 0.043."""
  steps = 50
  ts = SM.timesteps(SCH, steps, spacing)
  mean, cov = affine_map("ddim", steps, spacing=spacing)
  mean_cf, cov_cf, c, vecs, theta_T = ddim_gaussian_closed_form(ts)
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

  def model(x, cond, labels):  # on flat vectors: XLA:CPU is slow on a trailing axis of 2
    a, s = G.alpha_sigma(SCH, cond.astype(jnp.int32), 1)
    xf, var = x.reshape(-1), a**2 * v + s**2
    # The second component's posterior weight: a sigmoid of the log-likelihood ratio.
    r = jax.nn.sigmoid(
      np.log(w[1] / w[0]) + ((xf - a * m[0]) ** 2 - (xf - a * m[1]) ** 2) / (2 * var)
    )
    x0 = sum(p * (mk + a * v / var * (xf - a * mk)) for p, mk in ((1 - r, m[0]), (r, m[1])))
    return ((xf - a * x0) / s).reshape(x.shape)

  n = 10_000
  for name, steps, kw in [("ddpm", 1000, {}), ("dpm_solver++", 25, {"spacing": "logsnr"})]:
    out = run(name, steps, jax.random.normal(KEY, (n, 1, 1, 1)), model=model, **kw).ravel()
    assert abs((out > 0).mean() - 0.2) < 4.5 * np.sqrt(0.16 / n)
    assert abs(out[out > 0].std() - 0.05) < 0.01


def test_classifier_free_guidance_combines_predictions():
  def model(x, cond, labels):
    return jnp.zeros_like(x) + labels.astype(x.dtype).reshape(-1, 1, 1, 1)

  labels = jnp.array([2, 5])
  for w in (0.0, 1.0, 3.0):
    den = SM.make_denoiser(model, SCH, labels=labels, guidance_scale=w, null_label=10)
    eps = den(jnp.zeros((2, 1, 1, 1)), jnp.int32(500)).eps.ravel()
    np.testing.assert_allclose(eps, 10 + w * (np.array([2, 5]) - 10), rtol=1e-6)


def test_x0_clipping_and_dynamic_thresholding():
  model = lambda x, c, y: jnp.full_like(x, 5.0).at[:, 0].set(0.5)
  x = jnp.zeros((2, 2, 1, 1))
  get = lambda mode: np.asarray(
    SM.make_denoiser(model, SCH, prediction="x0", clip_x0=mode)(x, jnp.int32(10)).x0
  )
  assert get("none").max() == 5.0
  assert get("clip").max() == 1.0
  dyn = get("dynamic")  # s = 99.5th percentile of |x0| (about 5): x0 / s
  assert dyn.max() == pytest.approx(1.0, abs=1e-6) and dyn.min() == pytest.approx(0.1, rel=0.02)
  with pytest.raises(ValueError, match="known: none, clip, dynamic"):
    SM.make_denoiser(model, SCH, clip_x0="yes")


def test_learned_range_interpolates_between_fixed_variances():
  base = gaussian_model(SCH, MU, SIGMA)
  x = jax.random.normal(KEY, (8, 1, 1, 2))
  for v, fixed in ((-1.0, "fixed_small"), (1.0, "fixed_large")):
    model = lambda x, c, y, v=v: jnp.concatenate([base(x, c, y), jnp.full_like(x, v)], -1)
    got = run("ddpm", 100, x, model=model, variance="learned_range")
    np.testing.assert_allclose(got, run("ddpm", 100, x, variance=fixed), rtol=1e-4, atol=1e-4)


def test_sampling_is_deterministic_by_key_and_compiles_once():
  traces = []
  base = gaussian_model(SCH, MU, SIGMA)

  def model(x, c, y):
    traces.append(1)
    return base(x, c, y)

  f = jax.jit(lambda x, k: SM.sample("ddpm", model, SCH, x, k, num_steps=20))
  x = jax.random.normal(KEY, (4, 1, 1, 2))
  a, b = f(x, jax.random.PRNGKey(1)), f(x, jax.random.PRNGKey(1))
  c = f(x, jax.random.PRNGKey(2))
  assert len(traces) == 1  # one trace of the loop body, reused for every step and call
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)


def test_trajectory_and_network_evaluations():
  x = jax.random.normal(KEY, (2, 1, 1, 2))
  model = gaussian_model(SCH, MU, SIGMA)
  final, traj = SM.sample("heun", model, SCH, x, KEY, num_steps=5, return_trajectory=True)
  assert traj.shape == (5, 2, 1, 1, 2)
  np.testing.assert_array_equal(traj[-1], final)
  assert SM.network_evaluations("heun", 5) == 9 and SM.network_evaluations("ddim", 5) == 5


def test_unknown_sampler_lists_known_ones():
  with pytest.raises(ValueError, match="known samplers: ddpm, ddim, dpm_solver\\+\\+, heun"):
    SM.sample("euler", lambda x, c, y: x, SCH, jnp.zeros((1, 1, 1, 1)), KEY, num_steps=2)
