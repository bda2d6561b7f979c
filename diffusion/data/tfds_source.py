"""Any tensorflow-datasets image dataset -> Dataset, read without TensorFlow.

Reads with `tfds.data_source` (random access to array_record files), so the dataset must be
prepared in the array_record format; with `config.data.download` on, tfds tries to download and
prepare it (which needs internet access).
"""

from __future__ import annotations

import numpy as np
from absl import logging

from diffusion.data import images as images_lib
from diffusion.data.dataset import Dataset

_READ_CHUNK = 1024  # examples fetched per random-access call


def _not_prepared(name: str, data_dir: str, split: str, download: bool, err: Exception):
  where = data_dir or "the default tfds data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
  why = ("config.data.download is off" if not download
         else f"downloading failed here: {type(err).__name__}: {err}")
  return FileNotFoundError(
      f"tfds dataset {name!r} (split {split!r}) is not prepared in {where}, and {why}.\n"
      "Prepare it in the array_record format on a machine with internet access:\n"
      f"  tfds build {name} --data_dir DIR --file_format array_record\n"
      "or in Python:\n"
      f"  tfds.builder({name!r}, data_dir=DIR).download_and_prepare(file_format='array_record')\n"
      "then copy DIR to this machine and set config.data.data_dir=DIR.")


def _pick(features, key: str, kind, what: str, config_field: str) -> str | None:
  """The configured feature key (checked), or the first feature of type `kind`."""
  if key:
    if key not in features:
      raise ValueError(f"config.data.{config_field}={key!r} is not a feature of this dataset; "
                       f"its features are {sorted(features)}.")
    return key
  for k, f in features.items():
    if isinstance(f, kind):
      return k
  if what == "image":
    raise ValueError(f"no Image feature in this dataset (features: {sorted(features)}); set "
                     "config.data.image_key.")
  return None


def _read(source, n: int) -> list[dict]:
  """All n examples; batched random access where the source supports it."""
  out = []
  for start in range(0, n, _READ_CHUNK):
    keys = list(range(start, min(start + _READ_CHUNK, n)))
    try:
      out.extend(source.__getitems__(keys))
    except Exception:  # noqa: BLE001 -- some sources (and tfds mocks) only index one by one
      out.extend(source[i] for i in keys)
  return out


def load_tfds(cfg, split: str) -> Dataset:
  """config.data (name, data_dir, image_key, label_key, image_size, ...) and a tfds split
  string (e.g. "train", "test", "train[:90%]") -> Dataset."""
  import tensorflow_datasets as tfds  # slow import: only when this source is used

  if not cfg.name:
    raise ValueError("config.data.name is empty: set it to a tfds dataset name, e.g. "
                     "--config.data.name=cifar10.")
  download = bool(getattr(cfg, "download", True))
  data_dir = cfg.data_dir or None
  try:
    source = tfds.data_source(cfg.name, split=split, data_dir=data_dir, download=download)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"config.data.name={cfg.name!r} is not a tfds dataset (see "
                     "tfds.list_builders()).") from e
  except Exception as e:
    try:
      prepared = tfds.builder(cfg.name, data_dir=data_dir).is_prepared()
    except Exception:  # noqa: BLE001
      prepared = False
    if prepared:  # something else (a bad split, another file format): tfds says what
      raise
    raise _not_prepared(cfg.name, cfg.data_dir, split, download, e) from e

  features = source.dataset_info.features
  image_key = _pick(features, cfg.image_key, tfds.features.Image, "image", "image_key")
  label_key = (None if cfg.label_key == "none" else
               _pick(features, cfg.label_key, tfds.features.ClassLabel, "label", "label_key"))
  examples = _read(source, len(source))
  if not examples:
    raise ValueError(f"tfds {cfg.name} split {split!r} is empty.")
  raw = [np.asarray(ex[image_key], np.uint8) for ex in examples]
  raw = [r[..., None] if r.ndim == 2 else r for r in raw]
  opts = dict(size=cfg.image_size, channels=cfg.channels, resize=cfg.resize,
              background=tuple(cfg.background))
  if len({r.shape for r in raw}) == 1:
    images = images_lib.conform_array(np.stack(raw), **opts)
  else:  # images of varying size: one at a time
    images = np.stack([images_lib.conform_array(r[None], **opts)[0] for r in raw])
  labels, num_classes, names = None, 0, ()
  if label_key is not None:
    labels = np.array([int(ex[label_key]) for ex in examples], np.int32)
    feature = features[label_key]
    if isinstance(feature, tfds.features.ClassLabel):
      num_classes, names = feature.num_classes, tuple(feature.names)
    else:
      num_classes = int(labels.max()) + 1
  logging.info("tfds %s[%s]: %d images (image key %r, label key %r)", cfg.name, split,
               len(images), image_key, label_key)
  return Dataset(images, labels, num_classes, names)
