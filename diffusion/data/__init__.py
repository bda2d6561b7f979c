"""Image sources and the batch pipeline (knows nothing about models).

Sources (config.data.source): folder | tfds | npz | sprites, each giving a `Dataset` of uint8
(N, H, W, C) images in [0, 255] and optional int32 labels. The pipeline yields host-local uint8
batches (local_devices, per_device_batch, H, W, C); `normalize` maps them to [-1, 1] on device.
"""

from diffusion.data.dataset import SOURCES, Dataset, holdout_indices, load
from diffusion.data.pipeline import (
    Prefetcher,
    batch_at,
    check_batch,
    normalize,
    to_uint8,
    train_iterator,
)

__all__ = [
    "SOURCES", "Dataset", "Prefetcher", "batch_at", "check_batch",
    "holdout_indices", "load", "normalize", "to_uint8", "train_iterator",
]
