"""--mode sample: files, determinism by seed, checkpoint and parameter choice, labels, launch."""

import glob
import json
import os

import jax
import numpy as np
import pytest
from conftest import fabricate_checkpoints, launch, tiny_config
from PIL import Image

from diffusion import checkpoints, visualize
from diffusion.model import resolve_labels
from diffusion.modes import sample


def sample_config(num_classes: int = 0):
  """A one-level U-Net predicting v: the zero function is then the exact denoiser of N(0, I)
  data, so a slightly perturbed fresh model (`fabricate_checkpoints`) gives images of a moderate
  range that depend on the parameters, the sampler and the noise."""
  c = tiny_config()
  c.model.update(channel_mult=(1,), attn_resolutions=(), num_classes=num_classes)
  c.diffusion.update(num_timesteps=100, prediction="v")
  c.sample.update(num_images=10, batch_size=4, num_steps=5, gif_images=4)
  return c


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("sample"))
  fabricate_checkpoints(sample_config(), path, [5, 10])
  return path


def npz(folder):
  with np.load(os.path.join(folder, "samples.npz")) as z:
    return {k: z[k] for k in z.files}


def test_sample_mode_writes_images_settings_and_gif(workdir):
  c = sample_config()
  out = sample.run(c, workdir, progress=False)
  assert os.path.basename(out) == "step10_ddim5_uniform_g1_seed0"
  images = npz(out)["images"]
  assert images.dtype == np.uint8 and images.shape == (10, 8, 8, 3)
  assert "labels" not in npz(out)  # unconditional
  pngs = sorted(glob.glob(os.path.join(out, "images", "*.png")))
  assert [os.path.basename(p) for p in pngs] == [f"{i:05d}.png" for i in range(10)]
  np.testing.assert_array_equal(np.asarray(Image.open(pngs[7])), images[7])
  with Image.open(os.path.join(out, "grid.png")) as g:  # 4 columns of 64 px cells + padding
    assert g.size == (4 * 65 + 1, 3 * 65 + 1)
  with Image.open(os.path.join(out, "reverse.gif")) as gif:  # x_T + 5 steps, 2x2 grid
    assert gif.n_frames == 6 and gif.size == (2 * 65 + 1, 2 * 65 + 1)
    gif.seek(5)
    last = np.asarray(gif.convert("RGB"), np.float32)
  # It ends on the first saved images (up to the GIF's 256-colour palette).
  want = visualize.grid(images[:4], scale=8).astype(np.float32)
  assert np.abs(last - want).mean() < 4 < np.abs(last - visualize.grid(images[4:8], scale=8)).mean()
  s = json.load(open(os.path.join(out, "settings.json")))
  assert s["checkpoint_step"] == 10 and s["parameters"] == "ema" and s["seed"] == 0
  assert (s["sampler"], s["num_steps"], s["nfe"], s["batch_size"]) == ("ddim", 5, 5, 4)
  assert s["runtime"] == {
    "devices": jax.device_count(),
    "processes": 1,
    "jax_version": jax.__version__,
    "backend": "cpu",
  }
  assert images.std() > 5  # not a constant picture


def test_same_seed_same_images_and_every_setting_matters(workdir):
  c = sample_config()
  c.sample.tag = "a"
  base = npz(sample.run(c, workdir, progress=False))["images"]
  c.sample.tag = "b"
  np.testing.assert_array_equal(npz(sample.run(c, workdir, progress=False))["images"], base)
  # The first batch depends only on (seed, batch index): fewer images are a prefix.
  c.sample.update(tag="c", num_images=4, gif_images=0)
  out = sample.run(c, workdir, progress=False)
  np.testing.assert_array_equal(npz(out)["images"], base[:4])
  assert not os.path.exists(os.path.join(out, "reverse.gif"))
  variants = {
    "seed": dict(seed=1),
    "raw params": dict(use_ema=False),
    "older checkpoint": dict(checkpoint=5),
    "sampler": dict(sampler="dpm_solver++"),
    "eta": dict(eta=1.0),
  }
  for what, change in variants.items():
    c = sample_config()
    c.sample.update(num_images=4, gif_images=0, **change)
    out = sample.run(c, workdir, progress=False)
    assert np.abs(npz(out)["images"].astype(int) - base[:4]).mean() > 1, what
  assert os.path.isdir(os.path.join(workdir, "samples", "step5_ddim5_uniform_g1_seed0"))
  assert os.path.isdir(os.path.join(workdir, "samples", "step10_ddim5_eta1_uniform_g1_seed0"))
  assert os.path.isdir(os.path.join(workdir, "samples", "step10_ddim5_uniform_g1_seed0_raw"))


def test_bad_requests_name_the_fix(workdir, tmp_path):
  c = sample_config()
  c.sample.checkpoint = 7
  with pytest.raises(ValueError, match=r"no checkpoint at step 7.*\[5, 10\]"):
    sample.run(c, workdir)
  with pytest.raises(FileNotFoundError, match="train first"):
    sample.run(sample_config(), str(tmp_path))
  c = sample_config()
  c.model.base_channels = 16
  with pytest.raises(checkpoints.ShapeMismatchError, match="config.json"):
    sample.run(c, workdir)
  c = sample_config()
  c.sample.labels = "1"
  with pytest.raises(ValueError, match="unconditional"):
    sample.run(c, workdir)
  c = sample_config()
  c.sample.sampler = "unipc"
  with pytest.raises(ValueError, match="unknown sampler 'unipc'"):
    sample.run(c, workdir)


def test_conditional_labels_and_guidance(tmp_path):
  c = sample_config(num_classes=3)
  fabricate_checkpoints(c, str(tmp_path), [1], scale=0.1)  # labels with a visible effect
  c.sample.update(guidance_scale=2.0, gif_images=0, num_images=6)
  out = sample.run(c, str(tmp_path), progress=False)
  np.testing.assert_array_equal(npz(out)["labels"], [0, 1, 2, 0, 1, 2])  # cycled classes
  c.sample.labels = "2"
  out = sample.run(c, str(tmp_path), progress=False)
  assert os.path.basename(out) == "step1_ddim5_uniform_g2_seed0_y2"
  np.testing.assert_array_equal(npz(out)["labels"], [2] * 6)
  meta = json.load(open(os.path.join(out, "settings.json")))
  assert meta["guidance_scale"] == 2.0
  assert (meta["nfe"], meta["network_passes_per_image"]) == (5, 10)
  guided = npz(out)["images"]
  c.sample.guidance_scale = 1.0  # plain conditional sampling gives other images
  plain = npz(sample.run(c, str(tmp_path), progress=False))["images"]
  assert np.abs(guided.astype(int) - plain).mean() > 1
  c.sample.guidance_scale = 2.0
  c.sample.labels = "3"  # the null class: unconditional samples of a conditional model
  assert resolve_labels(3, c.sample.labels, 2).tolist() == [3, 3]
  with pytest.raises(ValueError, match=r"\[0, 2\]"):
    resolve_labels(3, "4", 2)


def test_launch_sample_mode(workdir):
  """launch.py --mode sample end to end, on the checkpoint of the command-line model."""
  r = launch(
    workdir,
    "--mode",
    "sample",
    "--config.model.channel_mult=(1,)",
    "--config.model.attn_resolutions=()",
    "--config.diffusion.num_timesteps=100",
    "--config.diffusion.prediction=v",
    "--config.sample.num_images=3",
    "--config.sample.num_steps=2",
    "--config.sample.gif_images=0",
    "--config.sample.seed=4",
  )
  assert r.returncode == 0, r.stderr[-3000:]
  out = os.path.join(workdir, "samples", "step10_ddim2_uniform_g1_seed4")
  assert npz(out)["images"].shape == (3, 8, 8, 3)
  assert os.path.exists(os.path.join(out, "grid.png"))
