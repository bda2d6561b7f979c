"""Latent shard folders: each image's posterior mean and standard deviation under an autoencoder,
in array_record files, and the data source (config.data.source = "latents") that draws from them.

Written by `python -m diffusion.data.prepare --encode AUTOENCODER ...` (diffusion/encode.py), as
EDM2's `dataset_tool.py encode` does. A record is one example: its int32 label (little-endian)
then float32 (V, 2, h, w, c) little-endian, [view][mean | std], view 0 the image and view 1 its
mirror image (V = 2 when prepared with flips, else 1). The latents are stored raw; `manifest.json`
(written last) holds the normalisation:

  {"format": "diffusion-latents", "version", "count", "latent_shape": [h, w, c], "views",
   "image_shape": [H, W, C], "labelled", "num_classes", "class_names", "shards": [{"name",
   "count", "bytes"}], "fingerprint" (sha256 of the shape and every record),
   "autoencoder": {"fingerprint", "path", "scaling_factor", "shift_factor"},
   "source": {"source", "input" (absolute for paths), "image_size", "channels", "resize"}}

The records follow the source's order, so `pixel_spec` reopens the pixel images in that order:
the held-out split (data.holdout_indices of the count) is the same images in both.

Drawing (`LatentDataset.draw`, called by the batch pipeline for global batch `step`): example at
global batch position p draws noise from NumPy's generator seeded (seed, 2, step, p), takes view
1 when the pipeline's flip for p is set, and returns (mean + std * noise - shift) * scale, float32
(n, h, w, c). Batch `step` is a pure function of (seed, step), so a resume draws the same z.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from diffusion.data.dataset import DataSpec
from diffusion.data.shards import RecordFolder, RecordWriter

MANIFEST = "manifest.json"
FORMAT, VERSION = "diffusion-latents", 1
_LATENT_STREAM = 2  # beside pipeline's order (0) and flip (1) streams
_ENCODE = "python -m diffusion.data.prepare --encode AUTOENCODER --source ... --output DIR"


@dataclasses.dataclass(frozen=True)
class LatentManifest:
  """What a latent shard folder holds (module docstring)."""

  count: int
  latent_shape: tuple[int, int, int]
  views: int
  image_shape: tuple[int, int, int]
  labelled: bool
  num_classes: int
  class_names: tuple[str, ...]
  shards: tuple[tuple[str, int, int], ...]
  fingerprint: str
  autoencoder: dict[str, Any]
  source: dict[str, Any] = dataclasses.field(default_factory=dict)

  def to_json(self) -> str:
    d = dataclasses.asdict(self)
    d["shards"] = [{"name": n, "count": c, "bytes": b} for n, c, b in self.shards]
    return json.dumps({"format": FORMAT, "version": VERSION, **d}, indent=1)

  @classmethod
  def from_json(cls, text: str) -> LatentManifest:
    """Raises ValueError (KeyError, TypeError) when `text` is no latent manifest."""
    m = json.loads(text)
    if m.get("format") != FORMAT or m.get("version") != VERSION:
      raise ValueError(f"format {m.get('format')!r} version {m.get('version')!r}")
    shards = tuple((str(s["name"]), int(s["count"]), int(s["bytes"])) for s in m["shards"])
    if any("/" in n or n.startswith(".") for n, _, _ in shards):
      raise ValueError("a shard name is a path")
    return cls(
      count=int(m["count"]),
      latent_shape=tuple(int(v) for v in m["latent_shape"]),  # type: ignore[arg-type]
      views=int(m["views"]),
      image_shape=tuple(int(v) for v in m["image_shape"]),  # type: ignore[arg-type]
      labelled=bool(m["labelled"]),
      num_classes=int(m["num_classes"]),
      class_names=tuple(str(c) for c in m["class_names"]),
      shards=shards,
      fingerprint=str(m["fingerprint"]),
      autoencoder=dict(m["autoencoder"]),
      source=dict(m.get("source", {})),
    )

  @property
  def scale_shift(self) -> tuple[float, float]:
    return float(self.autoencoder["scaling_factor"]), float(self.autoencoder["shift_factor"])


def _record_shape(m: LatentManifest) -> tuple[int, ...]:
  return (m.views, 2, *m.latent_shape)


class LatentWriter(RecordWriter):
  """A RecordWriter of latent moments (V, 2, h, w, c) and their labels."""

  def __init__(self, folder: Path, latent_shape: tuple[int, int, int], views: int, shard_size: int):
    self.record_shape = (views, 2, *latent_shape)
    super().__init__(folder, self.record_shape, shard_size)

  def add(self, moments: np.ndarray, labels: np.ndarray | None) -> None:
    """moments float32 (n, V, 2, h, w, c) ([view][mean | std]); labels int (n,) or None."""
    if moments.shape[1:] != self.record_shape:
      raise ValueError(f"moments {moments.shape[1:]}, expected {self.record_shape}")
    n = len(moments)
    lab = np.zeros(n, "<i4") if labels is None else np.asarray(labels).astype("<i4")
    body = np.ascontiguousarray(moments, "<f4").reshape(n, -1).view(np.uint8)
    for row in np.concatenate([lab.view(np.uint8).reshape(n, 4), body], axis=1):
      self.write(row.tobytes())


def is_latent_folder(path: str | Path) -> bool:
  try:
    return json.loads((Path(path) / MANIFEST).read_text()).get("format") == FORMAT
  except (OSError, ValueError, AttributeError):
    return False


def read_manifest(path: str) -> tuple[Path, LatentManifest]:
  """config.data.path -> (folder, manifest), every shard file checked for presence and size.
  One-line ValueError / FileNotFoundError naming the fix (pixel shards included)."""
  root = Path(path).expanduser()
  if not path or not (root / MANIFEST).is_file():
    raise FileNotFoundError(
      f"config.data.path={path!r} is not a latent shard folder (no {MANIFEST}); write one with "
      f"`{_ENCODE}`."
    )
  text = (root / MANIFEST).read_text()
  try:
    manifest = LatentManifest.from_json(text)
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    if '"diffusion-shards"' in text:
      raise ValueError(
        f"{root} holds pixel shards, not latents: encode them with `{_ENCODE}` or set "
        "config.data.source='shards'."
      ) from None
    raise ValueError(f"latent folder {root} is damaged ({MANIFEST}: {e}); encode it again.") from e
  for name, _, size in manifest.shards:
    found = (root / name).stat().st_size if (root / name).is_file() else -1
    if found != size:
      raise ValueError(
        f"latent folder {root} is damaged: {name} has {found} bytes, the manifest says {size}; "
        "encode it again."
      )
  return root, manifest


@dataclasses.dataclass(frozen=True, eq=False)
class LatentDataset(RecordFolder):
  """Examples of a latent shard folder, left on disk (module docstring; `RecordFolder`)."""

  manifest: LatentManifest
  latent = True  # the pipeline calls `draw` instead of `read`

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return self.manifest.latent_shape

  def moments(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """-> (float32 (n, V, 2, h, w, c) raw [view][mean | std], int32 (n,) labels or None)."""
    keys = self._keys(index)
    shape = _record_shape(self.manifest)
    size = 4 + 4 * int(np.prod(shape))
    records = [self._source[int(k)] for k in keys]
    if any(len(r) != size for r in records):
      raise ValueError(f"latent folder {self.root} is damaged: a record has the wrong length.")
    rows = np.frombuffer(b"".join(records), np.uint8).reshape(len(records), size)
    labels = rows[:, :4].copy().view("<i4").reshape(-1).astype(np.int32)
    moments = rows[:, 4:].copy().view("<f4").reshape(len(records), *shape).astype(np.float32)
    return moments, labels if self.manifest.labelled else None

  def draw(
    self, index: np.ndarray, flip: np.ndarray | None, *, seed: int, step: int, positions: np.ndarray
  ) -> tuple[np.ndarray, np.ndarray | None]:
    """Normalised latent draws, float32 (n, h, w, c), for the examples `index` at global batch
    positions `positions` of batch `step` (module docstring); `flip` bool (n,) or None."""
    moments, labels = self.moments(index)
    view = np.zeros(len(index), np.int64)
    if flip is not None and self.manifest.views == 2:
      view = np.asarray(flip, np.int64)
    chosen = moments[np.arange(len(index)), view]  # (n, 2, h, w, c)
    noise = np.stack(
      [
        np.random.default_rng([seed % 2**63, _LATENT_STREAM, step, int(p)]).standard_normal(
          self.manifest.latent_shape, dtype=np.float32
        )
        for p in positions
      ]
    )
    scale, shift = self.manifest.scale_shift
    z = chosen[:, 0] + chosen[:, 1] * noise
    return ((z - shift) * scale).astype(np.float32), labels


def open_latents(spec: DataSpec) -> LatentDataset:
  """spec.path -> LatentDataset, checked against spec.image_size and spec.channels (the latent
  side and channels)."""
  root, manifest = read_manifest(spec.path)
  want = (spec.image_size, spec.image_size, spec.channels)
  if manifest.latent_shape != want:
    h, w, c = manifest.latent_shape
    raise ValueError(
      f"the latents in {root} are {h}x{w}x{c} but config.data asks for "
      f"{want[0]}x{want[1]}x{want[2]}; set config.data.image_size={h} and "
      f"config.data.channels={c}."
    )
  return LatentDataset(root, manifest)


PIXEL_FIELD = "config.eval.pixel_data"
_PIXEL_KINDS = {"folder": "folder", "classfolders": "folder", "npz": "npz", "shards": "shards"}


def pixel_spec(
  root: Path, manifest: LatentManifest, eval_fraction: float, override: str = ""
) -> DataSpec:
  """The DataSpec of the pixel images the latents in `root` were encoded from, at the
  autoencoder's input size: the manifest's `source` record, its input replaced by `override`
  (a folder of images, an .npz or a pixel shard folder) when set. FileNotFoundError naming
  config.eval.pixel_data when the input is gone (nothing is read)."""
  src = manifest.source
  kind, where = str(src.get("source", "")), str(src.get("input", ""))
  fix = (
    f"set {PIXEL_FIELD} to where those images are now (a folder of images, an .npz or a pixel "
    "shard folder)"
  )
  if override:
    p = Path(override).expanduser()
    where = override
    if (p / MANIFEST).is_file() and not is_latent_folder(p):
      kind = "shards"
    elif p.is_file() and p.suffix.lower() == ".npz":
      kind = "npz"
    elif p.is_dir() and not is_latent_folder(p):
      kind = "classfolders" if manifest.labelled else "folder"
    else:
      raise FileNotFoundError(
        f"{PIXEL_FIELD}={override!r} is no folder of images, .npz or pixel shard folder; {fix}."
      )
  h, _, c = manifest.image_shape
  common = dict(
    image_size=h,
    channels=c,
    resize=str(src.get("resize", "antialias")),
    eval_fraction=eval_fraction,
    prefetch=0,
  )
  if kind == "sprites":
    return DataSpec(source="sprites", num_sprites=int(where), **common)
  if kind == "tfds":
    return DataSpec(source="tfds", name=where, download=False, **common)
  if kind not in _PIXEL_KINDS:
    raise ValueError(f"the manifest of {root} records no pixel source; {fix}.")
  if not Path(where).expanduser().exists():
    raise FileNotFoundError(
      f"the images the latents in {root} were encoded from ({kind} {where}) are gone; {fix}."
    )
  return DataSpec(source=_PIXEL_KINDS[kind], path=where, labels=kind == "classfolders", **common)
