"""The typed data settings `DataSpec`, the in-memory `Dataset` and the held-out split.

The bottom of diffusion/data: it imports no source. Callers build the spec once from the config,
`DataSpec(**config.data.to_dict())`; every source and `load` receive it, never a ConfigDict.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# The held-out subset is drawn with this fixed seed, not config.seed, so that it stays the same
# across seed sweeps and restarts.
_HOLDOUT_SEED = 0x0E7A1


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """What to load and how: exactly the fields of `config.data` (configs/default.py), same
  defaults. An unknown field is a TypeError naming it."""

  source: str = "sprites"  # folder | tfds | npz | sprites | shards
  path: str = ""  # folder, .npz or shard folder path (source folder/npz/shards)
  name: str = ""  # tfds dataset name, e.g. "cifar10" (source tfds)
  data_dir: str = ""  # tfds data_dir ("" = tfds default)
  split: str = "train"  # training split (tfds); for other sources the non-held-out part
  eval_split: str = ""  # held-out split (tfds); "" = hold out `eval_fraction` of the data
  eval_fraction: float = 0.02  # fraction held out for evaluation when there is no test split
  image_key: str = ""  # tfds feature with the image ("" = detect)
  label_key: str = ""  # tfds feature with the label ("" = detect, "none" = unlabelled)
  image_size: int = 16  # square side length the images are resized and centre-cropped to
  channels: int = 3  # 1 (grayscale) or 3 (RGB); inputs are converted to this
  resize: str = "antialias"  # antialias | nearest (pixel art)
  # RGB that transparent pixels are composited onto
  background: tuple[int, int, int] = (255, 255, 255)
  labels: bool = True  # folder: class labels from the first level of subfolders
  num_sprites: int = 50_000  # sprites: how many to generate
  random_flip: bool = True  # random horizontal flip in the pipeline
  prefetch: int = 2  # batches prepared ahead (a background thread; shards: reader threads)
  # decoded images ("": folder <path>/.diffusion_cache, tfds ~/.cache/diffusion)
  cache_dir: str = ""
  download: bool = True  # tfds: download and prepare (array_record) if not prepared
  sprite_seed: int = 0  # sprites: generator seed (fixed data across config.seed sweeps)

  def __post_init__(self):
    # to_dict() / config.json give lists or tuples of any ints; keep one hashable form.
    bg = self.background
    if isinstance(bg, (str, bytes)) or not hasattr(bg, "__len__") or len(bg) != 3:
      raise ValueError(
        f"config.data.background must be 3 integers (R, G, B) in [0, 255], got {bg!r}."
      )
    rgb = tuple(int(v) for v in bg)
    if any(v < 0 or v > 255 for v in rgb):
      raise ValueError(f"config.data.background must lie in [0, 255], got {rgb}.")
    object.__setattr__(self, "background", rgb)
    if not isinstance(self.image_size, int) or self.image_size < 1:
      raise ValueError(
        f"config.data.image_size must be a positive integer, got {self.image_size!r}."
      )
    if not 0.0 <= float(self.eval_fraction) < 1.0:
      raise ValueError(
        f"config.data.eval_fraction must lie in [0, 1) (the held-out share), got "
        f"{self.eval_fraction}; e.g. 0.02."
      )
    if self.source == "sprites" and self.num_sprites < 1:
      raise ValueError(
        f"config.data.num_sprites must be >= 1 (how many sprites to generate), got "
        f"{self.num_sprites}."
      )


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
      raise ValueError(
        f"Dataset.images must be uint8 (N, H, W, C), got {self.images.dtype} {self.images.shape}."
      )
    if self.labels is not None and (
      self.labels.shape != self.images.shape[:1] or self.labels.dtype != np.int32
    ):
      raise ValueError(
        f"Dataset.labels must be int32 ({len(self.images)},), got "
        f"{self.labels.dtype} {self.labels.shape}."
      )

  def __len__(self) -> int:
    return len(self.images)

  def read(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(uint8 (n, H, W, C) images, int32 (n,) labels or None) at `index` (int (n,)): copies."""
    return self.images[index], None if self.labels is None else self.labels[index]

  def take(self, index: np.ndarray) -> Dataset:
    """The examples at `index` (int array), same classes."""
    labels = None if self.labels is None else self.labels[index]
    return dataclasses.replace(self, images=self.images[index], labels=labels)


def holdout_indices(n: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """Splits range(n) into sorted (train, eval) index arrays; eval is a fixed random `fraction`
  (at least one example when fraction > 0 and n > 1), independent of any training seed."""
  k = 0 if fraction <= 0 or n < 2 else min(n - 1, max(1, round(n * fraction)))
  order = np.random.default_rng(_HOLDOUT_SEED).permutation(n)
  return np.sort(order[k:]), np.sort(order[:k])
