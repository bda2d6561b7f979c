"""model.py: Diffusion is built once from the config, checks every name and shape before
compiling anything, and is the only place that maps config fields to library arguments."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from diffusion import checkpoints, unet
from diffusion.model import Diffusion, SampleSettings


@pytest.mark.parametrize("field, value, message", [
  ("diffusion.schedule", "cosin", "unknown schedule 'cosin'"),
  ("diffusion.prediction", "noise", "config.diffusion.prediction 'noise'"),
  ("diffusion.weighting", "snr", "config.diffusion.weighting 'snr'"),
  ("diffusion.variance", "large", "config.diffusion.variance 'large'"),
  ("diffusion.t_sampling", "sobol", "config.diffusion.t_sampling 'sobol'"),
  ("data.image_size", 9, "image size 9x9 cannot be halved"),
  ("data.channels", 2, "config.data.channels must be 1 or 3"),
  ("model.num_groups", 5, "GroupNorm cannot split"),
])
def test_unknown_names_and_impossible_shapes_are_clear_errors(field, value, message):
  c = tiny_config()
  section, name = field.split(".")
  c[section][name] = value
  with pytest.raises(ValueError, match=message):
    Diffusion.from_config(c)


def test_learned_variances_need_discrete_time():
  c = tiny_config()
  c.diffusion.update(variance="learned_range", continuous_time=True)
  with pytest.raises(ValueError, match="needs discrete time"):
    Diffusion.from_config(c)


@pytest.mark.parametrize("field, value, message", [
  ("sampler", "dmp_solver", "unknown sampler 'dmp_solver'"), ("spacing", "even", "spacing 'even'"),
  ("clip_x0", "yes", "clip_x0 'yes'"), ("num_steps", 0, "positive integer")])
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
  assert unet.count_params(params) == unet.count_params(d.param_shapes()) > 190_000
  images = jnp.zeros((4, 8, 8, 3), jnp.uint8)
  out = d.loss(params, images, jnp.zeros((4,), jnp.int32), jax.random.PRNGKey(1))
  assert out.loss.shape == out.mse.shape == out.vlb.shape == (4,)
  assert np.all(np.asarray(out.vlb) > 0)  # the hybrid loss's VLB term is on
  settings = SampleSettings(sampler="ddpm", num_steps=3)
  fn = d.sample_fn(settings)
  assert d.sample_fn(SampleSettings(sampler="ddpm", num_steps=3)) is fn  # compiled once
  x = fn(params, jax.random.PRNGKey(2), jnp.zeros((2,), jnp.int32), 2)
  assert x.shape == (2, 8, 8, 3) and np.all(np.isfinite(np.asarray(x)))


def test_parameters_of_another_model_are_named():
  small = Diffusion.from_config(tiny_config()).param_shapes()
  c = tiny_config()
  c.model.base_channels = 24
  with pytest.raises(checkpoints.ShapeMismatchError,
                     match=r"(?s) at step 3 .*conv_in']\['kernel|conv_in/kernel"):
    Diffusion.from_config(c).check_params(small, " at step 3 in DIR")


def test_continuous_time_conditions_on_log_snr_and_labels_reserve_a_null_class():
  c = tiny_config()
  c.diffusion.continuous_time = True
  c.model.num_classes = 5
  d = Diffusion.from_config(c)
  assert d.time_input == "log_snr" and d.null_label == 5 and d.conditional
