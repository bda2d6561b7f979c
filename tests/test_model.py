"""model.py: Diffusion is built once from the config, checks every name and shape before
compiling anything, and is the only place that maps config fields to library arguments."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from diffusion import checkpoints, denoiser, unet
from diffusion.model import Diffusion, SampleSettings


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("diffusion.schedule", "cosin", "unknown schedule 'cosin'"),
    ("diffusion.prediction", "noise", "config.diffusion.prediction 'noise'"),
    ("diffusion.weighting", "snr", "config.diffusion.weighting 'snr'"),
    ("diffusion.variance", "large", "config.diffusion.variance 'large'"),
    ("diffusion.t_sampling", "sobol", "config.diffusion.t_sampling 'sobol'"),
    ("data.image_size", 9, "image size 9x9 cannot be halved"),
    ("data.channels", 2, "config.data.channels must be 1 or 3"),
    ("model.num_groups", 5, "GroupNorm cannot split"),
  ],
)
def test_unknown_names_and_impossible_shapes_are_clear_errors(field, value, message):
  c = tiny_config()
  c.model.channel_mult = (1, 2)  # two levels: the image is halved once
  section, name = field.split(".")
  c[section][name] = value
  with pytest.raises(ValueError, match=message):
    Diffusion.from_config(c)


def test_learned_variances_need_discrete_time():
  c = tiny_config()
  c.diffusion.update(variance="learned_range", continuous_time=True)
  with pytest.raises(ValueError, match="needs discrete time"):
    Diffusion.from_config(c)


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("sampler", "dmp_solver", "unknown sampler 'dmp_solver'"),
    ("spacing", "even", "spacing 'even'"),
    ("clip_x0", "yes", "clip_x0 'yes'"),
    ("num_steps", 0, "positive integer"),
  ],
)
def test_sample_settings_are_checked(field, value, message):
  c = tiny_config()
  c.sample[field] = value
  with pytest.raises(ValueError, match=message):
    SampleSettings.from_config(c.sample)


def test_parameters_loss_and_samples_have_the_configured_shapes():
  c = tiny_config()
  c.diffusion.variance = "learned_range"  # 2C outputs
  d = Diffusion.from_config(c)
  assert d.net.out_channels == 6 and d.image_shape == (8, 8, 3) and d.time_input == "t"
  params = d.init_params(jax.random.PRNGKey(0))
  assert unet.count_params(params) == unet.count_params(d.param_shapes()) > 12_000
  images = jnp.zeros((4, 8, 8, 3), jnp.uint8)
  out = jax.jit(d.loss)(params, images, jnp.zeros((4,), jnp.int32), jax.random.PRNGKey(1))
  assert out.loss.shape == out.mse.shape == out.vlb.shape == (4,)
  assert np.all(np.asarray(out.vlb) > 0)  # the hybrid loss's VLB term is on
  settings = SampleSettings(sampler="ddpm", num_steps=3)
  fn = d.sample_fn(settings)
  assert d.sample_fn(SampleSettings(sampler="ddpm", num_steps=3)) is fn  # compiled once
  x = fn(params, jax.random.PRNGKey(2), jnp.zeros((2,), jnp.int32), 2)
  assert x.shape == (2, 8, 8, 3) and np.all(np.isfinite(np.asarray(x)))


def test_ddpm_learned_range_names_the_model_it_needs_and_the_grid():
  """Errors raised while tracing, before anything compiles: the learned-range step asked of a
  fixed-variance model, and learned variances asked of a sigma grid (they need integer t)."""
  key, label = jax.random.PRNGKey(0), jnp.zeros((1,), jnp.int32)
  d = Diffusion.from_config(tiny_config())
  with pytest.raises(ValueError, match="variance='learned_range'.*sampler='ddpm'"):
    d.sample_fn(SampleSettings(sampler="ddpm_learned_range", num_steps=3))(None, key, label, 1)
  c = tiny_config()
  c.diffusion.variance = "learned_range"
  d = Diffusion.from_config(c)
  with pytest.raises(ValueError, match="integer timesteps: set config.sample.spacing"):
    d.sample_fn(SampleSettings(sampler="ddpm", num_steps=3, spacing="karras"))(None, key, label, 1)


def test_parameters_of_another_model_are_named():
  small = Diffusion.from_config(tiny_config()).param_shapes()
  c = tiny_config()
  c.model.base_channels = 24
  with pytest.raises(
    checkpoints.ShapeMismatchError, match=r"(?s) at step 3 .*conv_in']\['kernel|conv_in/kernel"
  ):
    Diffusion.from_config(c).check_params(small, " at step 3 in DIR")


def test_continuous_time_conditions_on_log_snr_and_labels_reserve_a_null_class():
  c = tiny_config()
  c.diffusion.continuous_time = True
  c.model.num_classes = 5
  d = Diffusion.from_config(c)
  assert d.time_input == "log_snr" and d.null_label == 5 and d.conditional


# ---- every process and parameterisation as one denoiser ------------------------------------------

MU = np.array([0.3, -0.2, 0.1, 0.0])
A = np.random.default_rng(0).normal(size=(4, 4))
COV = A @ A.T / 8 + 0.05 * np.eye(4)


def exact_d(x, s):
  """The exact denoiser of x0 ~ N(MU, COV) (x (B, 2, 2, 1) flattened to 4), float64."""
  flat = np.asarray(x, np.float64).reshape(len(x), 4)
  m = COV @ np.linalg.inv(COV + float(s) ** 2 * np.eye(4))
  return (MU + (flat - MU) @ m.T).reshape(x.shape)


class ExactNet:
  """Stands in for the U-Net: reads (input, conditioning) as the Diffusion feeds them and returns
  the exact F of its parameterisation, computed from exact_d on the host."""

  def __init__(self, d):
    self.d = d

  def apply(self, params, x, cond, labels, train=False, rngs=None):
    d = self.d

    def host(x, cond):
      x, cond = np.asarray(x, np.float64), np.asarray(cond, np.float64)
      if d.time == "discrete":
        lam = np.interp(cond, np.arange(d.schedule.num_timesteps), np.asarray(d.schedule.log_snr))
        s = np.exp(-0.5 * lam[0])
        alpha, sigma = 1 / np.sqrt(1 + s**2), s / np.sqrt(1 + s**2)
      else:
        s = np.exp(4 * cond[0])
        t = np.asarray(d.process.t_of_s(np.float32(s)), np.float64)
        alpha, sigma = (np.asarray(v, np.float64) for v in d.process.alpha_sigma(t))
      x_t = x / (np.sqrt(s**2 + d.sigma_data**2) ** -1 / alpha) if d.prediction == "edm" else x
      x0 = exact_d(x_t / alpha, s)
      eps = (x_t - alpha * x0) / sigma
      return np.asarray(
        denoiser.target(
          d.prediction, x0=x0, eps=eps, alpha=alpha, sigma=sigma, sigma_data=d.sigma_data
        ),
        np.float32,
      )

    shape = jax.ShapeDtypeStruct(x.shape, jnp.float32)
    return jax.pure_callback(host, shape, x, cond)


@pytest.mark.parametrize(
  "process, prediction",
  [
    ("vp", "eps"),
    ("vp", "v"),
    ("vp", "x0"),
    ("edm", "edm"),
    ("edm", "eps"),
    ("ve", "edm"),
    ("flow", "flow"),
    ("flow", "x0"),
    ("cosine", "v"),
    ("cosine", "edm"),
  ],
)
def test_every_parameterisation_decodes_to_the_same_exact_denoiser(process, prediction):
  """An exact model in each parameterisation, read back through Diffusion.denoiser, is the exact
  Gaussian denoiser at every noise level of a karras grid; a deterministic sampler then maps
  noise to data with the right moments (the solvers' own convergence is tested in
  test_solvers.py)."""
  import dataclasses

  c = tiny_config()
  c.data.update(image_size=2, channels=1)
  c.model.update(channel_mult=(1,), attn_resolutions=(), num_groups=1)
  c.diffusion.update(process=process, prediction=prediction, num_timesteps=1000)
  c.sample.clip_x0 = "none"
  d = Diffusion.from_config(c)
  d = dataclasses.replace(d, net=ExactNet(d), _cache={})
  d.net.d = d
  settings = SampleSettings(sampler="heun", num_steps=24, spacing="karras", clip_x0="none")
  den = jax.jit(
    d.denoiser(None, None, settings)
  )  # one program with the host callback, not one per s
  x = np.random.default_rng(1).normal(size=(8, 2, 2, 1)).astype(np.float32)
  for s in d.sigmas(settings)[:-1:5]:
    got = np.asarray(den(jnp.asarray(x * s), jnp.float32(s)), np.float64)
    # float32 noise in F is amplified by up to s in x0 (eps-prediction at high noise)
    np.testing.assert_allclose(got, exact_d(x * s, np.float32(s)), rtol=2e-3, atol=2e-4 + 2e-7 * s)
  n = 20_000
  out = np.asarray(
    d.sample_fn(settings)(None, jax.random.PRNGKey(0), jnp.zeros((n,), jnp.int32), n), np.float64
  ).reshape(-1, 4)
  se = np.sqrt(np.diag(COV) / n)
  assert np.all(np.abs(out.mean(0) - MU) < 5 * se + 0.01), out.mean(0)
  # Monte-Carlo standard error of each covariance entry, plus Heun's error at 24 steps (~0.02).
  se_cov = np.sqrt((np.outer(np.diag(COV), np.diag(COV)) + COV**2) / n)
  assert np.all(np.abs(np.cov(out.T) - COV) < 5 * se_cov + 0.02), np.cov(out.T) - COV


def test_discrete_vp_model_samples_ddim_on_its_timesteps():
  """Diffusion.sample with ddim on uniform timesteps equals DDIM as Song et al. write it (eq. 12,
  eta = 0) in float64 NumPy over the same integer t, with the network conditioned on t, for a
  real (randomly perturbed) U-Net: the sigma grid of the timesteps conditions the network on the
  timesteps it was trained on (to 1e-3), and x_T ~ N(0, I) is the vp prior. Tolerance: the
  float32 network sees its input and t at float32 rounding in both."""
  from diffusion import solvers

  c = tiny_config()
  c.diffusion.update(prediction="eps", num_timesteps=100)
  d = Diffusion.from_config(c)
  rng = np.random.default_rng(1)  # NumPy noise: no program compiled per parameter shape
  params = jax.tree.map(
    lambda p: p + 0.05 * rng.standard_normal(p.shape, np.float32),
    d.init_params(jax.random.PRNGKey(0)),
  )
  settings = SampleSettings(sampler="ddim", num_steps=10, spacing="uniform", clip_x0="none")
  ts = solvers.timesteps(d.schedule, 10, "uniform")
  cond = np.asarray(d.conditioning(jnp.asarray(d.sigmas(settings)[:-1], jnp.float32)))
  np.testing.assert_allclose(cond, ts, atol=1e-3)
  key = jax.random.PRNGKey(3)
  got = np.asarray(d.sample_fn(settings)(params, key, jnp.zeros((3,), jnp.int32), 3), np.float64)
  x = np.asarray(jax.random.normal(jax.random.split(key)[0], (3, 8, 8, 3)), np.float64)
  abar = np.append(np.asarray(d.schedule.alphas_cumprod, np.float64)[ts], 1.0)
  for i, t in enumerate(ts):
    t_in = jnp.full((3,), t, jnp.float32)
    eps = np.asarray(
      d.net.apply(params, jnp.asarray(x, jnp.float32), t_in, None, train=False), np.float64
    )
    x0 = (x - np.sqrt(1 - abar[i]) * eps) / np.sqrt(abar[i])
    x = np.sqrt(abar[i + 1]) * x0 + np.sqrt(1 - abar[i + 1]) * eps
  np.testing.assert_allclose(got, x, rtol=2e-3, atol=2e-3)
