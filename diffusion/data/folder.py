"""A folder of images (searched recursively) -> Dataset, decoded once and cached as .npz.

Labels come from the first level of subfolders (`root/<class>/.../image.png`) when
`config.data.labels` is on and every decoded image lies in one; the classes are those with at
least one decoded image (unreadable files count for nothing). Files with an image extension that
cannot be decoded (unreadable, truncated, not images), broken symbolic links (dangling or
looping) and special files (FIFOs, devices) are skipped, counted and listed; links to folders
are not followed. The cache file is keyed by a hash of the image files' relative paths, sizes
and modification times and the conversion options, so any change to the folder or the options
decodes again; otherwise a second run starts at once.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
from pathlib import Path

import numpy as np
from absl import logging
from PIL import Image, ImageOps

from diffusion.data import images as images_lib
from diffusion.data.cache import read_cache, write_cache
from diffusion.data.dataset import Dataset, DataSpec

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp")
_CACHE_VERSION = 3  # bump when decoding or labelling changes, so old caches are not reused
_MAX_LISTED = 100  # skipped files listed by name in the log


def _stamp(path: Path) -> tuple[int, int]:
  """(size, mtime_ns) of the file, else of the link itself when it leads nowhere (dangling, a
  loop), else (-1, -1) (gone since it was listed): the file stays listed and is skipped when
  decoded, and mending it changes the stamp."""
  for stat in (path.stat, path.lstat):
    try:
      st = stat()
      return st.st_size, st.st_mtime_ns
    except OSError:
      pass
  return -1, -1


def _scan(root: Path, cache_dir: Path) -> tuple[list[tuple[str, int, int]], list[str], list[str]]:
  """Image files as sorted (relative posix path, size, mtime_ns), the other file names, and
  "folder: reason" for the folders that could not be listed.

  Hidden files and folders (".*") and the cache folder are not visited; links to folders are
  not followed.
  """
  found, others, unlisted = [], [], []

  def failed(e: OSError) -> None:
    unlisted.append(f"{e.filename}: {type(e).__name__}: {e.strerror}")

  cache_dir = cache_dir.resolve()
  for dirpath, dirnames, filenames in os.walk(root, onerror=failed):
    here = Path(dirpath)
    dirnames[:] = sorted(
      d for d in dirnames if not d.startswith(".") and (here / d).resolve() != cache_dir
    )
    for name in sorted(filenames):
      if name.startswith("."):
        continue
      rel = (here / name).relative_to(root).as_posix()
      if name.lower().endswith(IMAGE_EXTENSIONS):
        found.append((rel, *_stamp(here / name)))
      else:
        others.append(rel)
  return sorted(found), others, unlisted


def _not_a_file(path: Path) -> str:
  """Why `path`, listed as a file but not a regular one, cannot be decoded."""
  try:
    path.stat()
  except OSError as e:
    if path.is_symlink():
      return f"broken symbolic link -> {os.readlink(path)} ({e.strerror})"
    return f"{type(e).__name__}: {e.strerror}"
  return "not a regular file (a FIFO, socket or device)"


def _decode(path: Path, opts: dict) -> np.ndarray:
  """One file -> uint8 (size, size, channels); raises on unreadable or truncated files."""
  with Image.open(path) as img:
    img.draft(img.mode, (2 * opts["size"], 2 * opts["size"]))  # JPEG: decode at reduced scale
    img.load()  # decodes fully here, so truncation raises now
    img = ImageOps.exif_transpose(img)  # camera rotation
    return images_lib.conform(
      img,
      size=opts["size"],
      channels=opts["channels"],
      resize=opts["resize"],
      background=opts["background"],
    )


def _decode_all(root: Path, files: list[str], opts: dict):
  """-> (list of arrays or None, list of "path: reason" for the files that failed)."""

  def one(rel):
    if not (root / rel).is_file():  # never open a FIFO (it would block) or a broken link
      return None, f"{rel}: {_not_a_file(root / rel)}"
    try:
      return _decode(root / rel, opts), None
    except Exception as e:  # noqa: BLE001 -- any decoder failure means "skip this file"
      return None, f"{rel}: {type(e).__name__}: {e}"

  workers = min(8, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:  # PIL decodes without the GIL
    results = list(pool.map(one, files))
  return [r[0] for r in results], [r[1] for r in results if r[1] is not None]


def _labels(files: list[str], want: bool, root: Path):
  """Relative paths of the decoded images -> (int32 labels or None, class names) from the first
  path component; None when any of them lies directly in `root`."""
  if not want:
    return None, ()
  top = [f for f in files if "/" not in f]
  if top or not files:
    if top and len(top) < len(files):
      logging.warning(
        "%s: %d image(s) lie directly in the folder, not in a class subfolder; "
        "loading it unlabelled (move them into subfolders, or set "
        "config.data.labels=False to silence this).",
        root,
        len(top),
      )
    return None, ()
  classes = sorted({f.split("/", 1)[0] for f in files})
  index = {c: i for i, c in enumerate(classes)}
  return np.array([index[f.split("/", 1)[0]] for f in files], np.int32), tuple(classes)


def _no_images_error(
  root: Path, files: list, others: list[str], skipped: list[str], unlisted: list[str]
) -> ValueError:
  what = (
    f"{len(files)} file(s) with an image extension, none readable (e.g. {skipped[0]})"
    if files
    else "no file with an image extension"
  )
  if others:
    what += f", and {len(others)} other file(s) (e.g. {', '.join(others[:3])})"
  if unlisted:
    what += f"; {len(unlisted)} folder(s) could not be listed (e.g. {unlisted[0]})"
  return ValueError(
    f"no readable image in {root}: found {what}. Put {'/'.join(IMAGE_EXTENSIONS)} images "
    "there (in one subfolder per class for labels), or point config.data.path at such a folder."
  )


def _log_skipped(root: Path, skipped: list[str]) -> None:
  if skipped:
    listed = "\n  ".join(skipped[:_MAX_LISTED])
    more = f"\n  ... and {len(skipped) - _MAX_LISTED} more" if len(skipped) > _MAX_LISTED else ""
    logging.warning(
      "%s: skipped %d unreadable or truncated image file(s):\n  %s%s",
      root,
      len(skipped),
      listed,
      more,
    )


def load_folder(spec: DataSpec) -> Dataset:
  """spec.path (image_size, channels, resize, background, labels, cache_dir) -> Dataset.

  Raises FileNotFoundError when the folder does not exist, ValueError when the path is a file
  or the folder has no readable image. Unreadable files are skipped, counted and listed in the
  log.
  """
  if not spec.path:
    raise ValueError(
      "config.data.path is empty: set it to a folder of images "
      "(--config.data.path=/path/to/images)."
    )
  root = Path(spec.path).expanduser()
  if not root.exists():
    raise FileNotFoundError(
      f"image folder {root} does not exist; set config.data.path to a folder of images."
    )
  if not root.is_dir():
    npz = (
      " (or, for a .npz of images, set config.data.source='npz')"
      if root.suffix.lower() == ".npz"
      else ""
    )
    raise ValueError(
      f"config.data.path={str(root)!r} is a file, not a folder; set it to the "
      f"folder that holds the images{npz}."
    )
  cache_dir = Path(spec.cache_dir).expanduser() if spec.cache_dir else root / ".diffusion_cache"
  files, others, unlisted = _scan(root, cache_dir)
  if unlisted:
    logging.warning(
      "%s: could not list %d folder(s); their images are left out:\n  %s",
      root,
      len(unlisted),
      "\n  ".join(unlisted[:_MAX_LISTED]),
    )
  if others:
    logging.info(
      "%s: ignoring %d file(s) without an image extension (%s), e.g. %s",
      root,
      len(others),
      "/".join(IMAGE_EXTENSIONS),
      others[:5],
    )
  opts = {
    "size": int(spec.image_size),
    "channels": int(spec.channels),
    "resize": str(spec.resize),
    "background": [int(v) for v in spec.background],
    "labels": bool(spec.labels),
  }
  key = hashlib.sha256(
    json.dumps(
      {"version": _CACHE_VERSION, "files": files, "options": opts}, sort_keys=True
    ).encode()
  ).hexdigest()[:24]
  cache = cache_dir / f"folder-{key}.npz"
  if cache.exists():
    try:
      z = read_cache(cache)
      labels = z["labels"] if bool(z["has_labels"]) else None
      data = Dataset(
        z["images"], labels, len(z["class_names"]), tuple(str(c) for c in z["class_names"])
      )
      skipped = [str(s) for s in z["skipped"]]
      logging.info("%s: %d images from the cache %s", root, len(data), cache)
      _log_skipped(root, skipped)
      return data
    except Exception as e:  # noqa: BLE001 -- a damaged cache is rebuilt
      logging.warning("cache %s is unreadable (%s); decoding again.", cache, e)

  rels = [f[0] for f in files]
  arrays, skipped = _decode_all(root, rels, opts)
  _log_skipped(root, skipped)
  keep = [i for i, a in enumerate(arrays) if a is not None]
  if not keep:
    raise _no_images_error(root, files, others, skipped, unlisted)
  labels, classes = _labels([rels[i] for i in keep], opts["labels"], root)  # decoded files only
  images = np.stack([arrays[i] for i in keep])
  data = Dataset(images, labels, len(classes), classes)
  logging.info(
    "%s: decoded %d images (%d skipped), %d classes", root, len(data), len(skipped), len(classes)
  )
  write_cache(
    cache,
    images=images,
    labels=labels if labels is not None else np.zeros(0),
    has_labels=labels is not None,
    class_names=np.array(classes, dtype=str),
    skipped=np.array(skipped, dtype=str),
  )
  return data
