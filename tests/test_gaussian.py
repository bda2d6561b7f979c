"""The forward process, posterior and conversions against closed forms and brute force."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import gaussian as G
from diffusion import schedules as S

KEY = jax.random.PRNGKey(0)
# Compiled once per shape and variance (eager calls compile every operation on its own).
p_mean_logvar = jax.jit(G.p_mean_logvar, static_argnames="variance")
q_posterior = jax.jit(G.q_posterior)
posterior_between = jax.jit(G.posterior_between)


def test_q_sample_monte_carlo_moments():
  s = S.make("linear", 1000)
  n = 200_000
  x0 = jnp.full((n, 1, 1, 1), 0.7)
  for t in (0, 250, 999):
    xt = np.asarray(G.q_sample(s, x0, jnp.full((n,), t), jax.random.normal(KEY, x0.shape)))
    abar = float(s.alphas_cumprod[t])
    sd = np.sqrt(1 - abar)
    assert abs(xt.mean() - np.sqrt(abar) * 0.7) < 5 * sd / np.sqrt(n)
    assert abs(xt.var() - (1 - abar)) < 5 * (1 - abar) * np.sqrt(2 / n)


def test_one_step_kernel_is_sqrt_one_minus_beta():
  s = S.make("linear", 1000)
  mean, var = G.q_step_mean_variance(s, jnp.ones((1, 1)), jnp.array([500]))
  beta = float(s.betas[500])
  assert float(mean[0, 0]) == pytest.approx(np.sqrt(1 - beta), rel=1e-6)  # not sqrt(beta)
  assert float(var[0, 0]) == pytest.approx(beta, rel=1e-6)


def test_composed_one_step_kernels_give_the_closed_form():
  T, n = 50, 100_000
  s = S.make("linear", T)
  x0 = jnp.linspace(-1, 1, n).reshape(n, 1)

  def body(x, inp):
    t, k = inp
    x = G.q_step_sample(s, x, jnp.full((n,), t), jax.random.normal(k, x.shape))
    return x, x

  _, xs = jax.lax.scan(body, x0, (jnp.arange(T), jax.random.split(KEY, T)))
  for t in (0, 20, T - 1):
    abar = float(s.alphas_cumprod[t])
    resid = np.asarray(xs[t] - np.sqrt(abar) * x0)  # should be N(0, 1 - abar) independent of x0
    assert abs(resid.mean()) < 5 * np.sqrt((1 - abar) / n)
    assert abs(resid.var() - (1 - abar)) < 5 * (1 - abar) * np.sqrt(2 / n)
    slope = np.polyfit(np.asarray(x0[:, 0]), np.asarray(xs[t][:, 0]), 1)[0]
    assert slope == pytest.approx(np.sqrt(abar), abs=0.02)


@pytest.mark.parametrize("t", [1, 10, 400, 999])
def test_posterior_matches_brute_force_product_of_gaussians(t):
  from scipy import stats  # here: a slow import for every worker collecting the suite

  s = S.make("cosine", 1000)
  x0, xt = 0.3, -0.4
  betas = np.asarray(s.betas, np.float64)  # float64 from here: 1 - abar is ill-conditioned
  abar_prev, beta = np.prod(1 - betas[:t]), betas[t]
  # q(x_{t-1} | x_t, x_0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x_0), on a fine grid in float64.
  grid = np.linspace(-6, 6, 2_000_001)
  logp = stats.norm.logpdf(xt, np.sqrt(1 - beta) * grid, np.sqrt(beta)) + stats.norm.logpdf(
    grid, np.sqrt(abar_prev) * x0, np.sqrt(1 - abar_prev)
  )
  w = np.exp(logp - logp.max())
  w /= w.sum()
  mean_bf = (w * grid).sum()
  var_bf = (w * (grid - mean_bf) ** 2).sum()
  mean, var, logvar = q_posterior(s, jnp.full((1, 1), x0), jnp.full((1, 1), xt), jnp.array([t]))
  assert float(mean[0, 0]) == pytest.approx(mean_bf, abs=1e-5)
  assert float(var[0, 0]) == pytest.approx(var_bf, rel=1e-3)
  assert float(logvar[0, 0]) == pytest.approx(np.log(var_bf), abs=1e-3)


def reverse_f64(schedule, t, s, x0, xt, v=None):
  """The reverse kernel over pairs (t, s), s = -1 the clean data, in float64 NumPy from the
  betas: posterior mean, and the log-variances {fixed_small, fixed_large, learned_range} with
  DDPM's decoder value log beta~_1 at s = -1 (for fixed_large too; learned_range keeps
  log(1 - abar_t) as its upper end). t, s: (B,) ints; x0, xt, v: (B, D)."""
  betas = np.asarray(schedule.betas, np.float64)
  abar = np.concatenate([[1.0], np.cumprod(1.0 - betas)])  # abar[k + 1] = abar_k, abar_{-1} = 1
  at, as_ = abar[t + 1][:, None], abar[s + 1][:, None]
  beta_ts = 1.0 - at / as_
  mean = (np.sqrt(as_) * beta_ts * x0 + np.sqrt(at / as_) * (1 - as_) * xt) / (1 - at)
  decoder = np.log(betas[1] * (1 - abar[1]) / (1 - abar[2]))  # log beta~_1
  clean = (s < 0)[:, None]
  with np.errstate(divide="ignore"):
    small = np.where(clean, decoder, np.log(beta_ts * (1 - as_) / (1 - at)))
  logvar = {"fixed_small": small, "fixed_large": np.where(clean, decoder, np.log(beta_ts))}
  if v is not None:
    frac = (v + 1) / 2
    logvar["learned_range"] = frac * np.log(beta_ts) + (1 - frac) * small
  return mean, {k: np.broadcast_to(lv, mean.shape) for k, lv in logvar.items()}


def kernel_inputs(t, s, d=5, key=KEY):
  k1, k2, k3 = jax.random.split(key, 3)
  shape = (len(t), 1, 1, d)
  x0 = jax.random.uniform(k1, shape, minval=-1, maxval=1)
  xt, v = jax.random.normal(k2, shape), jax.random.uniform(k3, shape, minval=-1, maxval=1)
  flat = lambda a: np.asarray(a, np.float64).reshape(len(t), d)
  return (x0, xt, v), (flat(x0), flat(xt), flat(v)), (jnp.array(t), jnp.array(s))


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("variance", G.VARIANCES)
def test_reverse_kernel_at_adjacent_steps_is_the_closed_form(name, variance):
  """s = t - 1, the VLB's case: the posterior mean, log beta~_t (clipped to log beta~_1 at t = 0),
  log beta_t (log beta~_1 at t = 0 for fixed_large) and their interpolation, each in float64;
  q_posterior gives the same mean, beta~_t and clipped log."""
  sch = S.make(name, 1000)
  t = np.array([0, 1, 2, 10, 300, 500, 998, 999])
  (x0, xt, v), (x0n, xtn, vn), (tj, sj) = kernel_inputs(t, t - 1)
  mean_want, logvar_want = reverse_f64(sch, t, t - 1, x0n, xtn, vn)
  mean, logvar = p_mean_logvar(
    sch, x0=x0, x_t=xt, t=tj, s=sj, variance=variance, v=v if variance == "learned_range" else None
  )
  assert mean.shape == logvar.shape == x0.shape
  np.testing.assert_allclose(np.asarray(mean).reshape(x0n.shape), mean_want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
    np.asarray(logvar).reshape(x0n.shape), logvar_want[variance], rtol=0, atol=5e-6
  )
  qm, qv, qlv = q_posterior(sch, x0, xt, tj)
  np.testing.assert_allclose(np.asarray(qm).reshape(x0n.shape), mean_want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
    np.log(np.asarray(qv, np.float64)[1:]).reshape(xtn[1:].shape),
    logvar_want["fixed_small"][1:],
    rtol=0,
    atol=5e-6,
  )
  assert np.all(np.asarray(qv)[0] == 0.0)  # t = 0: the posterior is the point mass at x0
  np.testing.assert_allclose(
    np.asarray(qlv).reshape(x0n.shape), logvar_want["fixed_small"], rtol=0, atol=5e-6
  )


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_reverse_kernel_over_respaced_pairs_is_the_closed_form(name):
  """Any pair s < t (a respaced sampler): fixed_large's variance is 1 - abar_t / abar_s, fixed_small
  the posterior's beta_{t|s} (1 - abar_s) / (1 - abar_t), and learned_range interpolates their
  logs linearly in frac = (v + 1) / 2: v = -1 and 1 give the two fixed ones, v = 0 their geometric
  mean. Pairs near each other (500, 498) are where 1 - abar_t / abar_s cancels in float32."""
  sch = S.make(name, 1000)
  t = np.array([999, 999, 999, 500, 500, 300, 40, 10, 2])
  s = np.array([979, 500, 0, 498, 250, 100, 0, 3, 0])
  (x0, xt, v), (x0n, xtn, vn), (tj, sj) = kernel_inputs(t, s)
  mean_want, logvar_want = reverse_f64(sch, t, s, x0n, xtn, vn)
  beta_ts = 1.0 - (
    np.cumprod(1 - np.asarray(sch.betas, np.float64))[t]
    / np.cumprod(1 - np.asarray(sch.betas, np.float64))[s]
  )
  np.testing.assert_allclose(np.exp(logvar_want["fixed_large"][:, 0]), beta_ts, rtol=1e-12)
  got = {}
  for variance in G.VARIANCES:
    mean, logvar = p_mean_logvar(sch, x0=x0, x_t=xt, t=tj, s=sj, variance=variance, v=v)
    got[variance] = np.asarray(logvar, np.float64).reshape(x0n.shape)
    np.testing.assert_allclose(np.asarray(mean).reshape(x0n.shape), mean_want, rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(got[variance], logvar_want[variance], rtol=0, atol=3e-5)
  for v_end, fixed in ((-1.0, "fixed_small"), (1.0, "fixed_large")):
    _, logvar = p_mean_logvar(
      sch, x0=x0, x_t=xt, t=tj, s=sj, variance="learned_range", v=jnp.full_like(v, v_end)
    )
    np.testing.assert_allclose(
      np.asarray(logvar).reshape(x0n.shape), logvar_want[fixed], rtol=0, atol=3e-5
    )
  _, logvar = p_mean_logvar(
    sch, x0=x0, x_t=xt, t=tj, s=sj, variance="learned_range", v=jnp.zeros_like(v)
  )
  geo = 0.5 * (logvar_want["fixed_small"] + logvar_want["fixed_large"])
  np.testing.assert_allclose(np.asarray(logvar).reshape(x0n.shape), geo, rtol=0, atol=3e-5)
  assert np.all(got["fixed_small"] < got["fixed_large"])  # beta~ < beta_{t|s} for s >= 0


@pytest.mark.parametrize("variance", G.VARIANCES)
def test_reverse_kernel_to_the_clean_data_is_the_ddpm_decoder(variance):
  """s = -1 (the VLB's decoder at t = 0; a sampler's last step from any t): the mean is x0
  exactly; fixed_small and fixed_large take log beta~_1, DDPM's clipped value; learned_range
  interpolates to log(1 - abar_t) (log beta_0 at t = 0, as improved DDPM). All finite."""
  sch = S.make("linear", 1000)
  t = np.array([0, 1, 37, 999])
  (x0, xt, v), (x0n, xtn, vn), (tj, sj) = kernel_inputs(t, np.full(4, -1))
  _, logvar_want = reverse_f64(sch, t, np.full(4, -1), x0n, xtn, vn)
  mean, logvar = p_mean_logvar(sch, x0=x0, x_t=xt, t=tj, s=sj, variance=variance, v=v)
  np.testing.assert_array_equal(mean, x0)
  np.testing.assert_allclose(
    np.asarray(logvar).reshape(x0n.shape), logvar_want[variance], rtol=0, atol=5e-6
  )
  betas = np.asarray(sch.betas, np.float64)
  decoder = np.log(betas[1] * betas[0] / (1 - (1 - betas[0]) * (1 - betas[1])))
  if variance != "learned_range":
    np.testing.assert_allclose(np.asarray(logvar), decoder, rtol=0, atol=5e-6)
  m, var, beta_ts = posterior_between(sch, x0=x0, x_t=xt, t=tj, s=sj)
  np.testing.assert_array_equal(m, x0)
  assert np.all(np.asarray(var) == 0.0)
  np.testing.assert_allclose(np.asarray(beta_ts).ravel(), 1 - np.cumprod(1 - betas)[t], rtol=1e-6)


def test_reverse_kernel_rejects_bad_variances():
  sch, x = S.make("linear", 100), jnp.zeros((1, 1))
  with pytest.raises(ValueError, match="known: fixed_small, fixed_large, learned_range"):
    G.p_mean_logvar(sch, x0=x, x_t=x, t=jnp.array([3]), s=jnp.array([2]), variance="large")
  with pytest.raises(ValueError, match="needs v"):
    G.p_mean_logvar(sch, x0=x, x_t=x, t=jnp.array([3]), s=jnp.array([2]), variance="learned_range")


def test_alpha_sigma_at_minus_one_is_clean():
  s = S.make("linear", 100)
  a, sg = G.alpha_sigma(s, jnp.array([-1, 3]), 4)
  assert a.shape == (2, 1, 1, 1)
  assert float(a[0, 0, 0, 0]) == 1.0 and float(sg[0, 0, 0, 0]) == 0.0
  assert float(a[1, 0, 0, 0]) ** 2 == pytest.approx(float(s.alphas_cumprod[3]), rel=1e-6)


def test_conversions_round_trip():
  k1, k2, k3 = jax.random.split(KEY, 3)
  x0 = jax.random.normal(k1, (8, 4, 4, 3))
  eps = jax.random.normal(k2, x0.shape)
  lam = jax.random.uniform(k3, (8,), minval=-8, maxval=8)
  a, s = G.alpha_sigma_from_log_snr(lam, 4)
  np.testing.assert_allclose(a**2 + s**2, 1.0, rtol=1e-6)
  xt = a * x0 + s * eps
  v = G.v_from_eps_x0(eps=eps, x0=x0, alpha=a, sigma=s)
  close = lambda p, q: np.testing.assert_allclose(p, q, rtol=1e-3, atol=2e-3)
  close(G.x0_from_eps(xt, eps, alpha=a, sigma=s), x0)
  close(G.eps_from_x0(xt, x0, alpha=a, sigma=s), eps)
  close(G.x0_from_v(xt, v, alpha=a, sigma=s), x0)
  close(G.eps_from_v(xt, v, alpha=a, sigma=s), eps)
  close(G.eps_from_score(G.score_from_eps(eps, sigma=s), sigma=s), eps)
  for kind in G.PREDICTIONS:
    target = G.prediction_target(kind, x0, eps, a, s)
    x0_hat, eps_hat = G.split_prediction(kind, target, xt, a, s)
    close(x0_hat, x0)
    close(eps_hat, eps)


def test_v_is_the_velocity_of_x_t_along_the_noise_angle():
  """Salimans & Ho: with (alpha, sigma) = (cos phi, sin phi), v = d x_t / d phi."""
  x0, eps, phi = 0.4, -1.1, 0.7
  x_of_phi = lambda p: jnp.cos(p) * x0 + jnp.sin(p) * eps
  v = G.v_from_eps_x0(eps=eps, x0=x0, alpha=np.cos(phi), sigma=np.sin(phi))
  assert float(v) == pytest.approx(float(jax.grad(x_of_phi)(phi)), rel=1e-5)


def test_confusable_arguments_are_keyword_only():
  x, a, s = jnp.ones((1, 1)), jnp.full((1, 1), 0.8), jnp.full((1, 1), 0.6)
  for f in (G.x0_from_eps, G.eps_from_x0, G.x0_from_v, G.eps_from_v):
    with pytest.raises(TypeError):
      f(x, x, a, s)  # alpha, sigma positionally: swapped they would run and be wrong
  with pytest.raises(TypeError):
    G.v_from_eps_x0(x, x, alpha=a, sigma=s)
  with pytest.raises(TypeError):
    G.posterior_between(S.make("linear", 100), 5, 4, x, x)  # q_posterior's order differs
  assert float(G.x0_from_eps(x, x, alpha=a, sigma=s)[0, 0]) == pytest.approx((1 - 0.6) / 0.8)


def test_score_is_the_gradient_of_the_log_density():
  a, s, x0 = 0.8, 0.6, 0.25
  logq = lambda x: jax.scipy.stats.norm.logpdf(x, a * x0, s)
  x = 1.3
  eps = (x - a * x0) / s
  assert float(G.score_from_eps(eps, sigma=s)) == pytest.approx(float(jax.grad(logq)(x)), rel=1e-5)


def test_normal_kl_closed_form():
  m1, v1, m2, v2 = 0.3, 0.5, -0.2, 2.0
  want = np.log(np.sqrt(v2 / v1)) + (v1 + (m1 - m2) ** 2) / (2 * v2) - 0.5
  got = G.normal_kl(m1, np.log(v1), m2, np.log(v2))
  assert float(got) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("mean,log_scale", [(0.0, -3.0), (0.93, -6.0), (-0.5, 0.5), (0.2, -9.0)])
def test_discretized_likelihood_is_normalised_and_matches_cdf(mean, log_scale):
  from scipy import stats  # here: a slow import for every worker collecting the suite

  x = jnp.arange(256) / 127.5 - 1.0
  logp = G.discretized_gaussian_log_likelihood(x, jnp.float32(mean), jnp.float32(log_scale))
  assert float(jnp.exp(logp).sum()) == pytest.approx(1.0, abs=1e-4)
  edges = np.concatenate([[-np.inf], (np.arange(255) + 0.5) / 127.5 - 1.0, [np.inf]])
  d = stats.norm(mean, np.exp(log_scale))  # right of the mean use sf: cdf - cdf cancels there
  want = np.where(
    x > mean, d.sf(edges[:-1]) - d.sf(edges[1:]), d.cdf(edges[1:]) - d.cdf(edges[:-1])
  )
  big = want > 1e-20
  np.testing.assert_allclose(np.asarray(logp)[big], np.log(want[big]), rtol=2e-3, atol=2e-4)
