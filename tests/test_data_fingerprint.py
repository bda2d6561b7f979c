"""data/fingerprint.py: the cache key follows the images only."""

import json

from configs import sprites
from diffusion.data import fingerprint


def test_data_fingerprint_follows_the_images_only():
  d = sprites.get_config().data
  fp = fingerprint(d)
  assert fingerprint(json.loads(d.to_json())) == fp  # the config.json form: the same digits
  d.update(prefetch=0, random_flip=False, cache_dir="/x", data_dir="/y", download=False)
  assert fingerprint(d) == fp
  d.sprite_seed = 1
  assert fingerprint(d) != fp
