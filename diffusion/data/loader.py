"""`load`: a `DataSpec` -> the train or held-out `Dataset`, dispatched on `spec.source`.

Sits above the sources (folder, npz, sprites, tfds, shards), which import only dataset.py,
cache.py and images.py below them.
"""

from __future__ import annotations

from collections.abc import Callable

from absl import logging

from diffusion.data import images as images_lib
from diffusion.data.dataset import Dataset, DataSpec, holdout_indices
from diffusion.data.folder import load_folder
from diffusion.data.latents import LatentDataset, open_latents
from diffusion.data.npz import load_npz
from diffusion.data.shards import ShardDataset, open_shards
from diffusion.data.tfds_source import load_tfds  # imports tensorflow_datasets only when called


def _sprites(spec: DataSpec) -> Dataset:
  # Imported when used, so that `python -m diffusion.data.sprites` finds it not yet imported.
  from diffusion.data import sprites

  return sprites.load_sprites(spec)


def _tfds(spec: DataSpec) -> Dataset:
  return load_tfds(spec, spec.split)


# source name -> all of its data (before the held-out split); shards stay on disk.
SOURCES: dict[str, Callable[[DataSpec], Dataset | ShardDataset]] = {
  "folder": load_folder,
  "tfds": _tfds,
  "npz": load_npz,
  "sprites": _sprites,
  "shards": open_shards,
  "latents": open_latents,  # streamed: posterior moments, drawn per step
}


def load(spec: DataSpec, *, split: str = "train", stream: bool = False) -> Dataset | ShardDataset:
  """Loads `spec` as a Dataset (uint8 (N, H, W, C) images in [0, 255]).

  spec: built from the config with `DataSpec(**config.data.to_dict())`.
  split: "train", or "eval" for the held-out part: the tfds `eval_split` when it is set,
  otherwise a fixed `eval_fraction` of the data, which "train" then excludes.
  stream: for source "shards", a `ShardDataset` left on disk (for `train_iterator`) instead of
  a Dataset in RAM; other sources ignore it.
  """
  if not isinstance(spec, DataSpec):
    raise TypeError(
      f"data.load takes a DataSpec, got {type(spec).__name__}; build it with "
      "data.DataSpec(**config.data.to_dict())."
    )
  if split not in ("train", "eval"):
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}.")
  if spec.source not in SOURCES:
    raise ValueError(
      f"config.data.source={spec.source!r} is unknown; use one of {sorted(SOURCES)}."
    )
  if spec.source != "latents":  # a latent's side and channels are the autoencoder's
    images_lib.check_options(spec.image_size, spec.channels, spec.resize)
  if spec.source == "tfds" and spec.eval_split:
    data = load_tfds(spec, spec.split if split == "train" else spec.eval_split)
  else:
    full = SOURCES[spec.source](spec)  # all of it; "train" and "eval" each read it once
    train_idx, eval_idx = holdout_indices(len(full), float(spec.eval_fraction))
    if split == "eval" and not len(eval_idx):
      raise ValueError(
        f"no held-out data: {len(full)} example(s) with eval_fraction="
        f"{spec.eval_fraction}; set config.data.eval_fraction > 0"
        + (" or config.data.eval_split" if spec.source == "tfds" else "")
        + "."
      )
    data = full.take(train_idx if split == "train" else eval_idx)
  if isinstance(data, LatentDataset) and not stream:
    raise ValueError(
      "config.data.source='latents' is for training only; evaluate against pixel data."
    )
  if isinstance(data, ShardDataset) and not stream:
    data = data.to_memory()
  logging.info(
    "data %s/%s: %d images %s, %d classes%s",
    spec.source,
    split,
    len(data),
    data.image_shape if isinstance(data, (ShardDataset, LatentDataset)) else data.images.shape[1:],
    data.num_classes,
    " (streamed)" if isinstance(data, (ShardDataset, LatentDataset)) else "",
  )
  return data
