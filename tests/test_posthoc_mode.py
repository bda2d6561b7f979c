"""--mode posthoc end to end: training tracks power-function EMAs and keeps their snapshots; the
reconstruction of a tracked profile is that profile; sample mode uses a reconstruction."""

import json
import os

import jax
import numpy as np
import pytest
from conftest import tiny_config

from diffusion import checkpoints, parameters, posthoc_ema, train
from diffusion.model import Diffusion
from diffusion.modes import posthoc, sample


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("phema"))
  c = tiny_config(num_steps=6, checkpoint_every=3, posthoc_ema=(0.05, 0.10), posthoc_every=2)
  state = train.train(c, wd)
  return c, wd, jax.device_get(state)


def test_snapshots_are_kept_and_the_reconstruction_of_a_tracked_profile_is_that_profile(trained):
  c, wd, state = trained
  reader = checkpoints.Checkpointer(os.path.join(wd, "phema"), read_only=True)
  assert reader.all_steps() == [2, 4, 6]  # every snapshot is kept
  reader.close()
  np.testing.assert_allclose(np.asarray(state.phema.sigma_rels), [0.05, 0.10], rtol=1e-6)
  c.sample.ema = "posthoc:0.1"
  out = posthoc.run(c, wd)
  coefficients = json.load(open(os.path.join(out, "coefficients.json")))["snapshots"]
  own = [
    x["coefficient"]
    for x in coefficients
    if x["step"] == 6 and abs(x["gamma"] - float(posthoc_ema.std_to_exp(0.1))) < 1e-3
  ]
  assert own == [pytest.approx(1.0, abs=1e-6)]
  step, params = parameters.load_posthoc(Diffusion.from_config(c), wd, 0.1)
  assert step == 6
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(state.phema.emas[1]), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_sample_mode_uses_a_reconstructed_ema(trained):
  c, wd, _ = trained
  c.sample.update(ema="posthoc:0.07", num_images=2, batch_size=2, gif_images=0)
  posthoc.run(c, wd)
  out = sample.run(c, wd, progress=False)
  assert os.path.basename(out).endswith("_phema0.07")
  assert json.load(open(os.path.join(out, "settings.json")))["parameters"] == "posthoc:0.07"
  c.sample.ema = "posthoc:0.2"
  with pytest.raises(FileNotFoundError, match="run --mode posthoc"):
    sample.run(c, wd, progress=False)
  c.sample.ema = "phema:0.1"
  with pytest.raises(ValueError, match="posthoc:<sigma_rel>"):
    parameters.sigma_rel_of(c.sample.ema)


def test_a_damaged_snapshot_is_left_out_with_a_warning(trained, tmp_path, caplog):
  import logging
  import shutil

  c, wd, state = trained
  copy = str(tmp_path / "wd")
  shutil.copytree(wd, copy)
  shutil.rmtree(os.path.join(copy, "posthoc"), ignore_errors=True)  # earlier tests' results
  open(os.path.join(copy, "phema", "4", "default", "manifest.ocdbt"), "w").close()
  c.sample.ema = "posthoc:0.1"
  caplog.set_level(logging.WARNING)
  out = posthoc.run(c, copy)
  assert "step 4" in caplog.text and "Left out of the reconstruction" in caplog.text
  used = json.load(open(os.path.join(out, "coefficients.json")))["snapshots"]
  assert sorted({x["step"] for x in used}) == [2, 6]
  _, params = parameters.load_posthoc(Diffusion.from_config(c), copy, 0.1)  # step 6 holds 0.1
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(state.phema.emas[1]), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  for step in (2, 6):
    open(os.path.join(copy, "phema", str(step), "default", "manifest.ocdbt"), "w").close()
  with pytest.raises(FileNotFoundError, match=r"no intact power-EMA snapshot .*damaged: steps"):
    posthoc.run(c, copy)
