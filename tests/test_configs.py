"""Every config builds a valid model and names its data; the locked configs reject typos."""

import glob
import os

import jax
import pytest

from configs import cifar10, default, fashion_mnist, folder, mnist, sprites
from diffusion import train, unet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("module,arg", [(default, None), (sprites, None), (sprites, "peer"),
                                        (mnist, None), (fashion_mnist, None), (folder, "64"),
                                        (cifar10, None)])
def test_config_builds_a_valid_model(module, arg):
  c = module.get_config(arg)
  unet.validate(c.model, image_size=c.data.image_size)
  model = train.make_model(c)
  s, ch = c.data.image_size, c.data.channels
  out = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jax.numpy.zeros((1, s, s, ch)),
                                          jax.numpy.zeros((1,)), None, train=False))
  assert unet.count_params(out) > 0
  train.make_schedule(c)
  assert c.data.source in ("sprites", "tfds", "folder", "npz")


def test_every_config_file_says_how_to_run_it():
  for path in glob.glob(os.path.join(ROOT, "configs", "*.py")):
    text = open(path).read()
    if os.path.basename(path) != "__init__.py":
      assert "python launch.py --config configs/" in text, path


def test_config_is_locked_against_typos():
  import ml_collections

  c = ml_collections.config_dict.ConfigDict(default.get_config())
  c.lock()
  with pytest.raises(AttributeError):
    c.train.learnig_rate = 1.0


@pytest.mark.parametrize("flags,message", [
  (["--config", "configs/sprites.py", "--config.train.learnig_rate=1"],
   'Did you mean "learning_rate"'),
  (["--config", "configs/sprites.py:bogus"], "unknown sprites config variant 'bogus'"),
])
def test_launch_rejects_a_typo_or_unknown_variant_before_touching_the_workdir(tmp_path, flags,
                                                                             message):
  import subprocess
  import sys

  workdir = tmp_path / "run"
  r = subprocess.run([sys.executable, "launch.py", *flags, "--workdir", str(workdir)], cwd=ROOT,
                     capture_output=True, text=True, timeout=120,
                     env=dict(os.environ, JAX_PLATFORMS="cpu", DIFFUSION_MALLOC="off"))
  assert r.returncode != 0 and message in r.stderr, r.stderr[-2000:]
  assert not workdir.exists()


def test_default_workdir_depends_only_on_what_training_produces():
  import launch

  base = launch.default_workdir("configs/sprites.py", sprites.get_config())
  assert base == launch.default_workdir("configs/sprites.py", sprites.get_config())
  name, digest = os.path.basename(base).rsplit("-", 1)
  assert os.path.dirname(base) == "runs" and name == "sprites" and len(digest) == 8
  same = sprites.get_config()
  same.sample.num_steps, same.eval.num_images, same.train.log_every = 7, 9, 3
  same.train.checkpoint_every, same.data.prefetch, same.train.steps_per_call = 11, 0, 4
  same.data.data_dir, same.data.cache_dir = "/elsewhere/tfds", "/elsewhere/cache"
  assert launch.default_workdir("configs/sprites.py", same) == base
  for change in ({"learning_rate": 3e-4}, {"num_steps": 10}, {"batch_size": 32}):
    other = sprites.get_config()
    other.train.update(change)
    assert launch.default_workdir("configs/sprites.py", other) != base, change
  peer = launch.default_workdir("configs/sprites.py:peer", sprites.get_config("peer"))
  assert os.path.basename(peer).startswith("sprites-peer-")
