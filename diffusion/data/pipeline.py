"""The batch pipeline: a pure function of (seed, step) per batch, sharded per process, prefetched.

Order: the data is a stream of epochs, each a permutation drawn from (seed, epoch); global batch
k holds stream positions [k * global_batch, (k + 1) * global_batch), so batch k never depends on
what ran before and a restart at step k continues exactly. Process p takes the p-th contiguous
part of the global batch, split further over its local devices. Random horizontal flips are drawn
on the host from (seed, step) too, so they also resume exactly. Normalisation to [-1, 1] happens
on the device (`normalize`), keeping host-to-device transfers uint8.

The same batches come from an in-RAM `Dataset` (prefetched by one thread) and from a streamed
`shards.ShardDataset` (anything with `read(index)`: only this process's examples of each batch
are read from disk, by grain's reader threads), so memory stays flat in the dataset size.
"""

from __future__ import annotations

import functools
import os
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

from diffusion.data.dataset import Dataset

_ORDER_STREAM, _FLIP_STREAM = 0, 1  # separate random streams derived from the same seed
_MAX_READERS = 8  # grain reader threads for a streamed dataset


class Examples(Protocol):
  """What the pipeline reads: a `Dataset` in RAM or a `shards.ShardDataset` on disk."""

  num_classes: int

  def __len__(self) -> int: ...

  def read(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(uint8 (n, H, W, C) images, int32 (n,) labels or None) at `index` (int (n,)), copies."""
    ...


def check_batch(global_batch: int, local_devices: int, process_count: int) -> int:
  """-> per-device batch; ValueError when the global batch does not split over the devices."""
  devices = local_devices * process_count
  if global_batch <= 0 or devices <= 0 or global_batch % devices:
    fix = max(devices, global_batch // max(devices, 1) * devices)
    raise ValueError(
      f"global batch size {global_batch} does not divide evenly over {devices} devices "
      f"({process_count} process(es) x {local_devices} local device(s)); set "
      f"config.train.batch_size to a multiple of {devices} (e.g. {fix})."
    )
  return global_batch // devices


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  return np.random.default_rng([seed % 2**63, _ORDER_STREAM, epoch]).permutation(n)


def _indices(n: int, seed: int, positions: np.ndarray) -> np.ndarray:
  """Stream positions -> example indices (position p is item p % n of epoch p // n)."""
  epochs, within = np.divmod(positions, n)
  out = np.empty_like(positions)
  for e in np.unique(epochs):
    sel = epochs == e
    out[sel] = _permutation(seed, int(e), n)[within[sel]]
  return out


def batch_at(
  dataset: Examples,
  step: int,
  *,
  global_batch: int,
  seed: int,
  local_devices: int | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
  random_flip: bool = False,
) -> dict[str, np.ndarray]:
  """This process's part of global batch `step`, a pure function of (seed, step).

  Returns {"image": uint8 (local_devices, b, H, W, C) in [0, 255] (a latents.LatentDataset:
           float32 normalised latent draws, keyed by (seed, step, global position)),
           "label": int32 (local_devices, b) (zeros when unlabelled)},
  b = global_batch // (process_count * local_devices).
  """
  local_devices = jax.local_device_count() if local_devices is None else local_devices
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  per_device = check_batch(global_batch, local_devices, process_count)
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count}).")
  if len(dataset) == 0:
    raise ValueError("the dataset is empty.")
  per_process = per_device * local_devices
  first = step * global_batch + process_index * per_process
  positions = np.arange(first, first + per_process, dtype=np.int64)
  idx = _indices(len(dataset), seed, positions)
  flip = None
  if random_flip:
    rng = np.random.default_rng([seed % 2**63, _FLIP_STREAM, step])
    flip = rng.random(global_batch)[process_index * per_process :][:per_process] < 0.5
  if getattr(dataset, "latent", False):  # latents.LatentDataset: the mirror's own latents
    images, labels = dataset.draw(idx, flip, seed=seed, step=step, positions=positions)
  else:
    images, labels = dataset.read(idx)  # copies: the flip below never touches the dataset
    if flip is not None:
      images[flip] = images[flip, :, ::-1]
  labels = labels if labels is not None else np.zeros(per_process, np.int32)
  return {
    "image": images.reshape(local_devices, per_device, *images.shape[1:]),
    "label": labels.reshape(local_devices, per_device),
  }


def _put(q: queue.Queue, stop: threading.Event, item) -> None:
  while not stop.is_set():
    try:
      q.put(item, timeout=0.1)
      return
    except queue.Full:
      pass


def _produce(make, step: int, q: queue.Queue, stop: threading.Event) -> None:
  """The prefetch thread: make(step), make(step + 1), ... into q until stop is set."""
  try:
    while not stop.is_set():
      _put(q, stop, make(step))
      step += 1
  except BaseException as e:  # noqa: BLE001 -- handed to the consumer by __next__
    _put(q, stop, e)


class Prefetcher(Iterator[dict]):
  """Iterates make(step) for step = start, start + 1, ..., computed `depth` batches ahead in a
  daemon thread (depth 0: computed on demand). Call close() (or use `with`) to stop it; errors
  in the thread are raised by next()."""

  def __init__(self, make: Callable[[int], dict], start: int, depth: int):
    self._make, self.next_step = make, start  # next_step: the step of the next batch returned
    self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
    self._stop = threading.Event()
    self._thread = None
    if depth > 0:  # the thread holds no reference to self, so dropping the iterator stops it
      self._thread = threading.Thread(
        target=_produce,
        daemon=True,
        name="data-prefetch",
        args=(make, start, self._queue, self._stop),
      )
      self._thread.start()

  def __next__(self) -> dict:
    if self._stop.is_set():
      raise StopIteration
    if self._thread is None:
      item = self._make(self.next_step)
    else:
      while True:
        try:
          item = self._queue.get(timeout=1.0)
          break
        except queue.Empty:
          if not self._thread.is_alive():
            raise RuntimeError("the data prefetch thread stopped unexpectedly.") from None
    if isinstance(item, BaseException):
      self.close()
      raise item
    self.next_step += 1
    return item

  def close(self) -> None:
    """Stops the thread (it exits within ~0.1 s); further next() raise StopIteration."""
    self._stop.set()
    while True:  # unblock a producer waiting on a full queue
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break
    if self._thread is not None and self._thread is not threading.current_thread():
      self._thread.join(timeout=5)

  def __enter__(self) -> Prefetcher:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self):
    self._stop.set()


class StreamPrefetcher(Iterator[dict]):
  """Iterates make(step) for step = start, start + 1, ... through grain: `threads` reader
  threads compute batches in parallel, in order, up to max(depth, threads) ahead (depth 0:
  computed on demand). Same interface as `Prefetcher`."""

  def __init__(self, make: Callable[[int], dict], start: int, depth: int, threads: int):
    import grain  # only for streamed data

    self.next_step = start
    threads = max(threads, 1) if depth > 0 else 0
    options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(depth, threads))
    steps = grain.MapDataset.range(start, 2**62).map(make)  # element i: batch start + i
    self._it = iter(steps.to_iter_dataset(options))
    self._closed = False

  def __next__(self) -> dict:
    if self._closed:
      raise StopIteration
    item = next(self._it)
    self.next_step += 1
    return item

  def close(self) -> None:
    """Stops the reader threads; further next() raise StopIteration."""
    if not self._closed:
      self._closed = True
      self._it.close()

  def __enter__(self) -> StreamPrefetcher:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def train_iterator(
  dataset: Examples,
  *,
  global_batch: int,
  seed: int,
  start_step: int = 0,
  local_devices: int,
  process_index: int | None = None,
  process_count: int | None = None,
  random_flip: bool = False,
  prefetch: int = 2,
) -> Prefetcher | StreamPrefetcher:
  """Endless batches for steps start_step, start_step + 1, ... (see `batch_at` for the shapes),
  prepared `prefetch` batches ahead: by a background thread for an in-RAM `Dataset`, by grain's
  reader threads (min(8, CPUs), at least one batch ahead each) for a streamed dataset. Close it
  when done."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  check_batch(global_batch, local_devices, process_count)  # fail here, not in the thread
  make = functools.partial(
    batch_at,
    dataset,
    global_batch=global_batch,
    seed=seed,
    local_devices=local_devices,
    process_index=process_index,
    process_count=process_count,
    random_flip=random_flip,
  )
  if isinstance(dataset, Dataset):
    return Prefetcher(make, start_step, prefetch)
  return StreamPrefetcher(make, start_step, prefetch, min(_MAX_READERS, os.cpu_count() or 1))


def normalize(images) -> jax.Array:
  """uint8 [0, 255] (any shape) -> float32 in [-1, 1]. Jittable; meant to run on the device.
  Float input (normalised latents from a latent source) is returned unchanged, as float32."""
  x = jnp.asarray(images).astype(jnp.float32)
  if jnp.issubdtype(jnp.asarray(images).dtype, jnp.floating):
    return x
  return (x - 127.5) / 127.5  # this form maps 0 and 255 to exactly -1 and 1, also under jit


def to_uint8(images) -> np.ndarray:
  """float in [-1, 1] (clipped; any shape, NumPy or JAX) -> uint8 [0, 255], for saving."""
  x = np.asarray(images, np.float32)
  return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)
