"""Prepare a large dataset once, TensorFlow-free: images -> a shard folder for source "shards".

  python -m diffusion.data.prepare --source classfolders --input ~/imagenet/train \
    --output ~/data/imagenet64 --image_size 64
  python -m diffusion.data.prepare --source npz --input data.npz --output DIR --image_size 32
  python -m diffusion.data.prepare --source tfds --input cifar10 --output DIR --image_size 32
  python -m diffusion.data.prepare --source folder --input photos/ --output DIR --image_size 64

then train with --config.data.source=shards --config.data.path=DIR (and the same image_size and
channels). With --encode AUTOENCODER the images become a latent shard folder instead (options and
format in diffusion/encode.py and diffusion/data/latents.py). Sources:
  folder        every image under --input (searched recursively), unlabelled
  classfolders  an ImageNet-style tree --input/<class>/.../<image>; the labels index the sorted
                class folders that hold image files
  npz           an .npz as config.data.source="npz" reads it (images, optional labels)
  tfds          a tfds dataset already prepared in the array_record format (--data_dir,
                --split), read with tfds.data_source: no TensorFlow needed
Images are decoded and converted as the in-RAM sources convert them (images.py: resized so the
shorter side is --image_size, centre-cropped); unreadable files are skipped, counted and listed.
Memory holds one chunk of images (npz: the whole array, as the npz source would). The shards are
written into a hidden temporary folder, the manifest last, which is then renamed to --output: an
interrupted run leaves no folder that looks prepared (a rerun deletes the temporary folder of a
killed one). Exit 0 done, 2 a user error (one line, naming the flag), 75 stopped by Ctrl-C or
SIGTERM (nothing written; run again).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from diffusion.data import folder as folder_lib
from diffusion.data import images as images_lib
from diffusion.data import tfds_source
from diffusion.data.dataset import DataSpec
from diffusion.data.npz import load_npz
from diffusion.data.shards import MANIFEST, Manifest, ShardWriter, publish

SOURCES = ("folder", "classfolders", "npz", "tfds")
_CHUNK = 1024  # images decoded (and held in memory) at a time
Chunks = Iterator[tuple[np.ndarray, np.ndarray | None]]  # uint8 (n, H, W, C), int (n,) | None


class _Input:
  """An input: its chunks, its classes, and a list the chunks fill with skipped files."""

  def __init__(self, chunks: Callable[[], Chunks], total: int, classes: tuple[str, ...], labelled):
    self.chunks, self.total, self.classes, self.labelled = chunks, total, classes, labelled
    self.skipped: list[str] = []


def _folder(root: Path, spec: DataSpec, labelled: bool) -> _Input:
  """Image files under `root` in sorted order, decoded `_CHUNK` at a time by the folder
  source's decoder (its thread pool, its conversion)."""
  if not root.is_dir():
    raise FileNotFoundError(f"--input {root} is not a folder of images.")
  files, others, unlisted = folder_lib._scan(root, root / ".diffusion_cache")
  rels = [f[0] for f in files]
  if not rels:
    raise folder_lib._no_images_error(root, files, others, [], unlisted)
  classes: tuple[str, ...] = ()
  if labelled:
    top = [r for r in rels if "/" not in r]
    if top:
      raise ValueError(
        f"{len(top)} image(s) lie directly in {root} (e.g. {top[0]}), not in a class folder: "
        "--source classfolders reads <input>/<class>/.../<image>; move them into class folders "
        "or use --source folder (unlabelled)."
      )
    classes = tuple(sorted({r.split("/", 1)[0] for r in rels}))
  index = {c: i for i, c in enumerate(classes)}
  opts = {
    "size": spec.image_size,
    "channels": spec.channels,
    "resize": spec.resize,
    "background": list(spec.background),
  }
  out = _Input(lambda: chunks(), len(rels), classes, labelled)

  def chunks() -> Chunks:
    for start in range(0, len(rels), _CHUNK):
      part = rels[start : start + _CHUNK]
      arrays, skipped = folder_lib._decode_all(root, part, opts)
      out.skipped += skipped
      keep = [i for i, a in enumerate(arrays) if a is not None]
      if keep:
        labels = [index[part[i].split("/", 1)[0]] for i in keep] if labelled else None
        yield np.stack([arrays[i] for i in keep]), None if labels is None else np.array(labels)
    folder_lib._log_skipped(root, out.skipped)
    if len(out.skipped) == len(rels):
      raise folder_lib._no_images_error(root, files, others, out.skipped, unlisted)

  return out


def _npz(path: Path, spec: DataSpec) -> _Input:
  data = load_npz(DataSpec(**{**_spec_fields(spec), "source": "npz", "path": str(path)}))
  classes = tuple(str(i) for i in range(data.num_classes))

  def chunks() -> Chunks:
    for start in range(0, len(data), _CHUNK):
      part = slice(start, start + _CHUNK)
      yield data.images[part], None if data.labels is None else data.labels[part]

  return _Input(chunks, len(data), classes, data.labels is not None)


def _tfds(name: str, spec: DataSpec) -> _Input:
  """A prepared tfds dataset through tfds.data_source (array_record, no TensorFlow)."""
  import tensorflow_datasets as tfds

  build = f"`tfds build {name} --file_format array_record` where TensorFlow is installed"
  try:
    source = tfds.data_source(
      name, split=spec.split, data_dir=spec.data_dir or None, download=False
    )
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"--input {name!r} is not a tfds dataset (see tfds.list_builders()).") from e
  except Exception as e:
    if not tfds.builder(name, data_dir=spec.data_dir or None).is_prepared():
      where = spec.data_dir or "the default tfds data_dir (~/tensorflow_datasets, $TFDS_DATA_DIR)"
      raise FileNotFoundError(
        f"tfds {name!r} is not prepared in {where}; prepare it with {build} and pass "
        "--data_dir, or prepare from its files with --source npz/folder/classfolders."
      ) from e
    why = str(e).strip().split("\n")[0]
    raise ValueError(
      f"tfds {name!r} split {spec.split!r} cannot be read without TensorFlow "
      f"({type(e).__name__}: {why}); it must be prepared in the array_record format ({build})."
    ) from e
  features = source.dataset_info.features
  image_key = tfds_source._pick(features, spec.image_key, tfds.features.Image, "image", "image_key")
  label_key = (
    None
    if spec.label_key == "none"
    else tfds_source._pick(features, spec.label_key, tfds.features.ClassLabel, "label", "label_key")
  )
  feature = features[label_key] if label_key else None
  classes = tuple(feature.names) if isinstance(feature, tfds.features.ClassLabel) else ()
  if label_key and not classes:
    raise ValueError(f"tfds {name}: {label_key!r} is no ClassLabel; pass --label_key none.")
  opts = dict(
    size=spec.image_size,
    channels=spec.channels,
    resize=spec.resize,
    background=spec.background,
  )

  def chunks() -> Chunks:
    for start in range(0, len(source), _CHUNK):
      examples = tfds_source._read(source, list(range(start, min(start + _CHUNK, len(source)))))
      images = np.stack(
        [
          images_lib.conform_array(tfds_source._to_uint8(ex[image_key], image_key)[None], **opts)[0]
          for ex in examples
        ]
      )
      yield images, np.array([int(ex[label_key]) for ex in examples]) if label_key else None

  return _Input(chunks, len(source), classes, label_key is not None)


def _spec_fields(spec: DataSpec) -> dict:
  """The conversion settings, as JSON gives them back (the manifest's "source")."""
  return {
    "image_size": spec.image_size,
    "channels": spec.channels,
    "resize": spec.resize,
    "background": list(spec.background),
  }


def _fsync_all(folder: Path) -> None:
  """Every file in `folder` on disk before the rename that publishes it."""
  for p in folder.iterdir():
    with open(p, "rb") as f:
      os.fsync(f.fileno())


def prepare(
  source: str,
  input: str,
  output: str,
  *,
  image_size: int,
  channels: int = 3,
  resize: str = "antialias",
  background: tuple[int, int, int] = (255, 255, 255),
  shard_size: int = 10_000,
  split: str = "train",
  data_dir: str = "",
  image_key: str = "",
  label_key: str = "",
  overwrite: bool = False,
  progress: Callable[[int, int], None] | None = None,
) -> Manifest:
  """Writes the shard folder `output` from `input` (see the module docstring) -> its manifest.

  progress(done, total) is called after each chunk. Raises ValueError / FileNotFoundError
  naming the cause and the fix, before anything is written where the input is at fault.
  """
  if source not in SOURCES:
    raise ValueError(f"--source {source!r} is unknown; use one of {list(SOURCES)}.")
  images_lib.check_options(image_size, channels, resize)
  if shard_size < 1:
    raise ValueError(f"--shard_size must be a positive number of images, got {shard_size}.")
  out = Path(output).expanduser().absolute()
  if out.exists() and not out.is_dir():
    raise ValueError(f"--output {out} is a file; give a new folder for the shards.")
  if out.exists() and any(out.iterdir()):
    if not overwrite or not (out / MANIFEST).is_file():
      raise ValueError(
        f"--output {out} exists and is not empty; choose a new folder"
        + (" (--overwrite replaces only a shard folder)." if overwrite else " or --overwrite.")
      )
  spec = DataSpec(
    image_size=image_size,
    channels=channels,
    resize=resize,
    background=background,
    split=split,
    data_dir=data_dir,
    image_key=image_key,
    label_key=label_key,
  )
  where = Path(input).expanduser()
  if source == "tfds":
    data = _tfds(input, spec)
  elif not where.exists():
    raise FileNotFoundError(f"--input {where} does not exist.")
  elif source == "npz":
    data = _npz(where, spec)
  else:
    data = _folder(where, spec, labelled=source == "classfolders")

  _clear_leftovers(out)
  tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  try:
    writer = ShardWriter(tmp, (image_size, image_size, channels), shard_size)
    for images, labels in data.chunks():
      writer.add(images, labels)
      if progress:
        progress(writer.count + len(data.skipped), data.total)
    fingerprint = writer.close()
    if not writer.count:
      raise ValueError(f"--input {input} holds no images; nothing to prepare.")
    manifest = Manifest(
      count=writer.count,
      image_shape=writer.image_shape,
      labelled=data.labelled,
      num_classes=len(data.classes),
      class_names=data.classes,
      shards=tuple(writer.shards),
      fingerprint=fingerprint,
      source={
        "source": source,
        "input": input if source == "tfds" else str(where.absolute()),
        **({"split": split, "data_dir": data_dir} if source == "tfds" else {}),
        **_spec_fields(spec),
        "skipped": len(data.skipped),
      },
    )
    (tmp / MANIFEST).write_text(manifest.to_json())  # last: it marks the folder complete
    _fsync_all(tmp)
    publish(tmp, out, overwrite=overwrite)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)  # gone after a successful publish
  return manifest


def _clear_leftovers(out: Path) -> None:
  """Deletes the temporary folders of killed runs for `out` (their pid is gone); names those of
  live runs."""
  for tmp in out.parent.glob(f".{out.name}.tmp-*"):
    pid = tmp.name.rsplit("-", 1)[1]
    alive = pid.isdigit() and os.path.exists(f"/proc/{pid}")
    if alive and int(pid) != os.getpid():
      print(f"note: {tmp} is being written by another prepare (pid {pid}).", file=sys.stderr)
    elif not alive:
      shutil.rmtree(tmp, ignore_errors=True)
      print(f"note: removed {tmp}, left by an interrupted prepare.", file=sys.stderr)


# The DataSpec / image checks name config fields; prepare's user knows its flags.
_FLAGS = {
  "config.data.path": "--input",
  "config.data.image_size": "--image_size",
  "config.data.channels": "--channels",
  "config.data.resize": "--resize",
  "config.data.background": "--background",
  "config.data.label_key": "--label_key",
  "config.data.image_key": "--image_key",
}


def _as_flags(text: str) -> str:
  return re.sub(r"config\.data\.\w+", lambda m: _FLAGS.get(m.group(0), m.group(0)), text)


def _background(text: str) -> tuple[int, int, int]:
  try:
    rgb = tuple(int(v) for v in text.split(","))
  except ValueError:
    rgb = ()
  if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
    raise ValueError(f"--background {text!r}: give R,G,B in [0, 255], e.g. 255,255,255.")
  return rgb  # type: ignore[return-value]


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="python -m diffusion.data.prepare",
    description=__doc__.split("\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog="\n".join(__doc__.split("\n")[1:]),
  )
  p.add_argument("--source", required=True, choices=SOURCES)
  p.add_argument("--input", required=True, help="folder, .npz file, or tfds dataset name")
  p.add_argument("--output", required=True, help="the shard folder to write (new or empty)")
  p.add_argument("--image_size", required=True, type=int, help="square side length")
  p.add_argument("--channels", type=int, default=3, help="1 (grayscale) or 3 (RGB)")
  p.add_argument("--resize", default="antialias", help="antialias | nearest (pixel art)")
  p.add_argument("--background", default="255,255,255", help="R,G,B under transparent pixels")
  p.add_argument("--shard_size", type=int, default=10_000, help="images per shard file")
  p.add_argument("--split", default="train", help="tfds split, e.g. train or test")
  p.add_argument("--data_dir", default="", help="tfds data_dir ('' = tfds default)")
  p.add_argument("--image_key", default="", help="tfds image feature ('' = detect)")
  p.add_argument("--label_key", default="", help="tfds label feature ('' = detect, 'none')")
  p.add_argument("--overwrite", action="store_true", help="replace an existing shard folder")
  return p


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if any(a == "--encode" or a.startswith("--encode=") for a in argv):  # latents: encode.py
    from diffusion import encode

    return encode.main(argv)
  args = _parser().parse_args(argv)

  def progress(done: int, total: int) -> None:
    print(f"\r{done}/{total} images", end="", file=sys.stderr, flush=True)

  old = signal.signal(signal.SIGTERM, signal.default_int_handler)  # cleans up as Ctrl-C does
  try:
    background = _background(args.background)
    m = prepare(
      args.source,
      args.input,
      args.output,
      image_size=args.image_size,
      channels=args.channels,
      resize=args.resize,
      background=background,  # type: ignore[arg-type]
      shard_size=args.shard_size,
      split=args.split,
      data_dir=args.data_dir,
      image_key=args.image_key,
      label_key=args.label_key,
      overwrite=args.overwrite,
      progress=progress,
    )
  except (ValueError, FileNotFoundError, PermissionError) as e:
    print(f"\nerror: {_as_flags(str(e))}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(
      f"\nstopped; nothing was written to {args.output}. Run again to prepare.", file=sys.stderr
    )
    return 75
  finally:
    signal.signal(signal.SIGTERM, old)
  h, w, c = m.image_shape
  print(
    f"\n{args.output}: {m.count} images {h}x{w}x{c} in {len(m.shards)} shard(s), "
    f"{m.num_classes} classes, {m.source['skipped']} skipped; train with "
    f"--config.data.source=shards --config.data.path={args.output} "
    f"--config.data.image_size={h} --config.data.channels={c}",
    file=sys.stderr,
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
