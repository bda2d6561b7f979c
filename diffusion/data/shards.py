"""Shard folders: uint8 images and int32 labels in array_record files, read by grain, streamed.

A shard folder (written by `python -m diffusion.data.prepare`) holds `shard-00000.array_record`,
`shard-00001.array_record`, ... and `manifest.json`, which is written last: a folder without it
is an unfinished preparation and is refused. Each record is one example: its int32 label
(little-endian; 0 when unlabelled) followed by its H * W * C uint8 pixels, row-major. Nothing in
a record is pickled or decoded: reading an example is one random access and a copy.

The manifest: {"format", "version", "count", "image_shape": [H, W, C], "labelled",
"num_classes", "class_names", "shards": [{"name", "count", "bytes"}], "fingerprint" (sha256 of
the shape and every record, in order), "source" (what it was prepared from)}.

`open_shards(spec)` checks the manifest and the shard files (present, with the sizes the manifest
gives) and returns a `ShardDataset`: the examples stay on disk, `read(index)` fetches some, and
the batch pipeline streams it through grain (see pipeline.train_iterator).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from diffusion.data.dataset import Dataset, DataSpec

MANIFEST = "manifest.json"
FORMAT, VERSION = "diffusion-shards", 1
_LABEL_BYTES = 4  # int32 little-endian label at the start of each record
_READ_CHUNK = 4096  # records read per call by to_memory
_PREPARE = "python -m diffusion.data.prepare --source ... --input ... --output DIR --image_size N"


@dataclasses.dataclass(frozen=True)
class Manifest:
  """What a shard folder holds (see the module docstring)."""

  count: int
  image_shape: tuple[int, int, int]  # (H, W, C)
  labelled: bool
  num_classes: int
  class_names: tuple[str, ...]
  shards: tuple[tuple[str, int, int], ...]  # (file name, records, bytes)
  fingerprint: str
  source: dict[str, Any] = dataclasses.field(default_factory=dict)

  def to_json(self) -> str:
    return json.dumps(
      {
        "format": FORMAT,
        "version": VERSION,
        "count": self.count,
        "image_shape": list(self.image_shape),
        "labelled": self.labelled,
        "num_classes": self.num_classes,
        "class_names": list(self.class_names),
        "shards": [{"name": n, "count": c, "bytes": b} for n, c, b in self.shards],
        "fingerprint": self.fingerprint,
        "source": self.source,
      },
      indent=1,
    )

  @classmethod
  def from_json(cls, text: str) -> Manifest:
    """Raises ValueError, KeyError or TypeError when `text` is no manifest of this version."""
    m = json.loads(text)
    if m.get("format") != FORMAT or m.get("version") != VERSION:
      raise ValueError(f"format {m.get('format')!r} version {m.get('version')!r}")
    shards = tuple((str(s["name"]), int(s["count"]), int(s["bytes"])) for s in m["shards"])
    out = cls(
      count=int(m["count"]),
      image_shape=tuple(int(v) for v in m["image_shape"]),  # type: ignore[arg-type]
      labelled=bool(m["labelled"]),
      num_classes=int(m["num_classes"]),
      class_names=tuple(str(c) for c in m["class_names"]),
      shards=shards,
      fingerprint=str(m["fingerprint"]),
      source=dict(m.get("source", {})),
    )
    if len(out.image_shape) != 3 or sum(c for _, c, _ in shards) != out.count:
      raise ValueError(
        f"image_shape {out.image_shape}, {out.count} records in {len(shards)} shards"
      )
    if any("/" in n or n.startswith(".") for n, _, _ in shards):
      raise ValueError("a shard name is a path")
    return out


def encode(images: np.ndarray, labels: np.ndarray | None) -> list[bytes]:
  """uint8 (n, H, W, C) images and int (n,) labels (None: zeros) -> n records."""
  n = len(images)
  lab = np.zeros(n, "<i4") if labels is None else np.asarray(labels).astype("<i4")
  rows = np.concatenate([lab.view(np.uint8).reshape(n, 4), images.reshape(n, -1)], axis=1)
  return [r.tobytes() for r in rows]


def decode(records: list[bytes], image_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
  """n records -> (uint8 (n, H, W, C) images, int32 (n,) labels), fresh arrays.
  ValueError when a record has the wrong length (a damaged shard)."""
  size = _LABEL_BYTES + int(np.prod(image_shape))
  if any(len(r) != size for r in records):
    bad = next(len(r) for r in records if len(r) != size)
    raise ValueError(f"a record has {bad} bytes, expected {size}")
  rows = np.frombuffer(b"".join(records), np.uint8).reshape(len(records), size)
  labels = rows[:, :_LABEL_BYTES].copy().view("<i4").reshape(-1).astype(np.int32)
  return rows[:, _LABEL_BYTES:].reshape(len(records), *image_shape).copy(), labels


class ShardWriter:
  """Writes examples into `folder`/shard-NNNNN.array_record, `shard_size` records per shard,
  hashing every record for the manifest's fingerprint. Call `close()` to finish the last one."""

  def __init__(self, folder: Path, image_shape: tuple[int, int, int], shard_size: int):
    if shard_size < 1:
      raise ValueError(f"--shard_size must be positive, got {shard_size}.")
    self.folder, self.image_shape, self.shard_size = Path(folder), image_shape, shard_size
    self.shards: list[tuple[str, int, int]] = []
    self.count, self._writer, self._in_shard = 0, None, 0
    self._hash = hashlib.sha256(json.dumps(list(image_shape)).encode())

  def add(self, images: np.ndarray, labels: np.ndarray | None) -> None:
    """Appends uint8 (n, H, W, C) images with their int (n,) labels (None: unlabelled)."""
    from array_record.python import array_record_module

    if images.dtype != np.uint8 or images.shape[1:] != self.image_shape:
      raise ValueError(f"images {images.dtype} {images.shape[1:]}, expected {self.image_shape}")
    for record in encode(images, labels):
      if self._writer is None:
        name = f"shard-{len(self.shards):05d}.array_record"
        self._writer = array_record_module.ArrayRecordWriter(
          str(self.folder / name), "group_size:1"
        )
        self.shards.append((name, 0, 0))
      self._writer.write(record)
      self._hash.update(record)
      self._in_shard += 1
      self.count += 1
      if self._in_shard == self.shard_size:
        self._finish_shard()

  def _finish_shard(self) -> None:
    if self._writer is not None:
      self._writer.close()
      name = self.shards[-1][0]
      self.shards[-1] = (name, self._in_shard, (self.folder / name).stat().st_size)
      self._writer, self._in_shard = None, 0

  def close(self) -> str:
    """Finishes the last shard; -> the fingerprint (sha256 hex of the shape and all records)."""
    self._finish_shard()
    return self._hash.hexdigest()


def publish(tmp: Path, output: Path, *, overwrite: bool) -> None:
  """Moves the finished folder `tmp` (manifest written) to `output` by renames: readers see
  either the old complete set or the new one, never a half-written one."""
  old = None
  if output.exists() and (overwrite or not any(output.iterdir())):
    old = output.with_name(f".{output.name}.old-{os.getpid()}")
    os.replace(output, old)
  os.replace(tmp, output)  # fails if `output` reappeared meanwhile: nothing is lost
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


def _damaged(root: Path, what: str) -> ValueError:
  return ValueError(
    f"shard folder {root} is damaged: {what}. Prepare it again ({_PREPARE}), "
    "or set config.data.path to an intact shard folder."
  )


def read_manifest(path: str) -> tuple[Path, Manifest]:
  """config.data.path -> (folder, its manifest), after checking that every shard file is there
  with the size the manifest gives. One-line FileNotFoundError / ValueError naming the fix."""
  if not path:
    raise ValueError(
      f"config.data.path is empty: set it to a shard folder written by `{_PREPARE}`."
    )
  root = Path(path).expanduser()
  if not root.exists():
    raise FileNotFoundError(
      f"shard folder {root} does not exist; set config.data.path to a folder written by "
      f"`{_PREPARE}`."
    )
  if not root.is_dir():
    raise ValueError(
      f"config.data.path={str(root)!r} is a file, not a shard folder; point it at the folder "
      f"written by `{_PREPARE}` (for an .npz use config.data.source='npz')."
    )
  if not (root / MANIFEST).is_file():
    records = sorted(p.name for p in root.glob("*.array_record"))
    what = (
      f"{len(records)} shard file(s) but no {MANIFEST}: an unfinished or interrupted preparation"
      if records
      else f"no {MANIFEST} and no shards (is it a shard folder?)"
    )
    raise ValueError(f"{root} has {what}. Prepare it with `{_PREPARE}`.")
  try:
    manifest = Manifest.from_json((root / MANIFEST).read_text())
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise _damaged(root, f"{MANIFEST} is unreadable ({type(e).__name__}: {e})") from e
  if not manifest.count:
    raise ValueError(f"shard folder {root} holds no images; prepare it from a non-empty input.")
  for name, _, size in manifest.shards:
    try:
      found = (root / name).stat().st_size
    except OSError:
      raise _damaged(root, f"{name} is missing") from None
    if found != size:
      raise _damaged(root, f"{name} has {found} bytes, the manifest says {size}")
  return root, manifest


@dataclasses.dataclass(frozen=True, eq=False)
class RecordFolder:
  """A folder of array_record shards and their manifest (count, shard names, classes), left on
  disk: what ShardDataset and data.latents.LatentDataset share. `index`: int64 (n,) record
  numbers of this subset (held-out split), or None for all records. Nothing is read until a
  subclass reads."""

  root: Path
  manifest: Any
  index: np.ndarray | None = None
  _source: Any = dataclasses.field(default=None, repr=False)

  def __post_init__(self):
    if self._source is None:
      import grain

      # "file[0:n]" gives each file's length up front, so no file is opened before it is read.
      paths = [f"{self.root / name}[0:{count}]" for name, count, _ in self.manifest.shards]
      object.__setattr__(self, "_source", grain.sources.ArrayRecordDataSource(paths))

  def __len__(self) -> int:
    return self.manifest.count if self.index is None else len(self.index)

  @property
  def num_classes(self) -> int:
    return self.manifest.num_classes if self.manifest.labelled else 0

  @property
  def class_names(self) -> tuple[str, ...]:
    return self.manifest.class_names

  def take(self, index: np.ndarray) -> Any:
    """The subset at `index` (int array into this one), of the same class; nothing is read."""
    index = np.asarray(index, np.int64)
    return dataclasses.replace(self, index=index if self.index is None else self.index[index])

  def _keys(self, index: np.ndarray) -> np.ndarray:
    """Record numbers of the examples at `index` of this subset."""
    keys = np.asarray(index, np.int64)
    return keys if self.index is None else self.index[keys]


@dataclasses.dataclass(frozen=True, eq=False)
class ShardDataset(RecordFolder):
  """Examples of a shard folder, left on disk (`RecordFolder`). `read(index)` gives uint8
  (n, H, W, C) images in [0, 255] and int32 (n,) labels (None when unlabelled); it is
  thread-safe, so the pipeline's reader threads share one dataset."""

  manifest: Manifest

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return self.manifest.image_shape

  def read(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(uint8 (n, H, W, C) images, int32 (n,) labels or None) at `index` (int (n,))."""
    keys = self._keys(index)
    try:
      # One record at a time: the reader threads already run batches in parallel, and grain's
      # __getitems__ starts a thread per shard touched (9.1 vs 5.4 ms a batch of 128 at 64x64
      # spread over 100 shards, measured on a 2-core CPU).
      records = [self._source[int(k)] for k in keys]
      images, labels = decode(records, self.image_shape)
    except Exception as e:  # noqa: BLE001 -- a corrupt or truncated file, one message
      raise _damaged(self.root, f"reading records failed ({type(e).__name__}: {e})") from e
    return images, labels if self.manifest.labelled else None

  def to_memory(self) -> Dataset:
    """All of this subset as an in-RAM Dataset (for small data and the held-out split)."""
    n = len(self)
    images = np.empty((n, *self.image_shape), np.uint8)
    labels = np.empty(n, np.int32) if self.manifest.labelled else None
    for start in range(0, n, _READ_CHUNK):
      part = np.arange(start, min(start + _READ_CHUNK, n))
      images[part], lab = self.read(part)
      if labels is not None:
        labels[part] = lab
    return Dataset(images, labels, self.num_classes, self.class_names)


def open_shards(spec: DataSpec) -> ShardDataset:
  """spec.path (a shard folder) -> ShardDataset of all its records, checked against
  spec.image_size and spec.channels (the shards are never resized when read)."""
  root, manifest = read_manifest(spec.path)
  want = (spec.image_size, spec.image_size, spec.channels)
  if manifest.image_shape != want:
    h, w, c = manifest.image_shape
    raise ValueError(
      f"the shards in {root} hold {h}x{w}x{c} images but config.data asks for "
      f"{want[0]}x{want[1]}x{want[2]}; set config.data.image_size={h} and "
      f"config.data.channels={c}, or prepare the data again with --image_size "
      f"{want[0]} --channels {want[2]}."
    )
  return ShardDataset(root, manifest)
