"""Training an AutoencoderKL through train.train: the loss against its closed form, a short run
whose workdir then loads as an autoencoder, and the refusals of an autoencoder config."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import launch as launch_module
from configs import autoencoder as ae_config
from diffusion import autoencoding, train


def test_loss_is_reconstruction_plus_weighted_kl():
  c = ae_config.get_config("tiny")
  c.autoencoder.update(kl_weight=0.3)
  task = autoencoding.AutoencoderTask.from_config(c)
  params = task.init_params(jax.random.key(0))
  images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
  key = jax.random.key(7)
  m = task.module
  x = images.astype(np.float64) / 127.5 - 1
  mean, logvar = (
    np.asarray(a, np.float64) for a in m.apply(params, x.astype(np.float32), method=m.encode)
  )
  z = mean + np.exp(0.5 * logvar) * np.asarray(jax.random.normal(key, mean.shape))
  x_hat = np.asarray(m.apply(params, z.astype(np.float32), method=m.decode), np.float64)
  # KL(N(mu, s^2) || N(0, 1)) per latent value: log(1 / s) + (s^2 + mu^2) / 2 - 1/2
  kl = (-0.5 * logvar + 0.5 * (np.exp(logvar) + mean**2) - 0.5).sum(axis=(1, 2, 3))
  for recon, rec in (("l1", np.abs(x_hat - x)), ("l2", (x_hat - x) ** 2)):
    task_r = autoencoding.AutoencoderTask(task.module, 8, 3, recon, 0.3)
    out = task_r.loss(params, images, None, key)
    want = rec.mean(axis=(1, 2, 3)) + 0.3 * kl / (8 * 8 * 3)
    np.testing.assert_allclose(out.loss, want, rtol=2e-5)
    np.testing.assert_allclose(out.mse, ((x_hat - x) ** 2).mean(axis=(1, 2, 3)), rtol=2e-5)


def test_short_run_serves_as_an_autoencoder(tmp_path):
  c = ae_config.get_config("tiny")
  c.train.update(num_steps=2, sample_every=2)
  state = train.train(c, str(tmp_path))
  assert (tmp_path / "samples" / "step_2.png").exists()
  # launch.py records config.json; the library call does not
  from configs import common
  from diffusion import rundir

  rundir.record_config(str(tmp_path), common.as_dict(c), common.training_changes)
  module, params, fp = autoencoding.load(str(tmp_path))
  assert module.block_out_channels == (8, 16) and module.scaling_factor == 0.0
  want = jax.device_get(state.ema_params)
  jax.tree.map(
    lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, want
  )
  assert autoencoding.load(str(tmp_path))[2] == fp  # the fingerprint is stable


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("autoencoder.recon", "lpips", "unknown config.autoencoder.recon 'lpips'"),
    ("autoencoder.norm_num_groups", 3, "must all be multiples"),
    ("data.image_size", 9, "not divisible by the autoencoder's downsampling factor 2"),
  ],
)
def test_bad_autoencoder_configs(field, value, message):
  c = ae_config.get_config("tiny")
  section, name = field.split(".")
  c[section][name] = value
  with pytest.raises(ValueError, match=message):
    launch_module.check(c, "train")


def test_other_modes_refuse_an_autoencoder_run():
  with pytest.raises(ValueError, match="--mode sample is for diffusion runs"):
    launch_module.check(ae_config.get_config("tiny"), "sample")
