"""data/sprites.py: the built-in pixel-art source."""

import numpy as np
import PIL.features
import PIL.Image
from conftest import data_spec

from diffusion import data
from diffusion.data import sprites


def test_sprites_deterministic_per_seed():
  a, la = sprites.generate(400, seed=0)
  b, lb = sprites.generate(400, seed=0)
  c, _ = sprites.generate(400, seed=1)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(la, lb)
  assert (a != c).any(axis=(1, 2, 3)).mean() > 0.95  # a new seed redraws (nearly) every sprite


def test_sprites_varied_balanced_pixel_art():
  imgs, labels = sprites.generate(2000, seed=0)
  assert imgs.shape == (2000, 16, 16, 3) and imgs.dtype == np.uint8 and labels.dtype == np.int32
  counts = np.bincount(labels, minlength=len(sprites.CLASSES))
  assert len(counts) == len(sprites.CLASSES) >= 6 and counts.max() - counts.min() <= 1
  assert len(np.unique(imgs.reshape(len(imgs), -1), axis=0)) >= 1990  # nearly all distinct
  packed = imgs.astype(np.int32) @ np.array([1 << 16, 1 << 8, 1])  # (n, 16, 16) colour codes
  colours = np.array([len(np.unique(p)) for p in packed])
  assert np.median(colours) >= 6 and colours.max() <= 16  # several colours, a limited palette
  # A plain background: the four corners share its colour and it fills most of the border.
  bg = packed[:, :1, :1]
  corners = packed[:, [0, 0, -1, -1], [0, -1, 0, -1]]
  assert (corners == bg[:, 0]).all()
  border = np.concatenate([packed[:, 0], packed[:, -1], packed[:, :, 0], packed[:, :, -1]], 1)
  assert (border == bg[:, 0]).mean(1).min() > 0.6 and (border == bg[:, 0]).mean() > 0.9
  coverage = (packed != bg).mean(axis=(1, 2))
  assert 0.1 < coverage.min() and coverage.max() < 0.9  # the sprite is neither tiny nor full
  # Classes differ in shape: their mean foreground masks are far apart.
  masks = np.stack(
    [(packed[labels == k] != bg[labels == k]).mean(0) for k in range(len(sprites.CLASSES))]
  )
  dists = np.abs(masks[:, None] - masks[None]).mean(axis=(2, 3))
  assert dists[~np.eye(len(masks), dtype=bool)].min() > 0.05


def test_sprites_source_resizes_nearest_and_holds_out_eval():
  cfg = data_spec(source="sprites", num_sprites=300, image_size=32, channels=1, eval_fraction=0.1)
  train, held = data.load(cfg), data.load(cfg, split="eval")
  assert train.images.shape == (270, 32, 32, 1) and held.images.shape == (30, 32, 32, 1)
  assert train.num_classes == len(sprites.CLASSES)
  np.testing.assert_array_equal(train.images[:, ::2, ::2], train.images[:, 1::2, 1::2])
  full = sprites.generate(300, 0)[0]
  gray = np.asarray(PIL.Image.fromarray(full[0]).convert("L"))  # reference for example 0
  idx_train, idx_eval = data.holdout_indices(300, 0.1)
  assert not set(idx_train) & set(idx_eval)
  where = train if 0 in idx_train else held
  pos = list(idx_train if 0 in idx_train else idx_eval).index(0)
  np.testing.assert_array_equal(where.images[pos, ::2, ::2, 0], gray)
