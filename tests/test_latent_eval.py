"""A run on latents scored and drawn in pixels: the heldout protocol (floor and reference from the
pixel collection the latents were encoded from, split as the latents are), fid50k against the
pixel training split, and --mode pictures decoding the forward process. Fabricated checkpoints of
a one-level U-Net on the 4x4x4 latents of test_latents' random 8x8 autoencoder."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from conftest import fabricate_checkpoints, launch
from test_latents import _autoencoder, _images, encoded  # noqa: F401 (a fixture)

import launch as launch_module
from configs import common
from diffusion import autoencoding, data, encode, gaussian, runlog, visualize
from diffusion.data import dataset as dataset_lib
from diffusion.data import prepare, sprites
from diffusion.evaluation import pixels
from diffusion.modes import evaluate, pictures

LATENT = "configs/sprites.py:latent"
FRACTION, HELD = 0.3, 3  # 10 images: holdout_indices keeps round(10 * 0.3) = 3 out


def overrides(tmp) -> list[str]:
  """configs/sprites.py:latent on the fixture's latents, with a tiny U-Net and a tiny eval."""
  return [
    f"data.path={tmp / 'lat'}",
    f"autoencoder.path={tmp / 'ae'}",
    "data.image_size=4",
    f"data.eval_fraction={FRACTION}",
    "model.base_channels=8",
    "model.channel_mult=(1,)",
    "model.attn_resolutions=()",
    "model.num_groups=4",
    "diffusion.num_timesteps=40",
    "eval.samplers=ddim:2",
    f"eval.num_images={HELD}",
    "eval.reference_images=7",
    "eval.batch_size=4",
    "eval.feature_steps=5",
  ]


def config_of(tmp, *extra: str):
  return common.load("configs/sprites.py:latent", [*overrides(tmp), *extra])


@pytest.fixture
def run(encoded):  # noqa: F811
  """(tmp, module, ae params, the npz's images, the latent config, a workdir with a checkpoint)."""
  tmp, module, params, images, *_ = encoded
  c = config_of(tmp)
  fabricate_checkpoints(c, str(tmp / "run"), [2])
  return tmp, module, params, images, c, tmp / "run"


def test_heldout_eval_of_a_latent_run_through_launch(run):
  tmp, _, _, _, c, workdir = run
  r = launch(workdir, "--mode=eval", *(f"--config.{o}" for o in overrides(tmp)), config=LATENT)
  assert r.returncode == 0, r.stderr[-3000:]
  m = json.load(open(workdir / "eval" / "metrics.json"))
  fp = autoencoding.load(str(tmp / "ae"))[2]
  assert m["autoencoder"] == fp and m["bpd"] is None
  assert "latents, not pixels" in m["bpd_protocol"]["skipped"]
  p = m["pixel_data"]  # the real images: the npz's 8x8 RGB pixels, not 4x4x4 latents
  assert (p["source"], p["image_shape"], p["images"], p["held_out"]) == ("npz", [8, 8, 3], 10, 3)
  assert p["max_relative_error"] < 1e-4  # the held-out pixels encode to the stored latents
  (row,) = runlog.eval_rows(runlog.read_metrics(str(workdir)))
  assert row["autoencoder"] == fp and row["protocol"] == "heldout"
  assert all(np.isfinite(row[k]) and row[k] > 0 for k in ("fd", "swd", "floor_fd", "floor_swd"))
  assert m["floor"]["num_images"] == HELD


def test_floor_and_reference_are_the_latents_pixels_split_alike(run):
  tmp, module, params, images, c, _ = run
  model = autoencoding.build(c)
  train, held, about = pixels.real_images(c, model)
  train_idx, eval_idx = dataset_lib.holdout_indices(10, FRACTION)
  np.testing.assert_array_equal(held.images, images[eval_idx])  # the latents' held-out examples
  np.testing.assert_array_equal(train.images, images[train_idx])  # nothing held out trains
  assert held.images.shape[1:] == (8, 8, 3) and about["checked"] == HELD


def test_sprite_latents_reopen_their_sprites(encoded):  # noqa: F811
  tmp = encoded[0]
  encode.encode(str(tmp / "ae"), "sprites", "20", str(tmp / "slat"), image_size=8, flip=False)
  c = config_of(tmp, f"data.path={tmp / 'slat'}")
  train, held, about = pixels.real_images(c, autoencoding.build(c))
  want = sprites.load_sprites(dataset_lib.DataSpec(image_size=8, num_sprites=20))
  train_idx, eval_idx = dataset_lib.holdout_indices(20, FRACTION)
  np.testing.assert_array_equal(held.images, want.images[eval_idx])
  np.testing.assert_array_equal(train.labels, want.labels[train_idx])
  assert about["source"] == "sprites" and about["max_relative_error"] < 1e-4


def test_pixel_source_moved_or_wrong(run):
  tmp, module, params, images, c, workdir = run
  os.rename(tmp / "data.npz", tmp / "moved.npz")
  r = launch(workdir, "--mode=eval", *(f"--config.{o}" for o in overrides(tmp)), config=LATENT)
  assert r.returncode == 2
  err = [line for line in r.stderr.splitlines() if line.startswith("error")]
  assert len(err) == 1 and "set config.eval.pixel_data" in err[0], r.stderr[-2000:]
  assert not (workdir / "eval").exists()
  moved = config_of(tmp, f"eval.pixel_data={tmp / 'moved.npz'}")
  held = pixels.real_images(moved, autoencoding.build(moved))[1]
  eval_idx = dataset_lib.holdout_indices(10, FRACTION)[1]
  np.testing.assert_array_equal(held.images, images[eval_idx])
  prepare.prepare("npz", str(tmp / "moved.npz"), str(tmp / "shards"), image_size=8)
  sharded = config_of(tmp, f"eval.pixel_data={tmp / 'shards'}")  # a pixel shard folder of them
  held = pixels.real_images(sharded, autoencoding.build(sharded), stream=True)[1]
  assert held.read(np.arange(HELD))[0].tolist() == images[eval_idx].tolist()
  np.savez(tmp / "other.npz", images=images[::-1].copy(), labels=np.zeros(10, np.int32))
  other = config_of(tmp, f"eval.pixel_data={tmp / 'other.npz'}")
  with pytest.raises(ValueError, match="not the ones the latents .* were encoded from"):
    pixels.real_images(other, autoencoding.build(other))
  np.savez(tmp / "fewer.npz", images=images[:9])
  fewer = config_of(tmp, f"eval.pixel_data={tmp / 'fewer.npz'}")
  with pytest.raises(ValueError, match="are 9, the latents .* 10"):
    pixels.real_images(fewer, autoencoding.build(fewer))
  pixel_run = common.load("configs/tiny.py", [f"eval.pixel_data={tmp / 'moved.npz'}"])
  with pytest.raises(ValueError, match="leave config.eval.pixel_data empty"):
    launch_module.check(pixel_run, "eval")


def spy_reference_statistics(monkeypatch) -> list:
  """The training sets fid50k's reference_statistics is called with, as a list filled in."""
  seen, real = [], evaluate.fid50k.reference_statistics
  monkeypatch.setattr(
    evaluate.fid50k,
    "reference_statistics",
    lambda protocol, train, *a, **k: seen.append(train) or real(protocol, train, *a, **k),
  )
  return seen


def test_fid50k_of_a_latent_run_against_its_pixel_training_split(run, monkeypatch):
  tmp, *_, workdir = run
  c = config_of(
    tmp,
    "eval.protocol=fid50k",
    "eval.num_samples=4",
    "eval.kid_pr_samples=4",
    "eval.is_splits=2",
    "eval.chunk_images=4",
    f"eval.reference_dir={tmp / 'refcache'}",
  )
  seen = spy_reference_statistics(monkeypatch)
  m = evaluate.run(c, str(workdir), progress=False)
  (train,) = seen  # the pixel training split (streamed from the npz: in RAM)
  assert train.images.shape == (10 - HELD, 8, 8, 3)
  assert m["autoencoder"] == autoencoding.load(str(tmp / "ae"))[2]
  (r,) = m["results"]
  assert np.isfinite(r["fid"]) and r["fid"] > 0


def test_pictures_of_a_latent_run_decode_the_forward_process(run, monkeypatch):
  tmp, module, params, images, c, workdir = run
  seen = {}
  real = visualize.forward_strip

  def spy(x0, schedule, ts, **kw):
    seen.update(x0=x0, schedule=schedule, ts=ts, **kw)
    seen["strip"] = real(x0, schedule, ts, **kw)
    return seen["strip"]

  monkeypatch.setattr(visualize, "forward_strip", spy)
  paths = pictures.run(c, str(workdir), num_images=2)
  assert os.path.isfile(paths["forward"]) and os.path.isfile(paths["schedule"])
  x0, decode = seen["x0"], seen["decode"]
  assert x0.shape == (2, 4, 4, 4) and x0.dtype == np.float32
  raw = x0 / 0.5 + 0.1  # the manifest's normalisation undone: two training images' means
  means = np.asarray(module.apply(params, data.normalize(images), method=module.encode)[0])
  gap = np.abs(raw[:, None] - means[None]).max(axis=(2, 3, 4)).min(axis=1)
  np.testing.assert_array_less(gap, 1e-4)
  # the latents are the normalised posterior means: decoded independently, 8x8 RGB pixels
  want = np.clip(module.apply(params, raw, method=module.decode), -1, 1)
  got = np.asarray(decode(x0))
  assert got.shape == (2, 8, 8, 3)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # the strip's cells are those pixels (t = 0: the image itself, up to abar_0's sliver of noise)
  noise = jax.random.normal(jax.random.PRNGKey(c.seed), x0.shape)
  t0 = np.full((2,), seen["ts"][0])
  cell = data.to_uint8(decode(gaussian.q_sample(seen["schedule"], x0, t0, noise)))
  strip, scale = seen["strip"], 64 // 8
  header = strip.shape[0] - 2 * (64 + 2) - 2
  first = strip[header : header + 64 : scale, 2 : 2 + 64 : scale]
  np.testing.assert_array_equal(first, cell[0])


def test_fid50k_of_a_latent_run_against_an_adm_reference_batch(run, monkeypatch):
  """config.eval.reference with mu, sigma and arr_0 (ADM's format) and random Inception weights
  at 75 x 75: decoded samples in the Inception's features, KID against arr_0's pixels."""
  from test_evaluate import random_inception_weights

  from diffusion.metrics import inception

  tmp, *_, workdir = run
  arr_0 = np.random.default_rng(2).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
  ref = tmp / "VIRTUAL_tiny.npz"
  np.savez(ref, mu=np.zeros(2048), sigma=np.zeros((2048, 2048)), arr_0=arr_0)
  random_inception_weights(tmp / "inception.npz")
  monkeypatch.setattr(inception, "SIZE", 75)
  c = config_of(
    tmp,
    "eval.protocol=fid50k",
    "eval.num_samples=4",
    "eval.kid_pr_samples=4",
    "eval.is_splits=2",
    "eval.chunk_images=4",
    f"eval.reference={ref}",
    f"eval.inception_weights={tmp / 'inception.npz'}",
  )
  seen = spy_reference_statistics(monkeypatch)

  def fid_against_a_point(a, b):  # against N(0, 0): |mu|^2 + Tr S, no 2048 x 2048 sqrtm
    (mu, sigma), (mu_ref, sigma_ref) = a, b
    assert mu.shape == (2048,) and not mu_ref.any() and not sigma_ref.any()  # the file's
    seen.append(float(mu @ mu + np.trace(sigma)))
    return seen[-1]

  monkeypatch.setattr(evaluate.fid50k.distances, "frechet_distance", fid_against_a_point)
  m = evaluate.run(c, str(workdir), progress=False)
  np.testing.assert_array_equal(seen[0].images, arr_0)  # KID and P/R against its pixels
  assert m["reference"]["path"] == str(ref)
  fp = autoencoding.load(str(tmp / "ae"))[2]
  (row,) = runlog.eval_rows(runlog.read_metrics(str(workdir)))
  assert m["autoencoder"] == row["autoencoder"] == fp and row["features"] == "inception"
  assert row["fid"] == seen[-1] and np.isfinite(row["kid"])
