"""Sampling over the mesh: images drawn data-parallel over every device of every process, with
per-image keys, as one compiled call per global batch (optionally with a feature extractor run on
the images in the same call). Used by the sample and eval modes and by diffusion/evaluation/.

Image i is drawn with fold_in(PRNGKey(seed), i) alone (its noise and every random draw of the
sampler), so the batch size, the number of devices and of processes change nothing, and asking
for more images extends a set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from diffusion import parallel
from diffusion.model import Diffusion, SampleSettings
from diffusion.parallel import AXIS

Extract = Callable[[Any, jax.Array], dict[str, jax.Array]]  # (variables, uint8 images) -> arrays


def check_batch(batch_size: int, field: str) -> int:
  """-> images per device; ValueError unless `batch_size` (config.<field>) splits evenly over
  every device of every process."""
  n = jax.device_count()
  if batch_size < 1 or batch_size % n:
    raise ValueError(
      f"config.{field}={batch_size} does not split over {n} devices ({jax.process_count()} "
      f"process(es)); set it to a multiple of {n} (e.g. {max(n, batch_size // n * n)})."
    )
  return batch_size // n


def to_uint8(x: jax.Array) -> jax.Array:
  """data.to_uint8 on the device: [-1, 1] -> uint8 [0, 255]."""
  return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def per_image(diffusion: Diffusion, settings: SampleSettings, *, return_trajectory: bool = False):
  """Traceable (params, keys (b, 2), labels (b,)) -> images (b, H, W, C) in [-1, 1] (and with
  `return_trajectory` the states, (steps + 1, b, H, W, C)): image j is a sample of its own key
  alone (noise, stochastic steps), whatever else is in the batch."""

  def one(params, key, label):
    out = diffusion.sample(
      params, key, label[None], 1, settings, return_trajectory=return_trajectory
    )
    return (out[0][0], out[1][:, 0]) if return_trajectory else out[0]

  def fn(params, keys, labels):
    out = jax.vmap(one, in_axes=(None, 0, 0))(params, keys, labels)
    return (out[0], jnp.swapaxes(out[1], 0, 1)) if return_trajectory else out

  return fn


def image_keys(base: jax.Array, index: jax.Array) -> jax.Array:
  """(b, 2) keys fold_in(base, i) of the int32 image indices (b,)."""
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(index)


def compile_pipeline(
  diffusion: Diffusion, settings: SampleSettings, mesh: Mesh, extract: Extract | None = None
) -> Callable:
  """jit(shard_map) over `mesh`: (params, extract variables, base key, index int32 (B,), labels
  int32 (B,)) -> {"images": uint8 (B, H, W, C), **extract(variables, images)}, every array split
  over the devices on its first axis (B a multiple of the mesh size). Image i is drawn with
  fold_in(base, i). Built once per (settings, mesh, extract), cached on `diffusion`."""
  key = ("pipeline", settings, mesh, extract)
  if key not in diffusion._cache:
    sample = per_image(diffusion, settings)

    def per_device(params, variables, base, index, labels):
      images = to_uint8(sample(params, image_keys(base, index), labels))
      return {"images": images, **({} if extract is None else extract(variables, images))}

    fn = jax.shard_map(
      per_device, mesh=mesh, in_specs=(P(), P(), P(), P(AXIS), P(AXIS)), out_specs=P(AXIS)
    )
    diffusion._cache[key] = jax.jit(fn)
  return diffusion._cache[key]


def split_array(values: np.ndarray, mesh: Mesh) -> jax.Array:
  """A host array, the same on every process, as a global array split over the mesh's devices
  on its first axis (each process places its own rows)."""
  sharding = NamedSharding(mesh, P(AXIS))
  return jax.make_array_from_callback(values.shape, sharding, lambda idx: values[idx])


def local_rows(out: dict[str, jax.Array], first: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """(global image indices, {name: rows}) of this process's shards of a pipeline output whose
  row 0 is image `first`, in index order."""
  parts: dict[int, dict[str, np.ndarray]] = {}
  for name, arr in out.items():
    for shard in arr.addressable_shards:
      lo = shard.index[0].start or 0
      parts.setdefault(lo, {})[name] = np.asarray(shard.data)
  starts = sorted(parts)
  rows = {name: np.concatenate([parts[s][name] for s in starts]) for name in out}
  index = np.concatenate([first + s + np.arange(len(parts[s]["images"])) for s in starts])
  return index, rows


def labels_of(labels: np.ndarray | None, index: np.ndarray) -> np.ndarray:
  """int32 labels of image indices: labels[i % len(labels)] (zeros, ignored, when None)."""
  if labels is None:
    return np.zeros(len(index), np.int32)
  return np.asarray(labels, np.int32)[index % len(labels)]


def draw(
  fn: Callable,
  params: Any,
  variables: Any,
  mesh: Mesh,
  *,
  seed: int,
  start: int,
  stop: int,
  batch_size: int,
  labels: np.ndarray | None = None,
  progress: bool = True,
  desc: str = "sampling",
) -> Iterator[tuple[int, np.ndarray, dict[str, np.ndarray]]]:
  """Runs a `compile_pipeline` function over images [start, stop) in global batches of
  `batch_size` (the last padded with images >= stop, dropped): yields (end of the batch, this
  process's image indices, its rows). `params`, `variables` replicated over `mesh` already."""
  base = parallel.replicate(jax.random.PRNGKey(seed), mesh)
  starts = range(start, stop, batch_size)
  bar = tqdm(starts, desc=desc, unit="batch", disable=not progress or jax.process_index() > 0)
  for first in bar:
    index = np.arange(first, first + batch_size, dtype=np.int32)
    args = [split_array(a, mesh) for a in (index, labels_of(labels, index))]
    got, rows = local_rows(fn(params, variables, base, *args), first)
    keep = got < stop
    yield min(first + batch_size, stop), got[keep], {k: v[keep] for k, v in rows.items()}


def generate(
  diffusion: Diffusion,
  params: Any,
  settings: SampleSettings,
  *,
  num_images: int,
  batch_size: int,
  seed: int,
  labels: np.ndarray | None = None,
  progress: bool = True,
  desc: str = "sampling",
  mesh: Mesh | None = None,
) -> np.ndarray:
  """uint8 (num_images, H, W, C) images from host `params` with `settings`, on every process.

  Data-parallel over `mesh` (default: every device of every process) in global batches of
  `batch_size` (a multiple of the device count; one compilation). Image i uses
  fold_in(PRNGKey(seed), i). labels: int32 (num_images,) for conditional models.
  """
  if num_images <= 0 or batch_size <= 0:
    raise ValueError(f"num_images and batch_size must be > 0, got {num_images}, {batch_size}.")
  if labels is not None and np.shape(labels) != (num_images,):
    raise ValueError(f"labels must be ({num_images},), got {np.shape(labels)}.")
  mesh = mesh or parallel.make_mesh()
  check_batch(batch_size, "sample.batch_size")
  fn = compile_pipeline(diffusion, settings, mesh)
  index, images = [], []
  # Whole batches (the padding dropped below), so every process gathers as many rows.
  padded = -(-num_images // batch_size) * batch_size
  for _, got, rows in draw(
    fn,
    parallel.replicate(params, mesh),
    parallel.replicate({}, mesh),
    mesh,
    seed=seed,
    start=0,
    stop=padded,
    batch_size=batch_size,
    labels=labels,
    progress=progress,
    desc=desc,
  ):
    index.append(got)
    images.append(rows["images"])
  index, images = np.concatenate(index), np.concatenate(images)
  if jax.process_count() > 1:  # every process gets every image
    from jax.experimental import multihost_utils

    index = np.asarray(multihost_utils.process_allgather(index)).reshape(-1)
    images = np.asarray(multihost_utils.process_allgather(images))
    images = images.reshape(-1, *images.shape[-3:])
  out = np.empty((padded, *images.shape[1:]), np.uint8)
  out[index] = images
  return out[:num_images]


def trajectory(
  diffusion: Diffusion,
  params: Any,
  settings: SampleSettings,
  *,
  num_images: int,
  seed: int,
  labels: np.ndarray | None = None,
) -> np.ndarray:
  """float32 (steps + 1, num_images, H, W, C): the sampler from x_T to x_0 for images
  0..num_images-1, keyed as `generate`'s, so the last state gives its first images."""
  key = ("trajectory", settings)
  if key not in diffusion._cache:
    diffusion._cache[key] = jax.jit(per_image(diffusion, settings, return_trajectory=True))
  index = np.arange(num_images, dtype=np.int32)
  keys = image_keys(jax.random.PRNGKey(seed), jnp.asarray(index))
  _, traj = diffusion._cache[key](
    jax.device_put(params), keys, jnp.asarray(labels_of(labels, index))
  )
  return np.asarray(jax.device_get(traj), np.float32)
