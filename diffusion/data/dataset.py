"""The in-memory `Dataset`, the held-out split, and `load`, which dispatches on the source."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging

from diffusion.data import images as images_lib

# The held-out subset is drawn with this fixed seed, not config.seed, so that it stays the same
# across seed sweeps and restarts.
_HOLDOUT_SEED = 0x0E7A1


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """Images in memory.

  images: uint8 (N, H, W, C), values in [0, 255].
  labels: int32 (N,) in [0, num_classes), or None when unlabelled.
  num_classes: number of classes, 0 when unlabelled.
  class_names: optional names of the classes (index = label).
  """

  images: np.ndarray
  labels: np.ndarray | None
  num_classes: int
  class_names: tuple[str, ...] = ()

  def __post_init__(self):
    if self.images.ndim != 4 or self.images.dtype != np.uint8:
      raise ValueError(f"Dataset.images must be uint8 (N, H, W, C), got {self.images.dtype} "
                       f"{self.images.shape}.")
    if self.labels is not None and (self.labels.shape != self.images.shape[:1]
                                    or self.labels.dtype != np.int32):
      raise ValueError(f"Dataset.labels must be int32 ({len(self.images)},), got "
                       f"{self.labels.dtype} {self.labels.shape}.")

  def __len__(self) -> int:
    return len(self.images)

  def take(self, index: np.ndarray) -> Dataset:
    """The examples at `index` (int array), same classes."""
    labels = None if self.labels is None else self.labels[index]
    return dataclasses.replace(self, images=self.images[index], labels=labels)


def write_cache(path: Path, **arrays: Any) -> None:
  """np.savez to `path` atomically (a uniquely named temporary file, then a rename, so that
  processes of a multi-host job may share the folder). A failure only logs a warning: the next
  run decodes again."""
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".tmp-{path.stem}-",
                                     suffix=".npz", delete=False) as fh:
      try:
        np.savez(fh, **arrays)
      except BaseException:
        os.unlink(fh.name)
        raise
    os.chmod(fh.name, 0o644)  # as open() would make it, not 0600
    os.replace(fh.name, path)
  except OSError as e:
    logging.warning("could not write the cache %s (%s); the next run decodes again. Set "
                    "config.data.cache_dir to a writable folder.", path, e)


def holdout_indices(n: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """Splits range(n) into sorted (train, eval) index arrays; eval is a fixed random `fraction`
  (at least one example when fraction > 0 and n > 1), independent of any training seed."""
  k = 0 if fraction <= 0 or n < 2 else min(n - 1, max(1, round(n * fraction)))
  order = np.random.default_rng(_HOLDOUT_SEED).permutation(n)
  return np.sort(order[k:]), np.sort(order[:k])


def _sprites(cfg) -> Dataset:
  from diffusion.data import sprites

  imgs, labels = sprites.generate(int(cfg.num_sprites), int(getattr(cfg, "sprite_seed", 0)))
  # Pixel art: always nearest-neighbour, whatever config.data.resize says.
  imgs = images_lib.conform_array(imgs, size=cfg.image_size, channels=cfg.channels,
                                  resize="nearest")
  return Dataset(imgs, labels, len(sprites.CLASSES), tuple(sprites.CLASSES))


def _folder(cfg) -> Dataset:
  from diffusion.data import folder

  return folder.load_folder(cfg)


def _npz(cfg) -> Dataset:
  from diffusion.data import npz

  return npz.load_npz(cfg)


def _tfds(cfg, split: str | None = None) -> Dataset:
  from diffusion.data import tfds_source

  return tfds_source.load_tfds(cfg, split or cfg.split)


SOURCES: dict[str, Callable[[Any], Dataset]] = {
    "folder": _folder, "tfds": _tfds, "npz": _npz, "sprites": _sprites}


def load(data_config: Any, *, split: str = "train") -> Dataset:
  """Loads `config.data` as a Dataset (uint8 (N, H, W, C) images in [0, 255]).

  split: "train", or "eval" for the held-out part: the tfds `eval_split` when it is set,
  otherwise a fixed `eval_fraction` of the data, which "train" then excludes.
  """
  if split not in ("train", "eval"):
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}.")
  cfg = data_config
  if cfg.source not in SOURCES:
    raise ValueError(f"config.data.source={cfg.source!r} is unknown; use one of "
                     f"{sorted(SOURCES)}.")
  images_lib.check_options(cfg.image_size, cfg.channels, cfg.resize)
  if cfg.source == "tfds" and cfg.eval_split:
    data = _tfds(cfg, cfg.split if split == "train" else cfg.eval_split)
  else:
    full = SOURCES[cfg.source](cfg)  # all of it; "train" and "eval" each read it once
    train_idx, eval_idx = holdout_indices(len(full), float(cfg.eval_fraction))
    if split == "eval" and not len(eval_idx):
      raise ValueError(f"no held-out data: {len(full)} example(s) with eval_fraction="
                       f"{cfg.eval_fraction}; set config.data.eval_fraction > 0"
                       + (" or config.data.eval_split" if cfg.source == "tfds" else "") + ".")
    data = full.take(train_idx if split == "train" else eval_idx)
  logging.info("data %s/%s: %d images %s, %d classes", cfg.source, split, len(data),
               data.images.shape[1:], data.num_classes)
  return data
