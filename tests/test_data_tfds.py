"""The tfds source, TensorFlow-free through tfds.data_source, on tfds.testing.mock_data."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs.default import get_config
from diffusion import data


def _cfg(**overrides):
  cfg = get_config().data
  cfg.update(dict(source="tfds", name="mnist", image_size=16, channels=3), **overrides)
  return cfg


def _mock(n=12):
  return tfds.testing.mock_data(num_examples=n, policy=tfds.testing.MockPolicy.USE_CODE)


def test_tfds_detects_keys_converts_and_uses_the_test_split():
  with _mock():
    train = data.load(_cfg(eval_split="test"))
    held = data.load(_cfg(eval_split="test"), split="eval")
    reference = tfds.data_source("mnist", split="train")[3]["image"]  # (28, 28, 1) uint8
  assert train.images.shape == (12, 16, 16, 3) and held.images.shape == (12, 16, 16, 3)
  assert train.num_classes == 10 and train.class_names[:2] == ("0", "1")
  assert train.labels.dtype == np.int32 and 0 <= train.labels.min() <= train.labels.max() < 10
  img = train.images[3].astype(int)
  assert (img[..., 0] == img[..., 1]).all() and (img[..., 1] == img[..., 2]).all()  # gray -> RGB
  # Resized from 28x28 (an antialiased shrink keeps the mean brightness).
  assert abs(img.mean() - reference.mean()) < 4


def test_tfds_without_eval_split_holds_out_a_fraction():
  with _mock(20):
    train = data.load(_cfg(eval_fraction=0.25))
    held = data.load(_cfg(eval_fraction=0.25), split="eval")
  assert len(train) == 15 and len(held) == 5


def test_tfds_configured_keys():
  with _mock(4):
    unlabelled = data.load(_cfg(label_key="none", image_size=28, channels=1, eval_fraction=0))
    assert unlabelled.labels is None and unlabelled.num_classes == 0
    assert unlabelled.images.shape == (4, 28, 28, 1)
    np.testing.assert_array_equal(unlabelled.images[0],
                                  tfds.data_source("mnist", split="train")[0]["image"])
    with pytest.raises(ValueError, match=r"image_key='pixels'.*\['image', 'label'\]"):
      data.load(_cfg(image_key="pixels"))


def test_tfds_not_prepared_offline_says_how_to_prepare(tmp_path, monkeypatch):
  cfg = _cfg(data_dir=str(tmp_path), download=False)
  with pytest.raises(FileNotFoundError) as info:
    data.load(cfg)
  msg = str(info.value)
  assert str(tmp_path) in msg and "download is off" in msg
  assert "tfds build mnist --data_dir DIR" in msg and "config.data.data_dir" in msg
  assert "download_and_prepare(file_format='array_record')" in msg

  def offline(self, *args, **kwargs):
    raise ConnectionError("no route to host")

  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", offline)
  with pytest.raises(FileNotFoundError, match="(?s)no route to host.*tfds build mnist"):
    data.load(_cfg(data_dir=str(tmp_path), download=True))


def test_tfds_unknown_name():
  with pytest.raises(ValueError, match="not a tfds dataset"):
    data.load(_cfg(name="no_such_dataset_xyz"))
