"""Image sources and the batch pipeline (knows nothing about models).

Callers build a typed `DataSpec(**config.data.to_dict())` once; `load(spec, split=...)` gives a
`Dataset` of uint8 (N, H, W, C) images in [0, 255] and optional int32 labels from one of the
sources (spec.source): folder | tfds | npz | sprites | shards | latents (data/latents.py: drawn
autoencoder latents, streamed, training only); `load(spec, stream=True)` leaves
shards (array_record files written by `python -m diffusion.data.prepare`) on disk as a
`ShardDataset`, streamed by the pipeline. The pipeline yields host-local uint8 batches
(local_devices, per_device_batch, H, W, C); `normalize` maps them to [-1, 1] on device.

Modules, each importing only those listed after it: loader (load, SOURCES) and prepare (the
command) -> folder, npz, sprites, tfds_source, shards -> cache (write_cache), images -> dataset
(DataSpec, Dataset, holdout_indices); pipeline -> dataset; fingerprint (cache keys).
"""

from diffusion.data.cache import write_cache
from diffusion.data.dataset import Dataset, DataSpec, holdout_indices
from diffusion.data.fingerprint import fingerprint
from diffusion.data.loader import SOURCES, load
from diffusion.data.pipeline import (
  Prefetcher,
  batch_at,
  check_batch,
  normalize,
  to_uint8,
  train_iterator,
)
from diffusion.data.shards import ShardDataset

__all__ = [
  "SOURCES",
  "DataSpec",
  "Dataset",
  "Prefetcher",
  "ShardDataset",
  "batch_at",
  "check_batch",
  "fingerprint",
  "holdout_indices",
  "load",
  "normalize",
  "to_uint8",
  "train_iterator",
  "write_cache",
]
