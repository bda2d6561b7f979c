"""`--mode sample`: images from a checkpoint with any registered sampler, saved with the settings.

Writes <workdir>/samples/<tag>/:
  grid.png       the first (up to) 256 images, one row per class for cycled class labels
  images/        one PNG per image, 00000.png, 00001.png, ...
  samples.npz    `images` uint8 (N, H, W, C) in [0, 255]; `labels` int32 (N,) (conditional)
  settings.json  checkpoint step, parameters (EMA or raw), sampler, steps, NFE, spacing, eta,
                 guidance, labels, number of images, batch size, seed, schedule
  reverse.gif    the sampler's states from noise to images for `config.sample.gif_images` images
The tag defaults to step{N}_{sampler}{steps}_{spacing}_g{scale}_seed{seed} (plus _eta, _raw,
_y<labels>, _<clip> when those differ from the defaults).

Same settings and seed, same images: image i is drawn with fold_in(PRNGKey(seed), i) alone (its
noise and every random draw of the sampler), so asking for more images extends the set, and the
batch size, the number of devices and of processes change nothing. Sampling runs data-parallel
over the mesh of every device of every process (parallel.make_mesh, the training mesh); with
several processes every one gathers the images and process 0 writes them.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from diffusion import checkpoints, parallel, visualize
from diffusion.model import Diffusion, SampleSettings
from diffusion.modes import posthoc
from diffusion.parallel import AXIS

GRID_MAX = 256  # images shown in grid.png


def load_params(
  diffusion: Diffusion, workdir: str, *, step: int = -1, use_ema: bool = True, ema: str = ""
) -> tuple[int, Any]:
  """(step, params) from <workdir>/checkpoints: the newest step when `step` < 0, EMA parameters
  when `use_ema`; or, with `ema` = "posthoc:<sigma_rel>" (config.sample.ema), the parameters
  `--mode posthoc` reconstructed. Host NumPy pytree, checked against `diffusion`'s model."""
  sigma_rel = posthoc.sigma_rel_of(ema)
  if sigma_rel is not None:
    return posthoc.load(diffusion, workdir, sigma_rel)
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(
      f"no checkpoints in {directory}: train first (python launch.py "
      f"--config ... --workdir {workdir}) or pass the --workdir of a "
      "trained run."
    )
  ckpt = checkpoints.Checkpointer(directory, read_only=True)
  try:
    steps = sorted(ckpt.all_steps())
    if not steps:
      raise FileNotFoundError(f"no complete checkpoint in {directory}; train first.")
    if step >= 0 and step not in steps:
      raise ValueError(f"no checkpoint at step {step} in {directory}; available steps: {steps}.")
    # The newest intact checkpoint when step < 0 (a damaged newer one is skipped with a warning).
    state = ckpt.restore_host(None if step < 0 else step)
    chosen = ckpt.restored_step if step < 0 else step
  finally:
    ckpt.close()
  params = state["ema_params" if use_ema else "params"]
  diffusion.check_params(params, f" at step {chosen} in {directory}")
  return int(chosen), params


def resolve_labels(num_classes: int, spec: str, n: int) -> np.ndarray | None:
  """int32 (n,) class labels from config.sample.labels ("" = cycle 0..K-1, "3" or "1,4" = cycle
  these; K, the null class, samples unconditionally), or None for an unconditional model."""
  k, spec = num_classes, str(spec).strip()
  if k == 0:
    if spec:
      raise ValueError(
        f"config.sample.labels={spec!r} but the model is unconditional "
        "(config.model.num_classes=0); leave config.sample.labels empty."
      )
    return None
  if not spec:
    return np.arange(n, dtype=np.int32) % k
  try:
    values = [int(v) for v in spec.split(",") if v.strip()]
  except ValueError:
    raise ValueError(
      f"config.sample.labels={spec!r}: use comma-separated integers such as '3' or '1,4'."
    ) from None
  bad = [v for v in values if not 0 <= v <= k]
  if bad or not values:
    raise ValueError(
      f"config.sample.labels={spec!r}: labels must lie in [0, {k - 1}] (or {k}, "
      f"the null class for unconditional samples); bad: {bad}."
    )
  return np.resize(np.asarray(values, np.int32), n)


# ---- sampling over the mesh ---------------------------------------------------------------------

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


def default_tag(config: ml_collections.ConfigDict, step: int) -> str:
  """step{N}_{sampler}{steps}_{spacing}_g{scale}_seed{seed}, plus what differs from defaults."""
  s = config.sample
  name = f"{s.sampler}{s.num_steps}" + (f"_eta{s.eta:g}" if s.sampler == "ddim" and s.eta else "")
  tag = f"step{step}_{name}_{s.spacing}_g{s.guidance_scale:g}_seed{s.seed}"
  if posthoc.sigma_rel_of(s.ema) is not None:
    tag += f"_phema{posthoc.sigma_rel_of(s.ema):g}"
  elif not s.use_ema:
    tag += "_raw"
  if str(s.labels).strip():
    tag += "_y" + "-".join(v.strip() for v in str(s.labels).split(",") if v.strip())
  if s.clip_x0 != "clip":  # the default
    tag += "_noclip" if s.clip_x0 == "none" else f"_{s.clip_x0}"
  return tag


def guided(config: ml_collections.ConfigDict) -> bool:
  """Whether sampling uses classifier-free guidance (a conditional model, scale != 1)."""
  return bool(config.model.num_classes) and config.sample.guidance_scale != 1.0


def settings(config: ml_collections.ConfigDict, step: int) -> dict[str, Any]:
  """What produced a sample set (written as settings.json beside it)."""
  s, f = config.sample, config.diffusion
  nfe = SampleSettings.from_config(s).nfe
  return {
    "checkpoint_step": step,
    "parameters": s.ema or ("ema" if s.use_ema else "raw"),
    "sampler": s.sampler,
    "num_steps": s.num_steps,
    "nfe": nfe,
    # Guidance runs the network on the conditional and the unconditional input at every step.
    "network_passes_per_image": nfe * (2 if guided(config) else 1),
    "spacing": s.spacing,
    "eta": s.eta,
    "guidance_scale": s.guidance_scale,
    "clip_x0": s.clip_x0,
    "labels": str(s.labels),
    "num_images": s.num_images,
    "batch_size": s.batch_size,
    "seed": s.seed,
    "schedule": f.schedule,
    "num_timesteps": f.num_timesteps,
    "prediction": f.prediction,
    "variance": f.variance,
    "image_size": config.data.image_size,
    "channels": config.data.channels,
  }


def run(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True) -> str:
  """The sample mode: samples per config.sample from `workdir`'s checkpoint, written to
  <workdir>/samples/<tag>/ (see the module docstring). Returns that folder."""
  s = config.sample
  if s.num_images <= 0:
    raise ValueError(f"config.sample.num_images must be > 0, got {s.num_images}.")
  diffusion, sampling = Diffusion.from_config(config), SampleSettings.from_config(s)
  if s.guidance_scale != 1.0 and not diffusion.conditional:
    logging.warning(
      "config.sample.guidance_scale=%g has no effect: the model is unconditional.", s.guidance_scale
    )
  labels = resolve_labels(diffusion.num_classes, s.labels, s.num_images)
  check_batch(s.batch_size, "sample.batch_size")
  step, params = load_params(diffusion, workdir, step=s.checkpoint, use_ema=s.use_ema, ema=s.ema)
  tag = s.tag or default_tag(config, step)
  out = os.path.join(workdir, "samples", tag)
  logging.info(
    "sampling %d images with %s (%d steps) from step %d into %s",
    s.num_images,
    s.sampler,
    s.num_steps,
    step,
    out,
  )
  images = generate(
    diffusion,
    params,
    sampling,
    num_images=s.num_images,
    batch_size=s.batch_size,
    seed=s.seed,
    labels=labels,
    progress=progress,
  )
  if jax.process_index() > 0:  # process 0 writes
    return out

  os.makedirs(os.path.join(out, "images"), exist_ok=True)
  for old in glob.glob(os.path.join(out, "images", "*.png")):  # a smaller rerun leaves no extras
    os.remove(old)
  for i, image in enumerate(images):
    visualize.save_image(os.path.join(out, "images", f"{i:05d}.png"), image)
  cycled = labels is not None and not str(s.labels).strip()
  ncol = diffusion.num_classes if cycled else None
  visualize.save_grid(os.path.join(out, "grid.png"), images[:GRID_MAX], ncol=ncol)
  arrays = {"images": images} if labels is None else {"images": images, "labels": labels}
  np.savez_compressed(os.path.join(out, "samples.npz"), **arrays)
  with open(os.path.join(out, "settings.json"), "w") as fh:
    json.dump({"tag": tag, **settings(config, step)}, fh, indent=2)
  n_gif = min(s.gif_images, s.num_images)
  if n_gif > 0:
    traj = trajectory(
      diffusion,
      params,
      sampling,
      num_images=n_gif,
      seed=s.seed,
      labels=None if labels is None else labels[:n_gif],
    )
    visualize.save_reverse_gif(
      os.path.join(out, "reverse.gif"),
      traj[1:],
      x_T=traj[0],
      ncol=ncol if ncol and ncol <= n_gif else None,
    )
  elif os.path.exists(os.path.join(out, "reverse.gif")):
    os.remove(os.path.join(out, "reverse.gif"))  # not from this run's settings
  logging.info("wrote %s", out)
  return out
