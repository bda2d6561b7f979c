"""diffusion.metrics.quality: the feature net trained on sprites ranks real images above noise
and blur in FD, KID and SWD."""

import numpy as np
import pytest
from conftest import tiny_config

from diffusion import data
from diffusion.metrics import distances, feature_net
from diffusion.metrics.quality import Reference, quality

RNG = np.random.default_rng(0)


@pytest.fixture(scope="module")
def sets():
  """800 training and 200 held-out 16x16 sprites of 8 classes (at 8x8 the net's last
  convolutions see 2x2 maps, which XLA:CPU runs through a slow generic kernel at the tests' -O0)."""
  c = tiny_config()
  c.data.update(num_sprites=1000, eval_fraction=0.2, image_size=16)
  spec = data.DataSpec(**c.data.to_dict())
  return data.load(spec, split="train"), data.load(spec, split="eval")


def test_quality_ranks_real_above_noise_and_blur(sets):
  train_set, held = sets
  net = feature_net.train(train_set.images, train_set.labels, train_set.num_classes, steps=80)
  assert net.meta["kind"] == "classifier"
  assert feature_net.accuracy(net, held.images, held.labels) > 0.5  # 8 classes
  ref = Reference.build(train_set.images[:400], net)
  np.testing.assert_array_equal(ref.features, net.features(train_set.images[:400]))
  assert ref.inception is None
  real = held.images[:100]
  noise = RNG.integers(0, 256, real.shape).astype(np.uint8)
  blur = distances.upsample(distances.downsample(real.astype(np.float32)), real.shape)
  blur = np.clip(np.round(blur), 0, 255).astype(np.uint8)
  q = {name: quality(x, ref, net) for name, x in [("real", real), ("noise", noise), ("blur", blur)]}
  for metric in ("fd", "kid", "swd"):
    assert q["real"][metric] < q["blur"][metric], (metric, q)
    assert q["real"][metric] < q["noise"][metric], (metric, q)
  assert q["real"]["fid"] is None and q["real"]["inception_kid"] is None  # no Inception
  assert len(q["real"]["swd_levels"]) == 2  # 16x16 images: levels at 16 and 8
  assert q["real"] == quality(real, ref, net)  # deterministic given the seed
