"""data/dataset.py and data/loader.py: DataSpec mirrors config.data, sources by name, and no
np.load of a data module unpickles."""

import ast
import dataclasses
import importlib
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import data_spec

from configs.default import get_config
from diffusion import data


def test_data_spec_mirrors_config_data():
  cfg = get_config().data
  assert {f.name for f in dataclasses.fields(data.DataSpec)} == set(cfg.keys())
  assert data.DataSpec(**cfg.to_dict()) == data.DataSpec()  # same defaults
  # config.json gives lists: background becomes one hashable tuple of ints again.
  spec = data.DataSpec(**json.loads(json.dumps(cfg.to_dict())))
  assert spec == data.DataSpec() and spec.background == (255, 255, 255) and hash(spec)
  assert data.DataSpec(background=[0, 1.0, np.uint8(2)]).background == (0, 1, 2)
  for name in ("cifar10", "fashion_mnist", "folder", "mnist", "sprites"):  # every shipped config
    config = importlib.import_module(f"configs.{name}").get_config()
    assert data.DataSpec(**config.data.to_dict()).source == config.data.source
  with pytest.raises(TypeError, match="image_sise"):
    data.DataSpec(**cfg.to_dict(), image_sise=32)
  with pytest.raises(ValueError, match="background must be 3"):
    data.DataSpec(background=(0, 0))
  with pytest.raises(ValueError, match=r"\[0, 255\]"):
    data.DataSpec(background=(0, 0, 256))
  with pytest.raises(dataclasses.FrozenInstanceError):
    spec.path = "x"  # type: ignore[misc]
  with pytest.raises(TypeError, match=r"DataSpec\(\*\*config.data.to_dict\(\)\)"):
    data.load(cfg)  # a ConfigDict is refused


def test_every_np_load_refuses_pickles():
  """Every np.load under diffusion/data says allow_pickle=False itself (no reliance on the
  default), so no file is ever unpickled."""
  calls = []
  for path in Path(data.__file__).parent.glob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "load"
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id in ("np", "numpy")
      ):
        kw = {k.arg: k.value for k in node.keywords}
        ok = isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value is False
        calls.append((f"{path.name}:{node.lineno}", ok))
  assert calls and all(ok for _, ok in calls), calls


def test_unknown_source_and_bad_split():
  with pytest.raises(ValueError, match="folder.*npz.*sprites.*tfds"):
    data.load(data_spec(source="lmdb"))
  with pytest.raises(ValueError, match="eval_fraction"):
    data.load(data_spec(num_sprites=50, eval_fraction=0.0), split="eval")
