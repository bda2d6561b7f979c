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
