"""denoiser.py: every parameterisation converts to one denoiser; EDM's preconditioning against
Table 1 of Karras et al. (2022); the flow-matching velocity of Gaussian data against its closed
form (float64 NumPy references)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import denoiser

SD = 0.5


def test_edm_preconditioning_matches_table_1_and_its_loss_weight():
  s = np.geomspace(0.002, 80, 13)
  p = denoiser.edm_precond(jnp.asarray(s, jnp.float32), SD)
  np.testing.assert_allclose(p.c_skip, SD**2 / (s**2 + SD**2), rtol=1e-6)
  np.testing.assert_allclose(p.c_out, s * SD / np.sqrt(SD**2 + s**2), rtol=1e-6)
  np.testing.assert_allclose(p.c_in, 1 / np.sqrt(s**2 + SD**2), rtol=1e-6)
  np.testing.assert_allclose(p.c_noise, np.log(s) / 4, rtol=1e-6, atol=1e-7)
  lam = np.asarray(denoiser.edm_loss_weight(jnp.asarray(s, jnp.float32), SD))
  np.testing.assert_allclose(lam, (s**2 + SD**2) / (s * SD) ** 2, rtol=1e-6)
  np.testing.assert_allclose(lam * np.asarray(p.c_out, np.float64) ** 2, 1.0, rtol=1e-5)


@pytest.mark.parametrize("s", [0.002, 0.1, 0.5, 2.0, 80.0])
def test_edm_training_target_has_unit_variance_for_data_of_std_sigma_data(s):
  """Data of standard deviation sigma_data (uniform, not Gaussian: only the variance matters)."""
  key = jax.random.PRNGKey(0)
  x0 = SD * np.sqrt(3) * jax.random.uniform(key, (400_000,), minval=-1, maxval=1)
  eps = jax.random.normal(jax.random.PRNGKey(1), x0.shape)
  tgt = np.asarray(
    denoiser.target(
      "edm", x0=x0, eps=eps, alpha=jnp.float32(1), sigma=jnp.float32(s), sigma_data=SD
    ),
    np.float64,
  )
  assert abs(tgt.var() - 1.0) < 0.01
  # The network input c_in x~ has unit variance too.
  inp = np.asarray(denoiser.network_input("edm", x0 + s * eps, jnp.float32(1), jnp.float32(s), SD))
  assert abs(inp.var() - 1.0) < 0.01


@pytest.mark.parametrize(
  "prediction, alpha, sigma",
  [
    ("eps", 0.8, 0.6),
    ("x0", 0.8, 0.6),
    ("v", 0.6, 0.8),
    ("flow", 0.3, 0.7),
    ("edm", 1.0, 3.0),
    ("edm", 0.6, 0.8),
    ("eps", 1.0, 0.05),
  ],
)
def test_to_x0_inverts_the_target_and_scales_errors_as_stated(prediction, alpha, sigma):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  x0, eps = jax.random.normal(k1, (4, 8)), jax.random.normal(k2, (4, 8))
  a, s = jnp.float32(alpha), jnp.float32(sigma)
  x_t = a * x0 + s * eps
  tgt = denoiser.target(prediction, x0=x0, eps=eps, alpha=a, sigma=s, sigma_data=SD)
  back = denoiser.to_x0(prediction, tgt, x_t=x_t, alpha=a, sigma=s, sigma_data=SD)
  np.testing.assert_allclose(back, x0, rtol=1e-4, atol=1e-4)
  delta = 1e-2 * jax.random.normal(k3, x0.shape)
  moved = denoiser.to_x0(prediction, tgt + delta, x_t=x_t, alpha=a, sigma=s, sigma_data=SD)
  k = float(denoiser.x0_error_scale(prediction, a, s, SD))
  np.testing.assert_allclose(moved - back, k * delta, rtol=2e-3, atol=2e-6)


def test_exact_flow_velocity_of_gaussian_data_equals_the_conversion_of_the_exact_denoiser():
  """x0 ~ N(mu, S), x_t = (1 - t) x0 + t eps. The velocity E[eps - x0 | x_t] from the joint
  Gaussian, against to_x0('flow', ...) of it and the VE-form denoiser D(x~; s) = mu + S (S +
  s^2 I)^-1 (x~ - mu) at x~ = x_t / (1 - t), s = t / (1 - t)."""
  rng = np.random.default_rng(0)
  a = rng.normal(size=(4, 4))
  cov, mu = a @ a.T / 4 + 0.1 * np.eye(4), rng.normal(size=4)
  for t in (0.1, 0.5, 0.9):
    x_t = rng.normal(size=(6, 4))
    m = np.linalg.inv((1 - t) ** 2 * cov + t**2 * np.eye(4))
    r = (x_t - (1 - t) * mu) @ m.T
    e_x0 = mu + (1 - t) * r @ cov.T
    e_eps = t * r
    u = e_eps - e_x0
    s = t / (1 - t)
    den = mu + (x_t / (1 - t) - mu) @ np.linalg.inv(cov + s**2 * np.eye(4)).T @ cov.T
    np.testing.assert_allclose(den, e_x0, rtol=1e-10)
    x0 = denoiser.to_x0(
      "flow",
      jnp.asarray(u, jnp.float32),
      x_t=jnp.asarray(x_t, jnp.float32),
      alpha=jnp.float32(1 - t),
      sigma=jnp.float32(t),
      sigma_data=SD,
    )
    np.testing.assert_allclose(x0, den, rtol=1e-4, atol=1e-5)


def test_v_and_flow_need_their_processes():
  with pytest.raises(ValueError, match="alpha\\^2 \\+ sigma\\^2 = 1"):
    denoiser.check("v", "edm")
  with pytest.raises(ValueError, match="process='flow'"):
    denoiser.check("flow", "ve")
  denoiser.check("edm", "vp")


def test_guidance_is_limited_to_its_interval():
  s = jnp.asarray([0.1, 1.0, 5.0, 50.0])
  np.testing.assert_array_equal(
    denoiser.guidance_scale_at(s, 3.0, (0.5, 10.0)), [1.0, 3.0, 3.0, 1.0]
  )
