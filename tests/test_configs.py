"""Every config builds a valid model and says how to run it; configs/common.py loads configs with
overrides and keeps workdir names stable."""

import glob
import os

import pytest
from conftest import ROOT, run_python

from configs import cifar10, common, default, fashion_mnist, folder, mnist, sprites, tiny
from diffusion.model import Diffusion, SampleSettings


@pytest.mark.parametrize(
  "module,arg",
  [
    (default, None),
    (sprites, None),
    (sprites, "peer"),
    (mnist, None),
    (fashion_mnist, None),
    (folder, "64"),
    (cifar10, None),
    (tiny, None),
    (sprites, "dit"),
    (cifar10, "dit"),
  ],
)
def test_config_builds_a_valid_model(module, arg):
  c = module.get_config(arg)
  d = Diffusion.from_config(c)
  assert d.image_shape == (c.data.image_size, c.data.image_size, c.data.channels)
  SampleSettings.from_config(c.sample)
  assert c.data.source in ("sprites", "tfds", "folder", "npz")


def test_every_config_file_says_how_to_run_it():
  for path in glob.glob(os.path.join(ROOT, "configs", "**", "*.py"), recursive=True):
    if os.path.basename(path) not in ("__init__.py", "common.py"):
      text = open(path).read()
      assert "python launch.py --config configs/" in text or "-m experiments.sweep" in text, path


@pytest.mark.parametrize(
  "flags,message",
  [
    (
      ["--config", "configs/sprites.py", "--config.train.learnig_rate=1"],
      'Did you mean "learning_rate"',
    ),
    (["--config", "configs/sprites.py:bogus"], "unknown sprites config variant 'bogus'"),
  ],
)
def test_launch_rejects_a_typo_or_unknown_variant_before_touching_the_workdir(
  tmp_path, flags, message
):
  workdir = tmp_path / "run"
  r = run_python(["launch.py", *flags, "--workdir", str(workdir)], timeout=120)
  assert r.returncode != 0 and message in r.stderr, r.stderr[-2000:]
  assert not workdir.exists()


def test_load_applies_overrides_suggests_near_names_and_locks():
  c = common.load(
    "configs/sprites.py:peer",
    [
      "train.num_steps=50",
      "model.channel_mult=(1,2)",
      "sample.sampler=ddpm",
      "data.random_flip=false",
    ],
  )
  assert (c.train.num_steps, c.model.channel_mult) == (50, (1, 2))
  assert c.sample.sampler == "ddpm" and c.data.random_flip is False and c.model.film is False
  c = common.load("configs/sprites.py", {"diffusion.schedule_params": {"tau": 0.5}})
  assert c.diffusion.schedule_params.tau == 0.5
  with pytest.raises(AttributeError):
    c.train.new_field = 1  # locked
  with pytest.raises(KeyError, match='Did you mean "learning_rate"'):
    common.load("configs/sprites.py", {"train.learnig_rate": 1.0})
  with pytest.raises(TypeError, match="train.num_steps"):
    common.load("configs/sprites.py", {"train.num_steps": "many"})
  with pytest.raises(common.ConfigError, match="nothere.py"):
    common.load("configs/nothere.py")


def test_default_workdir_depends_only_on_what_training_produces():
  # Pinned names: a relaunch of an existing run finds its folder only while these stay the same.
  base = common.default_workdir("configs/sprites.py", sprites.get_config())
  assert base == os.path.join("runs", "sprites-b1c8790e")
  assert common.default_workdir("configs/cifar10.py", cifar10.get_config()).endswith("-06a0d1b3")
  same = sprites.get_config()
  same.sample.num_steps, same.eval.num_images, same.train.log_every = 7, 9, 3
  same.train.checkpoint_every, same.data.prefetch, same.train.steps_per_call = 11, 0, 4
  same.data.data_dir, same.data.cache_dir = "/elsewhere/tfds", "/elsewhere/cache"
  assert common.default_workdir("configs/sprites.py", same) == base
  for change in ({"learning_rate": 3e-4}, {"num_steps": 10}, {"batch_size": 32}):
    other = sprites.get_config()
    other.train.update(change)
    assert common.default_workdir("configs/sprites.py", other) != base, change
  peer = common.default_workdir("configs/sprites.py:peer", sprites.get_config("peer"))
  assert os.path.basename(peer).startswith("sprites-peer-")


def test_training_changes_ignore_the_fields_that_cannot_change_training():
  a = common.as_dict(sprites.get_config())
  b = common.as_dict(sprites.get_config())
  b["sample"]["num_steps"], b["train"]["log_every"], b["train"]["num_steps"] = 3, 7, 1
  assert common.training_changes(a, b) == ["train.num_steps"]
  assert common.training_changes(a, b, ignore=("train.num_steps",)) == []
