"""The forward process, posterior and conversions against closed forms and brute force."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from diffusion import gaussian as G
from diffusion import schedules as S

KEY = jax.random.PRNGKey(0)


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
  s = S.make("cosine", 1000)
  x0, xt = 0.3, -0.4
  betas = np.asarray(s.betas, np.float64)  # float64 from here: 1 - abar is ill-conditioned
  abar_prev, beta = np.prod(1 - betas[:t]), betas[t]
  # q(x_{t-1} | x_t, x_0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x_0), on a fine grid in float64.
  grid = np.linspace(-6, 6, 2_000_001)
  logp = (stats.norm.logpdf(xt, np.sqrt(1 - beta) * grid, np.sqrt(beta))
          + stats.norm.logpdf(grid, np.sqrt(abar_prev) * x0, np.sqrt(1 - abar_prev)))
  w = np.exp(logp - logp.max())
  w /= w.sum()
  mean_bf = (w * grid).sum()
  var_bf = (w * (grid - mean_bf) ** 2).sum()
  mean, var, logvar = G.q_posterior(s, jnp.full((1, 1), x0), jnp.full((1, 1), xt), jnp.array([t]))
  assert float(mean[0, 0]) == pytest.approx(mean_bf, abs=1e-5)
  assert float(var[0, 0]) == pytest.approx(var_bf, rel=1e-3)
  assert float(logvar[0, 0]) == pytest.approx(np.log(var_bf), abs=1e-3)


def test_posterior_between_generalises_q_posterior():
  s = S.make("linear", 100)
  t = jnp.array([5, 50, 99])
  x0, xt = jax.random.normal(KEY, (2, 3, 4, 4, 1))
  mean, var, _ = G.q_posterior(s, x0, xt, t)
  m2, v2, _ = G.posterior_between(s, x0=x0, x_t=xt, t=t, s=t - 1)
  np.testing.assert_allclose(m2, mean, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.broadcast_to(v2, var.shape), var, rtol=1e-4)


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
  x = jnp.arange(256) / 127.5 - 1.0
  logp = G.discretized_gaussian_log_likelihood(x, jnp.float32(mean), jnp.float32(log_scale))
  assert float(jnp.exp(logp).sum()) == pytest.approx(1.0, abs=1e-4)
  edges = np.concatenate([[-np.inf], (np.arange(255) + 0.5) / 127.5 - 1.0, [np.inf]])
  d = stats.norm(mean, np.exp(log_scale))  # right of the mean use sf: cdf - cdf cancels there
  want = np.where(x > mean, d.sf(edges[:-1]) - d.sf(edges[1:]),
                  d.cdf(edges[1:]) - d.cdf(edges[:-1]))
  big = want > 1e-20
  np.testing.assert_allclose(np.asarray(logp)[big], np.log(want[big]), rtol=2e-3, atol=2e-4)
