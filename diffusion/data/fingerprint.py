"""A key for caches of data statistics and feature networks: a hash of the data settings that
change the images, not of where files live, flips, downloads or prefetching."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

# config.data fields that leave the images as they are
NOT_IMAGES = ("prefetch", "data_dir", "cache_dir", "random_flip", "download")


def fingerprint(data_config: Mapping[str, Any]) -> str:
  """16 hex digits of config.data (a ConfigDict or its JSON dict) without `NOT_IMAGES`.

  Hashes the JSON form ({"data.<field>": value}, sorted, tuples as lists; config.data has no
  nested sections), so a ConfigDict and the dict in a run's config.json give the same digits."""
  to_json = getattr(data_config, "to_json", None)
  d = json.loads(to_json(sort_keys=True)) if to_json else json.loads(json.dumps(data_config))
  flat = {f"data.{k}": v for k, v in d.items() if k not in NOT_IMAGES}
  return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:16]
