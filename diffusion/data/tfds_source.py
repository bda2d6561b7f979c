"""Any tensorflow-datasets image dataset -> Dataset, read without TensorFlow.

Reads with `tfds.data_source` (random access to array_record files), so the dataset must be
prepared in the array_record format; with `config.data.download` on, tfds tries to download and
prepare it (which needs internet access).

Each example is resized as it is read into one preallocated uint8 array, so memory holds the
result plus one chunk of full-resolution examples. The result is cached as .npz in
`config.data.cache_dir` (default ~/.cache/diffusion, or $XDG_CACHE_HOME/diffusion), under `tfds/`,
keyed by the dataset (name, resolved name/config/version, split, data_dir, size, preparation time)
and the conversion options, so a second run only opens the data source and reads the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
from absl import logging

from diffusion.data import images as images_lib
from diffusion.data.cache import read_cache, write_cache
from diffusion.data.dataset import Dataset, DataSpec

_READ_CHUNK = 64  # examples fetched (at full resolution) per random-access call
_CACHE_VERSION = 1  # bump when decoding changes, so old caches are not reused


def _not_prepared(name: str, data_dir: str, split: str, download: bool, err: Exception):
  where = data_dir or "the default tfds data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
  why = (
    "config.data.download is off"
    if not download
    else f"downloading failed here: {type(err).__name__}: {err}"
  )
  return FileNotFoundError(
    f"tfds dataset {name!r} (split {split!r}) is not prepared in {where}, and {why}.\n"
    "Prepare it in the array_record format on a machine with internet access:\n"
    f"  tfds build {name} --data_dir DIR --file_format array_record\n"
    "or in Python:\n"
    f"  tfds.builder({name!r}, data_dir=DIR).download_and_prepare(file_format='array_record')\n"
    "then copy DIR to this machine and set config.data.data_dir=DIR."
  )


def _pick(features, key: str, kind, what: str, config_field: str) -> str | None:
  """The configured feature key (checked), or the first feature of type `kind`."""
  if key:
    if key not in features:
      raise ValueError(
        f"config.data.{config_field}={key!r} is not a feature of this dataset; "
        f"its features are {sorted(features)}."
      )
    return key
  for k, f in features.items():
    if isinstance(f, kind):
      return k
  if what == "image":
    raise ValueError(
      f"no Image feature in this dataset (features: {sorted(features)}); set config.data.image_key."
    )
  return None


def _read(source, keys: list[int]) -> list:
  """The examples at `keys`; one batched random-access call where the source supports it."""
  try:
    return list(source.__getitems__(keys))
  except Exception:  # noqa: BLE001 -- some sources (and tfds mocks) only index one by one
    return [source[i] for i in keys]


def _to_uint8(image, key: str) -> np.ndarray:
  """An image feature's value -> uint8 (H, W, C); uint16 keeps its top 8 bits (by dtype)."""
  a = np.asarray(image)
  if a.dtype == np.uint16:
    a = images_lib.uint16_to_uint8(a)
  elif a.dtype != np.uint8:
    if (
      not (np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_)
      or a.size
      and (a.min() < 0 or a.max() > 255)
    ):
      raise ValueError(
        f"feature {key!r} holds {a.dtype} values; expected uint8 or uint16 images "
        "(set config.data.image_key to an image feature)."
      )
    a = a.astype(np.uint8)
  return a[..., None] if a.ndim == 2 else a


def _cache_root(spec: DataSpec) -> Path:
  """config.data.cache_dir, else $XDG_CACHE_HOME/diffusion (~/.cache/diffusion)."""
  if spec.cache_dir:
    return Path(spec.cache_dir).expanduser()
  return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "diffusion"


def _prepared_stamp(info) -> int | None:
  """mtime of the prepared dataset's dataset_info.json (local data_dir only): preparing the
  dataset again gives a new cache key."""
  where = str(info.data_dir)
  if "://" in where:
    return None
  try:
    return os.stat(os.path.join(where, "dataset_info.json")).st_mtime_ns
  except OSError:
    return None


def _load_cache(path: Path, n: int, opts: dict) -> Dataset:
  z = read_cache(path)
  images = z["images"]
  if images.shape != (n, opts["size"], opts["size"], opts["channels"]):
    raise ValueError(f"it holds images {images.shape}")
  labels = z["labels"] if bool(z["has_labels"]) else None
  return Dataset(images, labels, int(z["num_classes"]), tuple(str(c) for c in z["class_names"]))


def _save_cache(path: Path, data: Dataset) -> None:
  write_cache(
    path,
    images=data.images,
    labels=data.labels if data.labels is not None else np.zeros(0, np.int32),
    has_labels=data.labels is not None,
    num_classes=data.num_classes,
    class_names=np.array(data.class_names, dtype=str),
  )


def load_tfds(spec: DataSpec, split: str) -> Dataset:
  """spec (name, data_dir, image_key, label_key, image_size, ...) and a tfds split string
  (e.g. "train", "test", "train[:90%]") -> Dataset."""
  import tensorflow_datasets as tfds  # slow import: only when this source is used

  if not spec.name:
    raise ValueError(
      "config.data.name is empty: set it to a tfds dataset name, e.g. --config.data.name=cifar10."
    )
  download = spec.download
  data_dir = spec.data_dir or None
  try:
    source = tfds.data_source(spec.name, split=split, data_dir=data_dir, download=download)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(
      f"config.data.name={spec.name!r} is not a tfds dataset (see tfds.list_builders())."
    ) from e
  except Exception as e:
    try:
      prepared = tfds.builder(spec.name, data_dir=data_dir).is_prepared()
    except Exception:  # noqa: BLE001
      prepared = False
    if prepared:  # something else (a bad split, another file format): tfds says what
      raise
    raise _not_prepared(spec.name, spec.data_dir, split, download, e) from e

  features = source.dataset_info.features
  image_key = _pick(features, spec.image_key, tfds.features.Image, "image", "image_key")
  label_key = (
    None
    if spec.label_key == "none"
    else _pick(features, spec.label_key, tfds.features.ClassLabel, "label", "label_key")
  )
  n = len(source)
  if not n:
    raise ValueError(f"tfds {spec.name} split {split!r} is empty.")
  opts = dict(
    size=int(spec.image_size),
    channels=int(spec.channels),
    resize=str(spec.resize),
    background=[int(v) for v in spec.background],
  )
  info = source.dataset_info
  key = hashlib.sha256(
    json.dumps(
      {
        "version": _CACHE_VERSION,
        "name": spec.name,
        "full_name": info.full_name,
        "split": split,
        "data_dir": str(spec.data_dir),
        "dataset_dir": str(info.data_dir),
        "num_examples": n,
        "prepared": _prepared_stamp(info),
        "image_key": image_key,
        "label_key": label_key,
        "options": opts,
      },
      sort_keys=True,
    ).encode()
  ).hexdigest()[:24]
  cache = _cache_root(spec) / "tfds" / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', spec.name)}-{key}.npz"
  if cache.exists():
    try:
      data = _load_cache(cache, n, opts)
      logging.info("tfds %s[%s]: %d images from the cache %s", spec.name, split, n, cache)
      return data
    except Exception as e:  # noqa: BLE001 -- a damaged cache is rebuilt
      logging.warning("cache %s is unreadable (%s); decoding again.", cache, e)

  # Each example is resized as it is read, into a preallocated array: memory holds the result
  # and one chunk of full-resolution examples, never the whole dataset at full resolution.
  images = np.empty((n, opts["size"], opts["size"], opts["channels"]), np.uint8)
  labels = None if label_key is None else np.empty(n, np.int64)
  for start in range(0, n, _READ_CHUNK):
    keys = list(range(start, min(start + _READ_CHUNK, n)))
    chunk = _read(source, keys)
    if len(chunk) != len(keys):
      raise ValueError(
        f"tfds {spec.name}[{split}]: asked for examples {start}..{keys[-1]}, got "
        f"{len(chunk)}; the prepared dataset looks damaged (prepare it again)."
      )
    for i, ex in enumerate(chunk, start):
      images[i] = images_lib.conform_array(_to_uint8(ex[image_key], image_key)[None], **opts)[0]
      if labels is not None:
        labels[i] = int(ex[label_key])
  num_classes, names = 0, ()
  if labels is not None:
    feature = features[label_key]
    if isinstance(feature, tfds.features.ClassLabel):
      num_classes, names = feature.num_classes, tuple(feature.names)
    else:
      num_classes = int(labels.max()) + 1
    if labels.min() < 0 or labels.max() >= num_classes:
      raise ValueError(
        f"tfds {spec.name}: labels of {label_key!r} lie in [{labels.min()}, "
        f"{labels.max()}], outside [0, {num_classes}); set config.data.label_key "
        "to a class-label feature, or to 'none' for unlabelled training."
      )
    labels = labels.astype(np.int32)
  data = Dataset(images, labels, num_classes, names)
  _save_cache(cache, data)
  logging.info(
    "tfds %s[%s]: decoded %d images (image key %r, label key %r), cached in %s",
    spec.name,
    split,
    n,
    image_key,
    label_key,
    cache,
  )
  return data
