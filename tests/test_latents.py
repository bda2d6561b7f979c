"""Latent shards: prepare --encode, the drawn latents of the "latents" source, the checks of a
latent run, and decoded samples."""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np
import pytest
from conftest import launch, run_python, tiny_config

import launch as launch_module
from diffusion import autoencoding, encode
from diffusion.data import latents, pipeline, prepare
from diffusion.metrics import reference
from diffusion.nets import convert_autoencoder as convert
from diffusion.nets.autoencoder import AutoencoderKL

FIELDS = dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4)


def _autoencoder(folder, seed: int = 0, scaling_factor: float = 0.5) -> tuple:
  """A converted-weights folder of a random AutoencoderKL (every weight perturbed)."""
  module = AutoencoderKL(**FIELDS, scaling_factor=scaling_factor, shift_factor=0.1)
  params = jax.jit(module.init)(jax.random.key(seed), np.zeros((1, 8, 8, 3), np.float32))
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda p: np.asarray(p) + 0.1 * rng.standard_normal(p.shape), params)
  fields = {f: getattr(module, f) for f in convert.FIELDS}
  convert.save(folder, fields, params)
  return module, convert.load(folder)[1]


def _images(path, n: int = 10):
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
  labels = rng.integers(0, 3, n).astype(np.int32)
  np.savez(path, images=images, labels=labels)
  return images, labels


def _moments(module, params, images):
  mean, logvar = module.apply(
    params, (images.astype(np.float32) - 127.5) / 127.5, method=module.encode
  )
  return np.asarray(mean), np.exp(0.5 * np.asarray(logvar))


@pytest.fixture
def encoded(tmp_path):
  module, params = _autoencoder(tmp_path / "ae")
  images, labels = _images(tmp_path / "data.npz")
  m = encode.encode(
    str(tmp_path / "ae"),
    "npz",
    str(tmp_path / "data.npz"),
    str(tmp_path / "lat"),
    image_size=8,
    batch_size=3,  # a padded last batch in every chunk
    shard_size=4,
  )
  return tmp_path, module, params, images, labels, m


def test_encode_stores_each_images_and_its_mirrors_posterior(encoded):
  tmp, module, params, images, labels, m = encoded
  assert (m.count, m.views, m.latent_shape, len(m.shards)) == (10, 2, (4, 4, 4), 3)
  assert m.autoencoder["fingerprint"] == convert.load(tmp / "ae")[2]
  assert m.scale_shift == (0.5, pytest.approx(0.1))
  ds = latents.open_latents(latents_spec(tmp / "lat"))
  got, got_labels = ds.moments(np.arange(10))
  np.testing.assert_array_equal(got_labels, labels)
  for view, x in enumerate((images, images[:, :, ::-1])):
    mean, std = _moments(module, params, x)
    np.testing.assert_allclose(got[:, view, 0], mean, rtol=1e-5, atol=1e-5)  # batch of 3 vs 10
    np.testing.assert_allclose(got[:, view, 1], std, rtol=1e-5, atol=1e-5)


def latents_spec(path):
  from diffusion.data.dataset import DataSpec

  return DataSpec(source="latents", path=str(path), image_size=4, channels=4)


def test_scaling_factor_estimated_over_the_collection(tmp_path):
  module, params = _autoencoder(tmp_path / "ae", scaling_factor=0.0)
  images, _ = _images(tmp_path / "data.npz", n=6)
  m = encode.encode(
    str(tmp_path / "ae"),
    "npz",
    str(tmp_path / "data.npz"),
    str(tmp_path / "l"),
    image_size=8,
    flip=False,
  )
  mean, std = (a.astype(np.float64) for a in _moments(module, params, images))
  want = 1 / np.sqrt(mean.var() + np.mean(std**2))  # Var z = Var mean + E std^2
  assert m.views == 1 and m.scale_shift[0] == pytest.approx(want, rel=1e-5)


def test_draws_are_keyed_by_seed_step_position_and_follow_the_posterior(encoded):
  tmp, _, _, _, _, m = encoded
  ds = latents.open_latents(latents_spec(tmp / "lat"))
  kw = dict(global_batch=4, seed=3, local_devices=1, random_flip=True)
  a = pipeline.batch_at(ds, 7, **kw)
  b = pipeline.batch_at(latents.open_latents(latents_spec(tmp / "lat")), 7, **kw)  # a resume
  np.testing.assert_array_equal(a["image"], b["image"])
  assert a["image"].dtype == np.float32 and a["image"].shape == (1, 4, 4, 4, 4)
  assert not np.array_equal(a["image"], pipeline.batch_at(ds, 8, **kw)["image"])
  halves = [  # two processes draw what one draws: keys are global positions
    pipeline.batch_at(ds, 7, process_index=i, process_count=2, **kw)["image"] for i in (0, 1)
  ]
  np.testing.assert_array_equal(np.concatenate(halves, axis=1), a["image"])

  # one example, many draws: mean and std of (z - shift) * scale for the image, then the mirror
  one = ds.take(np.array([2]))
  moments, _ = ds.moments(np.array([2]))
  scale, shift = m.scale_shift
  for flip, view in ((False, 0), (True, None)):
    draws = np.concatenate(
      [
        pipeline.batch_at(one, s, global_batch=16, seed=0, local_devices=1, random_flip=flip)[
          "image"
        ][0]
        for s in range(100)
      ]
    )
    if view is None:  # flips: half the draws from each view, an equal mixture
      mu = 0.5 * (moments[0, 0, 0] + moments[0, 1, 0])
      var = (
        0.5 * (moments[0, 0, 1] ** 2 + moments[0, 1, 1] ** 2)
        + 0.25 * (moments[0, 0, 0] - moments[0, 1, 0]) ** 2
      )
    else:
      mu, var = moments[0, view, 0], moments[0, view, 1] ** 2
    want_mean, want_std = (mu - shift) * scale, np.sqrt(var) * scale
    se = want_std / np.sqrt(len(draws))
    assert np.all(np.abs(draws.mean(0) - want_mean) < 5 * se + 1e-6)
    np.testing.assert_allclose(draws.std(0), want_std, rtol=0.15)


def test_interrupted_encode_leaves_no_folder(tmp_path, monkeypatch):
  _autoencoder(tmp_path / "ae")
  _images(tmp_path / "data.npz")
  monkeypatch.setattr(prepare, "_CHUNK", 4)

  def fail(self, *a):
    raise KeyboardInterrupt

  monkeypatch.setattr(latents.LatentWriter, "close", fail)
  with pytest.raises(KeyboardInterrupt):
    encode.encode(
      str(tmp_path / "ae"), "npz", str(tmp_path / "data.npz"), str(tmp_path / "o"), image_size=8
    )
  assert sorted(os.listdir(tmp_path)) == ["ae", "data.npz"]


def test_two_devices_encode_what_one_does(encoded):
  tmp = encoded[0]
  r = run_python(
    [
      "-m",
      "diffusion.data.prepare",
      "--encode",
      str(tmp / "ae"),
      "--source",
      "npz",
      "--input",
      str(tmp / "data.npz"),
      "--output",
      str(tmp / "lat2"),
      "--image_size",
      "8",
      "--batch_size",
      "4",
    ],
    devices=2,
  )
  assert r.returncode == 0, r.stderr
  one = latents.open_latents(latents_spec(tmp / "lat")).moments(np.arange(10))[0]
  two = latents.open_latents(latents_spec(tmp / "lat2")).moments(np.arange(10))[0]
  np.testing.assert_allclose(two, one, rtol=1e-5, atol=1e-5)


def _latent_config(lat, ae) -> ml_collections.ConfigDict:
  c = tiny_config()
  c.data.update(source="latents", path=str(lat), image_size=4, channels=4)
  c.autoencoder = ml_collections.ConfigDict({"path": str(ae)})
  c.sample.update(clip_x0="none")
  return c


def test_latent_run_checks(encoded):
  tmp = encoded[0]
  launch_module.check(_latent_config(tmp / "lat", tmp / "ae"), "train")  # the good case
  no_ae = _latent_config(tmp / "lat", "")
  with pytest.raises(ValueError, match="set config.autoencoder.path"):
    launch_module.check(no_ae, "train")
  _autoencoder(tmp / "other", seed=5)
  with pytest.raises(ValueError, match="were encoded by autoencoder"):
    launch_module.check(_latent_config(tmp / "lat", tmp / "other"), "train")
  prepare.prepare("npz", str(tmp / "data.npz"), str(tmp / "pixels"), image_size=8)
  with pytest.raises(ValueError, match="holds pixel shards, not latents"):
    launch_module.check(_latent_config(tmp / "pixels", tmp / "ae"), "train")
  os.rename(tmp / "data.npz", tmp / "moved.npz")  # the pixels behind the latents are gone:
  for mode, protocol in (("eval", "heldout"), ("eval", "fid50k")):  # scoring needs them
    c = _latent_config(tmp / "lat", tmp / "ae")
    c.eval.protocol = protocol
    with pytest.raises(FileNotFoundError, match="set config.eval.pixel_data"):
      launch_module.check(c, mode)
    c.eval.pixel_data = str(tmp / "moved.npz")
    launch_module.check(c, mode)
  launch_module.check(_latent_config(tmp / "lat", tmp / "ae"), "pictures")  # latents only
  data = bytearray((tmp / "ae" / convert.PARAMS_FILE).read_bytes())
  data[-5] ^= 0x40
  (tmp / "ae" / convert.PARAMS_FILE).write_bytes(bytes(data))
  with pytest.raises(ValueError, match="damaged"):
    launch_module.check(_latent_config(tmp / "lat", tmp / "ae"), "train")


def test_mismatched_autoencoder_is_one_line_exit_2_nothing_written(encoded):
  tmp = encoded[0]
  _autoencoder(tmp / "other", seed=5)
  r = launch(
    tmp / "run",
    f"--config.data.path={tmp / 'lat'}",
    f"--config.autoencoder.path={tmp / 'other'}",
    "--config.data.image_size=4",
    config="configs/sprites.py:latent",
  )
  assert r.returncode == 2
  assert r.stderr.strip().splitlines()[-1].startswith("error: the latents in")
  assert sum(line.startswith("error") for line in r.stderr.splitlines()) == 1
  assert not (tmp / "run").exists()


def test_latent_samples_come_out_decoded(encoded):
  tmp, module, params, *_ = encoded
  c = _latent_config(tmp / "lat", tmp / "ae")
  model = autoencoding.build(c)
  assert isinstance(model, autoencoding.LatentDiffusion) and model.image_shape == (4, 4, 4)
  from diffusion.model import SampleSettings

  dparams = model.init_params(jax.random.key(0))
  out = model.sample_fn(SampleSettings.from_config(c.sample))(dparams, jax.random.key(1), None, n=2)
  assert out.shape == (2, 8, 8, 3) and float(np.abs(out).max()) <= 1.0
  z = model.diffusion.sample_fn(SampleSettings.from_config(c.sample))(
    dparams, jax.random.key(1), None, n=2
  )
  raw = z / 0.5 + 0.1  # the manifest's normalisation undone
  want = np.clip(module.apply(params, raw, method=module.decode), -1, 1)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  from diffusion import generate  # what --mode sample and the eval protocols call

  images = generate.generate(
    model, dparams, SampleSettings.from_config(c.sample), num_images=2, batch_size=1, seed=0
  )
  assert images.shape == (2, 8, 8, 3) and images.dtype == np.uint8 and images.std() > 0
  # --mode sample's latents (config.sample.save_latents) are the ones these images decode from
  lat = autoencoding.latent_samples(
    model, dparams, SampleSettings.from_config(c.sample), num_images=2, batch_size=2, seed=0
  )
  assert lat.shape == (2, 4, 4, 4) and lat.dtype == np.float32
  again = generate.to_uint8(
    np.clip(module.apply(params, lat / 0.5 + 0.1, method=module.decode), -1, 1)
  )
  assert np.abs(np.asarray(again, int) - images).max() <= 1  # rounding at .5 after float noise


def test_adm_reference_batch_images(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
  mu, sigma = np.zeros(4), np.eye(4)
  path = str(tmp_path / "VIRTUAL_x.npz")
  np.savez(path, arr_0=images, mu=mu, sigma=sigma, mu_s=mu, sigma_s=sigma)
  np.testing.assert_array_equal(reference.load_images(path), images)
  np.testing.assert_array_equal(reference.load_npz(path)[1], sigma)
  np.savez(tmp_path / "float.npz", arr_0=images.astype(np.float32))
  with pytest.raises(ValueError, match="expected uint8"):
    reference.load_images(str(tmp_path / "float.npz"))
  np.savez(tmp_path / "pickled.npz", arr_0=np.array([{"x": 1}], dtype=object))
  with pytest.raises(ValueError, match="not an .npz of plain arrays"):
    reference.load_images(str(tmp_path / "pickled.npz"))
