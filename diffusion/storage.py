"""Files of a run directory that may be local or remote (gs://, or another URL etils.epath
opens). Local paths keep the os calls (atomic renames, O_CREAT|O_EXCL, appends). Remote ones go
through etils.epath (gcsfs for gs://), and through fsspec for the two calls epath lacks: the
exclusive create (open mode "x": a generation-match precondition on GCS) and the rename (epath's
wants the target's folder to exist, which on GCS means to hold an object).

An object store has neither appends nor renames: a remote write replaces a whole object (readers
see the old one or the new one), an append reads and rewrites the object (a row that another
process appends in that moment can be lost), a rename copies and deletes. Imports no JAX; epath
and fsspec are imported at the first remote path.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any


def is_remote(path: str) -> bool:
  """Whether `path` is a URL (gs://bucket/...) rather than a filesystem path."""
  return "://" in path


@functools.cache
def _configure() -> None:
  import fsspec

  # Trainer, eval --watch and sampling share a run directory from several processes: list it
  # afresh each time, not from gcsfs's listing cache (never refreshed by default).
  fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)


def _epath(path: str) -> Any:
  _configure()
  from etils import epath

  return epath.Path(path)


def _fs(path: str) -> tuple[Any, str]:
  _configure()
  import fsspec

  return fsspec.core.url_to_fs(path)


def absolute(path: str) -> str:
  """`path` made absolute; a URL as it is (os.path.abspath would make gs://b/x <cwd>/gs:/b/x)."""
  if is_remote(path):
    _configure()  # before orbax opens the bucket through epath
    return path
  return os.path.abspath(path)


def makedirs(path: str) -> None:
  """mkdir -p (on an object store folders exist through the objects in them: nothing to make)."""
  if is_remote(path):
    _epath(path).mkdir(parents=True, exist_ok=True)
  else:
    os.makedirs(path, exist_ok=True)


def exists(path: str) -> bool:
  return _epath(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  return _epath(path).is_dir() if is_remote(path) else os.path.isdir(path)


def listdir(path: str) -> list[str]:
  """The names in folder `path`: FileNotFoundError if there is no such local folder; a remote
  folder without objects is empty (`makedirs` made nothing)."""
  if not is_remote(path):
    return os.listdir(path)
  return [p.name for p in _epath(path).iterdir()] if isdir(path) else []


def read_text(path: str) -> str:
  if is_remote(path):
    return _epath(path).read_text()
  with open(path) as fh:
    return fh.read()


def write_text(path: str, text: str) -> None:
  """Replaces `path` with `text` atomically: locally through a temporary file renamed over it
  (a kill leaves the old file or the new one), remotely as one object."""
  if is_remote(path):
    _epath(path).write_text(text)
    return
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as fh:
    fh.write(text)
  os.replace(tmp, path)


def write_json(path: str, obj: Any) -> None:
  """`obj` as indented JSON, written as `write_text` does (a failed write keeps the old file)."""
  write_text(path, json.dumps(obj, indent=2))


def append_text(path: str, text: str) -> None:
  """Appends `text`; remotely by rewriting the object (see the module docstring)."""
  if is_remote(path):
    old = read_text(path) if exists(path) else ""
    _epath(path).write_text(old + text)
    return
  with open(path, "a") as fh:
    fh.write(text)


def create_exclusive(path: str, text: str) -> None:
  """Creates `path` holding `text`; FileExistsError if it exists. Atomic locally (O_EXCL) and on
  GCS (the upload's ifGenerationMatch=0 precondition)."""
  if is_remote(path):
    fs, key = _fs(path)
    with fs.open(key, "xb") as fh:
      fh.write(text.encode())
    return
  fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  with os.fdopen(fd, "w") as fh:
    fh.write(text)


def remove(path: str) -> None:
  """Deletes file `path`; FileNotFoundError if it does not exist."""
  if is_remote(path):
    _epath(path).unlink()
  else:
    os.remove(path)


def rename(src: str, dst: str) -> None:
  """Moves file or folder `src` to `dst` (remotely: copies each object, then deletes it)."""
  if is_remote(src):
    fs, key = _fs(src)
    fs.copy(key, _fs(dst)[1], recursive=True)  # not mv: its moveTo call is not on every store
    fs.rm(key, recursive=True)
  else:
    os.rename(src, dst)


def rmtree(path: str) -> None:
  """Deletes folder `path` and everything in it, if it exists."""
  if not is_remote(path):
    shutil.rmtree(path, ignore_errors=True)
  elif exists(path):
    _epath(path).rmtree()


def upload(local: str, path: str) -> None:
  """Copies local file `local` to `path` (one object when remote)."""
  if is_remote(path):
    fs, key = _fs(path)
    fs.put_file(local, key)
  else:
    shutil.copyfile(local, path)


@contextlib.contextmanager
def writing(path: str) -> Iterator[str]:
  """A local file name to write `path` through, for writers that need one (PIL, NumPy): `path`
  itself when local; for a remote `path` a temporary file, uploaded when the block succeeds."""
  if not is_remote(path):
    yield path
    return
  with tempfile.TemporaryDirectory(prefix="diffusion-") as tmp:
    local = os.path.join(tmp, os.path.basename(path))
    yield local
    upload(local, path)


@contextlib.contextmanager
def reading(path: str) -> Iterator[str]:
  """A local file name to read `path` through: `path` itself, or a downloaded copy."""
  if not is_remote(path):
    yield path
    return
  with tempfile.TemporaryDirectory(prefix="diffusion-") as tmp:
    local = os.path.join(tmp, os.path.basename(path))
    fs, key = _fs(path)
    fs.get_file(key, local)
    yield local
