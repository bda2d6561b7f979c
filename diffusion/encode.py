"""Images -> a latent shard folder (data/latents.py) under an autoencoder, and the autoencoder of
a latent run.

  python -m diffusion.data.prepare --encode AUTOENCODER --source S --input I --output DIR \
    --image_size N [--no_flip] [--batch_size 64]

AUTOENCODER is a converted weights folder (python -m diffusion.nets.convert autoencoder) or an
autoencoder run's workdir (configs/autoencoder.py). Sources: prepare's folder, classfolders, npz
and tfds, plus "shards" (a pixel shard folder) and "sprites" (--input = how many). Images are
read a chunk at a time and encoded `--batch_size` at a time on every local device (the batch
split over a one-axis mesh); with flips on (the default) each image's mirror is encoded too, so
training flips stay exact. Memory holds one chunk. Records go into a hidden folder renamed into
place after the manifest: an interrupted run leaves no folder that looks prepared.

Normalisation: the autoencoder's scaling_factor and shift_factor go into the manifest; an
autoencoder trained here with scaling_factor 0 gets 1 / std of its latents z = mean + std * noise
over the whole collection (mean of the squared deviations of the means plus the mean variance),
LDM's rule over every image instead of the first batch.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusion import autoencoding
from diffusion.data import latents as latents_lib
from diffusion.data import prepare as prepare_lib
from diffusion.data.dataset import DataSpec
from diffusion.data.shards import read_manifest as read_pixel_manifest

SOURCES = (*prepare_lib.SOURCES, "shards", "sprites")
Chunks = Iterator[tuple[np.ndarray, np.ndarray | None]]


def _input(source: str, where: str, spec: DataSpec) -> tuple[Callable[[], Chunks], int, tuple]:
  """-> (chunks, total, class names) for any source of SOURCES."""
  if source == "sprites":
    from diffusion.data import sprites

    try:
      n = int(where)
    except ValueError:
      raise ValueError(f"--source sprites takes --input N (how many), got {where!r}.") from None
    ds = sprites.load_sprites(DataSpec(image_size=spec.image_size, num_sprites=n))
    step = prepare_lib._CHUNK
    chunks = lambda: ((ds.images[i : i + step], ds.labels[i : i + step]) for i in range(0, n, step))  # noqa: E731
    return chunks, len(ds), sprites.CLASSES
  if source == "shards":
    root, m = read_pixel_manifest(where)
    if m.image_shape != (spec.image_size, spec.image_size, spec.channels):
      raise ValueError(
        f"{root} holds {m.image_shape} images; pass --image_size {m.image_shape[0]} "
        f"--channels {m.image_shape[2]}."
      )
    from diffusion.data.shards import ShardDataset

    ds = ShardDataset(root, m)
    step = prepare_lib._CHUNK

    def shard_chunks() -> Chunks:
      for i in range(0, len(ds), step):
        yield ds.read(np.arange(i, min(i + step, len(ds))))

    return shard_chunks, len(ds), m.class_names if m.labelled else ()
  path = Path(where).expanduser()
  if source == "tfds":
    data = prepare_lib._tfds(where, spec)
  elif not path.exists():
    raise FileNotFoundError(f"--input {path} does not exist.")
  elif source == "npz":
    data = prepare_lib._npz(path, spec)
  else:
    data = prepare_lib._folder(path, spec, labelled=source == "classfolders")
  return data.chunks, data.total, data.classes if data.labelled else ()


def _encoder(module: Any, params: Any, batch: int) -> Callable[[np.ndarray], np.ndarray]:
  """uint8 (n, H, W, C) -> float32 (n, 2, h, w, c) [mean | std], `batch` images per call split
  over every local device (padded to a multiple)."""
  mesh = jax.sharding.Mesh(np.array(jax.local_devices()), ("data",))
  shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  ndev = len(jax.local_devices())
  batch = -(-batch // ndev) * ndev

  @jax.jit
  def moments(p, x_u8):
    x = (x_u8.astype(jnp.float32) - 127.5) / 127.5
    mean, logvar = module.apply(p, x, method=module.encode)
    return jnp.stack([mean, jnp.exp(0.5 * logvar)], axis=1)

  def run(images: np.ndarray) -> np.ndarray:
    out = []
    for i in range(0, len(images), batch):
      part = images[i : i + batch]
      pad = batch - len(part)
      if pad:
        part = np.concatenate([part, np.zeros((pad, *part.shape[1:]), part.dtype)])
      out.append(np.asarray(moments(params, jax.device_put(part, shard)))[: batch - pad])
    return np.concatenate(out)

  return run


def encode(
  autoencoder: str,
  source: str,
  input: str,
  output: str,
  *,
  image_size: int,
  channels: int = 3,
  resize: str = "antialias",
  flip: bool = True,
  batch_size: int = 64,
  shard_size: int = 10_000,
  overwrite: bool = False,
  progress: Callable[[int, int], None] | None = None,
) -> latents_lib.LatentManifest:
  """Writes the latent shard folder `output` (module docstring) -> its manifest. Raises
  ValueError / FileNotFoundError naming the fix before anything is written."""
  if source not in SOURCES:
    raise ValueError(f"--source {source!r} is unknown; use one of {list(SOURCES)}.")
  if batch_size < 1 or shard_size < 1:
    raise ValueError("--batch_size and --shard_size must be positive.")
  out = Path(output).expanduser().absolute()
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    if not overwrite or not latents_lib.is_latent_folder(out):
      raise ValueError(f"--output {out} exists and is not empty; choose a new folder.")
  module, params, fp = autoencoding.load(autoencoder)
  f = module.downsample_factor
  if image_size % f or channels != module.in_channels:
    raise ValueError(
      f"the autoencoder takes {module.in_channels}-channel images with sides divisible by {f}; "
      f"got --image_size {image_size} --channels {channels}."
    )
  spec = DataSpec(image_size=image_size, channels=channels, resize=resize)
  chunks, total, classes = _input(source, input, spec)
  latent_shape = (image_size // f, image_size // f, module.latent_channels)
  views = 2 if flip else 1
  run = _encoder(module, params, batch_size)

  tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  stats = np.zeros(3)  # sum of means, of squared means, of variances (float64)
  try:
    writer = latents_lib.LatentWriter(tmp, latent_shape, views, shard_size)
    labelled = False
    for images, labels in chunks():
      m = run(images)[:, None]
      if flip:
        m = np.concatenate([m, run(np.ascontiguousarray(images[:, :, ::-1]))[:, None]], axis=1)
      mean, std = m[:, :, 0].astype(np.float64), m[:, :, 1].astype(np.float64)
      stats += (mean.sum(), np.square(mean).sum(), np.square(std).sum())
      labelled = labels is not None
      writer.add(m, labels)
      if progress:
        progress(writer.count, total)
    fingerprint = writer.close()
    if not writer.count:
      raise ValueError(f"--input {input} holds no images; nothing to encode.")
    scale, shift = float(module.scaling_factor), float(module.shift_factor)
    if scale == 0.0:
      n = writer.count * views * int(np.prod(latent_shape))
      mu = stats[0] / n
      scale = float(1.0 / np.sqrt(stats[1] / n - mu**2 + stats[2] / n))
    manifest = latents_lib.LatentManifest(
      count=writer.count,
      latent_shape=latent_shape,
      views=views,
      image_shape=(image_size, image_size, channels),
      labelled=labelled,
      num_classes=len(classes) if labelled else 0,
      class_names=tuple(classes) if labelled else (),
      shards=tuple(writer.shards),
      fingerprint=fingerprint,
      autoencoder={
        "fingerprint": fp,
        "path": os.path.abspath(autoencoder),
        "scaling_factor": scale,
        "shift_factor": shift,
      },
      source={
        "source": source,
        "input": input
        if source in ("sprites", "tfds")
        else str(Path(input).expanduser().absolute()),
        "image_size": image_size,
        "channels": channels,
        "resize": resize,
      },
    )
    (tmp / latents_lib.MANIFEST).write_text(manifest.to_json())  # last: marks it complete
    prepare_lib._fsync_all(tmp)
    prepare_lib.publish(tmp, out, overwrite=overwrite)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return manifest


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m diffusion.data.prepare --encode", description=__doc__)
  p.add_argument("--encode", required=True, help="converted weights folder or autoencoder workdir")
  p.add_argument("--source", required=True, choices=SOURCES)
  p.add_argument("--input", required=True, help="folder, .npz, tfds name, shard folder, or N")
  p.add_argument("--output", required=True, help="the latent shard folder to write")
  p.add_argument("--image_size", required=True, type=int)
  p.add_argument("--channels", type=int, default=3)
  p.add_argument("--resize", default="antialias")
  p.add_argument("--no_flip", action="store_true", help="do not encode the mirror images")
  p.add_argument("--batch_size", type=int, default=64, help="images per encoder call")
  p.add_argument("--shard_size", type=int, default=10_000)
  p.add_argument("--overwrite", action="store_true")
  return p


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)

  def progress(done: int, total: int) -> None:
    print(f"\r{done}/{total} images", end="", file=sys.stderr, flush=True)

  try:
    m = encode(
      args.encode,
      args.source,
      args.input,
      args.output,
      image_size=args.image_size,
      channels=args.channels,
      resize=args.resize,
      flip=not args.no_flip,
      batch_size=args.batch_size,
      shard_size=args.shard_size,
      overwrite=args.overwrite,
      progress=progress,
    )
  except (ValueError, FileNotFoundError, PermissionError) as e:
    print(f"\nerror: {e}", file=sys.stderr)
    return 2
  h, w, c = m.latent_shape
  print(
    f"\n{args.output}: {m.count} images -> {h}x{w}x{c} latents ({m.views} view(s)), autoencoder "
    f"{m.autoencoder['fingerprint']}, scaling {m.autoencoder['scaling_factor']:.5g}; train with "
    f"--config.data.source=latents --config.data.path={args.output} "
    f"--config.data.image_size={h} --config.data.channels={c} "
    f"--config.autoencoder.path={args.encode}",
    file=sys.stderr,
  )
  return 0
