"""diffusion.metrics.bpd: bits/dim over a dataset (batches, padding, keys, statistics) with a
Diffusion's bpd_fn, and that it tells a model of the data from a model of other data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from diffusion import data, losses
from diffusion.metrics import bpd
from diffusion.model import Diffusion


def bpd_config():
  """8x8 sprites, T = 20, a one-level U-Net (fast to compile and to run)."""
  c = tiny_config()
  c.model.update(channel_mult=(1,), attn_resolutions=())
  c.data.update(num_sprites=1000, eval_fraction=0.2)
  c.diffusion.num_timesteps = 20
  return c


@pytest.fixture(scope="module")
def held():
  c = bpd_config()
  return data.load(data.DataSpec(**c.data.to_dict()), split="eval")


@pytest.fixture(scope="module")
def model():
  """The Diffusion and parameters a small random perturbation away from the fresh ones (a fresh
  U-Net is the zero function)."""
  diffusion = Diffusion.from_config(bpd_config())
  rng = np.random.default_rng(1)  # NumPy noise: no program compiled per parameter shape
  params = jax.device_get(diffusion.init_params(jax.random.PRNGKey(0)))
  return diffusion, jax.tree.map(
    lambda p: p + 0.03 * rng.standard_normal(p.shape).astype(p.dtype), params
  )


def test_bits_per_dim_batches_keys_and_statistics(model, held):
  diffusion, params = model
  kw = dict(batch_size=16, seed=0, progress=False)  # 24 images: a padded second batch
  out = bpd.bits_per_dim(diffusion.bpd_fn(), params, held.images[:24], held.labels[:24], **kw)
  assert np.isfinite(out["bpd"]) and out["bpd"] > 0
  assert out["num_images"] == 24 and 0 < out["bpd_stderr"] < out["bpd"]
  assert 0 <= out["prior"] < 0.01  # the cosine schedule ends near pure noise
  assert 0 < out["decoder"] < out["bpd"]
  again = bpd.bits_per_dim(diffusion.bpd_fn(), params, held.images[:24], held.labels[:24], **kw)
  assert again == out  # deterministic given the seed
  # The protocol: uint8 -> [-1, 1], then the core's T-term bound on batches of 16, the last one
  # wrapped around (16..23, 16..23), batch b keyed fold_in(PRNGKey(seed), b).

  @jax.jit
  def direct(params, x_u8, key):  # (B, 3) [total, prior, decoder] straight from losses
    o = losses.bits_per_dim(
      lambda x, t, y: diffusion.net.apply(params, x, t, y, train=False),
      diffusion.schedule,
      data.normalize(x_u8),
      key,
      prediction=diffusion.prediction,
      variance=diffusion.variance,
      time_input=diffusion.time_input,
    )
    return jnp.stack([o["total"], o["prior"], o["terms"][0]], axis=1)

  base = jax.random.PRNGKey(0)
  want = np.concatenate(
    [
      direct(params, held.images[:16], jax.random.fold_in(base, 0)),
      direct(params, held.images[np.resize(np.arange(16, 24), 16)], jax.random.fold_in(base, 1))[
        :8
      ],
    ]
  ).astype(np.float64)
  np.testing.assert_allclose([out["bpd"], out["prior"], out["decoder"]], want.mean(0), rtol=1e-5)
  assert out["bpd_stderr"] == pytest.approx(want[:, 0].std(ddof=1) / np.sqrt(24), rel=1e-4)
  with pytest.raises(ValueError, match="no images"):
    bpd.bits_per_dim(diffusion.bpd_fn(), params, held.images[:0], progress=False)


def test_estimate_agrees_with_the_exact_bound(model, held):
  """The stratified estimate (6 ranges of t: 7 network evaluations per image instead of 20) and
  the full bound on the same 96 images: their per-image difference averages to zero within 4
  standard errors, and that standard error is a few percent of the bound."""
  diffusion, params = model
  x, y = held.images[:96], held.labels[:96]
  exact = np.asarray(diffusion.bpd_fn("exact")(params, x, y, jax.random.PRNGKey(0)), np.float64)
  estimate = diffusion.bpd_fn("estimate", 6)
  est = np.asarray(estimate(params, x, y, jax.random.PRNGKey(1)), np.float64)
  np.testing.assert_allclose(est[:, 1], exact[:, 1], rtol=1e-5)  # the prior: exact in both
  d = est[:, 0] - exact[:, 0]
  se = d.std(ddof=1) / np.sqrt(len(d))
  assert abs(d.mean()) < 4 * se, (d.mean(), se)
  assert se < 0.03 * exact[:, 0].mean()
  out = bpd.bits_per_dim(estimate, params, x, y, batch_size=96, seed=1, progress=False)
  assert 0 < out["bpd_stderr"] and abs(out["bpd"] - exact[:, 0].mean()) < 4 * out["bpd_stderr"]


def memorising_bpd_fn(schedule):
  """A bpd_fn whose "parameters" are a set of images M (K, H, W, C) in [-1, 1]: its model is the
  exact denoiser E[x_0 | x_t] of the uniform law on M (x_0 predicted as the softmax of
  -|x_t - sqrt(abar_t) m|^2 / (2 (1 - abar_t)) over m in M), the best model of that law."""

  def denoiser(memory, x_t, t):
    flat_m, flat_x = memory.reshape(len(memory), -1), x_t.reshape(len(x_t), -1)
    t = t.astype(jnp.int32)
    a, var = schedule.sqrt_alphas_cumprod[t][:, None], 1.0 - schedule.alphas_cumprod[t][:, None]
    d2 = ((flat_x[:, None, :] - a[:, :, None] * flat_m[None]) ** 2).sum(-1)  # (B, K)
    return (jax.nn.softmax(-d2 / (2 * var), axis=-1) @ flat_m).reshape(x_t.shape)

  @jax.jit
  def fn(memory, x_u8, labels, key):
    out = losses.bits_per_dim(
      lambda x, t, y: denoiser(memory, x, t), schedule, data.normalize(x_u8), key, prediction="x0"
    )
    return jnp.stack([out["total"], out["prior"], out["terms"][0]], axis=1)

  return fn


def test_bits_per_dim_is_lower_for_a_model_of_the_data(model, held):
  """A model that knows the held-out images scores far fewer bits/dim on them than a model of
  other images (the ordering training should produce)."""
  fn = memorising_bpd_fn(model[0].schedule)
  images, others = held.images[:24], held.images[24:48]
  kw = dict(batch_size=16, seed=0, progress=False)
  knows = bpd.bits_per_dim(fn, np.asarray(data.normalize(images)), images, **kw)
  other = bpd.bits_per_dim(fn, np.asarray(data.normalize(others)), images, **kw)
  assert np.isfinite(other["bpd"]) and 0 < knows["bpd"] < other["bpd"] - 0.5, (knows, other)
  assert knows["decoder"] < other["decoder"]


def test_protocol_says_how_the_number_was_made():
  est = dict(method="estimate", strata=8)
  p = bpd.protocol(
    split="held-out 0.2", num_images=24, num_timesteps=100, conditional=True, ema=False, seed=3
  )
  assert p == {
    "split": "held-out 0.2",
    "num_images": 24,
    "data": "uint8, x / 127.5 - 1",
    "dequantization": "none: discrete decoder on 8-bit data",
    "method": "exact",
    "bound": "full 100-step VLB (prior + KL terms + decoder)",
    "conditioning": "true labels",
    "parameters": "raw",
    "seed": 3,
  }
  p = bpd.protocol(
    split="x", num_images=2, num_timesteps=100, conditional=False, ema=True, seed=0, **est
  )
  assert p["method"] == "estimate" and p["bound"] == (
    "unbiased estimate of the full 100-step VLB (prior + KL terms + decoder): prior and decoder "
    "exact, the KL terms from one t in each of 8 ranges (9 network evaluations per image)"
  )
