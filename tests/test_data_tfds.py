"""The tfds source, TensorFlow-free through tfds.data_source, on tfds.testing.mock_data."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs.default import get_config
from diffusion import data
from diffusion.data import tfds_source


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
  """Each test caches under its own tmp folder (the default cache_dir is $XDG_CACHE_HOME/...)."""
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  return tmp_path / "xdg" / "diffusion" / "tfds"


def _cfg(**overrides) -> data.DataSpec:
  """config.data for tfds mnist with `overrides`, as callers pass it: a DataSpec."""
  cfg = get_config().data
  cfg.update(dict(source="tfds", name="mnist", image_size=16, channels=3), **overrides)
  return data.DataSpec(**cfg.to_dict())


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
    np.testing.assert_array_equal(
      unlabelled.images[0], tfds.data_source("mnist", split="train")[0]["image"]
    )
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


def test_tfds_second_load_comes_from_the_cache(_private_cache, monkeypatch):
  monkeypatch.setattr(tfds_source, "_READ_CHUNK", 5)  # read in chunks of 5, 5 and 2 examples
  with _mock(12):
    first = data.load(_cfg(eval_fraction=0))
    reference = [tfds.data_source("mnist", split="train")[i]["image"] for i in (0, 11)]
  files = sorted(_private_cache.glob("mnist-*.npz"))
  assert len(files) == 1 and not list(_private_cache.glob(".tmp-*"))
  assert abs(first.images[11].mean() - reference[1].mean()) < 4  # the last chunk is filled

  def no_reading(*args, **kwargs):
    raise AssertionError("read from the data source again")

  with _mock(12), monkeypatch.context() as m:
    base = tfds.core.data_sources.base.BaseDataSource
    m.setattr(base, "__getitem__", no_reading)
    m.setattr(base, "__getitems__", no_reading)
    second = data.load(_cfg(eval_fraction=0))
    np.testing.assert_array_equal(second.images, first.images)
    np.testing.assert_array_equal(second.labels, first.labels)
    assert second.num_classes == 10 and second.class_names == first.class_names
    with pytest.raises(AssertionError, match="again"):  # other options: another cache entry
      data.load(_cfg(eval_fraction=0, image_size=8))
  files[0].write_bytes(b"damaged")  # a damaged cache is decoded again and rewritten
  with _mock(12):
    third = data.load(_cfg(eval_fraction=0))
  np.testing.assert_array_equal(third.images, first.images)
  with np.load(files[0]) as z:
    np.testing.assert_array_equal(z["images"], first.images)


class TinyPics(tfds.core.GeneratorBasedBuilder):
  """A real (not mocked) dataset, prepared TensorFlow-free in a test's data_dir: 6 examples of
  uint8 (8, 10, 3) `image`, uint16 (4, 4) `depth` and a 2-class `label`."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Tensor(shape=(8, 10, 3), dtype=np.uint8),
          "depth": tfds.features.Tensor(shape=(4, 4), dtype=np.uint16),
          "label": tfds.features.ClassLabel(names=["even", "odd"]),
        }
      ),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i in range(6):
      yield (
        i,
        {
          "image": tiny_image(i),
          "depth": np.full((4, 4), 200 + 0x1000 * i, np.uint16),
          "label": i % 2,
        },
      )


def tiny_image(i):
  return (np.arange(8 * 10 * 3).reshape(8, 10, 3) + 7 * i).astype(np.uint8)


def test_tfds_reads_a_prepared_dataset_from_data_dir(tmp_path):
  """mock_data replaces any data_dir with its own, so this prepares a real array_record dataset
  in a fresh data_dir (found nowhere else) and reads it back."""
  data_dir = tmp_path / "tfds_data"
  TinyPics(data_dir=str(data_dir)).download_and_prepare(file_format="array_record")
  cfg = _cfg(
    name="tiny_pics",
    data_dir=str(data_dir),
    image_key="image",
    image_size=8,
    resize="nearest",
    eval_fraction=0,
    download=False,
  )
  ds = data.load(cfg)
  assert ds.images.shape == (6, 8, 8, 3) and ds.class_names == ("even", "odd")
  ids = (ds.images[:, 0, 0, 0].astype(int) - 3) // 7  # tfds stores the examples shuffled
  assert sorted(ids) == list(range(6))
  np.testing.assert_array_equal(ds.labels, ids % 2)
  np.testing.assert_array_equal(ds.images, [tiny_image(i)[:, 1:9] for i in ids])  # centre crop
  # uint16 values keep their top 8 bits, by dtype: 200 (<= 255) is dark, not 8-bit 200.
  depth = data.load(
    _cfg(
      name="tiny_pics",
      data_dir=str(data_dir),
      image_key="depth",
      image_size=4,
      channels=1,
      eval_fraction=0,
      download=False,
    )
  )
  np.testing.assert_array_equal(depth.images[:, 0, 0, 0], 16 * ids)  # (200 + 4096 i) >> 8
  with pytest.raises(FileNotFoundError, match="not prepared in .*default"):  # not elsewhere
    data.load(_cfg(name="tiny_pics", image_key="image", download=False))
