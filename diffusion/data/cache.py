"""Decoded-image caches: .npz files written atomically and read without unpickling anything."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging


def write_cache(path: Path, **arrays: Any) -> None:
  """np.savez to `path` atomically (a uniquely named temporary file, then a rename, so that
  processes of a multi-host job may share the folder). A failure only logs a warning: the next
  run decodes again."""
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
      dir=path.parent, prefix=f".tmp-{path.stem}-", suffix=".npz", delete=False
    ) as fh:
      try:
        np.savez(fh, **arrays)
      except BaseException:
        os.unlink(fh.name)
        raise
    os.chmod(fh.name, 0o644)  # as open() would make it, not 0600
    os.replace(fh.name, path)
  except OSError as e:
    logging.warning(
      "could not write the cache %s (%s); the next run decodes again. Set "
      "config.data.cache_dir to a writable folder.",
      path,
      e,
    )


def read_cache(path: Path) -> dict[str, np.ndarray]:
  """Every array of the .npz at `path`, read eagerly, never unpickled: an object array raises
  ValueError, a damaged file some exception; callers rebuild the cache on either."""
  with np.load(path, allow_pickle=False) as z:
    return {k: z[k] for k in z.files}
