"""diffusion/modes/pictures.py: the forward strip, the schedule chart and the loss curve of a run,
from its config and a fabricated metrics.jsonl (no training, no checkpoint)."""

import json
import os

import numpy as np
from conftest import tiny_config
from PIL import Image

from diffusion import plots
from diffusion.modes import pictures


def write_rows(workdir, rows) -> None:
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as fh:
    fh.writelines(json.dumps(r) + "\n" for r in rows)


def test_pictures_mode_writes_pictures(tmp_path):
  c = tiny_config()
  c.diffusion.num_timesteps = 100
  # A resumed run logged step 4 twice (the newest row counts), then an eval row and a torn line.
  write_rows(
    tmp_path,
    [
      {"step": 2, "loss": 0.5},
      {"step": 4, "loss": 9.0},
      {"step": 4, "loss": 0.25},
      {"step": 6, "loss": 1 / 6},
      {"step": 6, "mode": "eval", "sampler": "ddim", "fd": 1e3},
    ],
  )
  with open(tmp_path / "metrics.jsonl", "a") as fh:
    fh.write('{"step": 8, "lo')
  paths = pictures.run(c, str(tmp_path), num_images=4)
  assert set(paths) == {"forward", "schedule", "loss"}
  for p in paths.values():
    assert os.path.dirname(p) == str(tmp_path / "pictures") and os.path.getsize(p) < 500_000
  with Image.open(paths["forward"]) as im:  # 8 columns of 64 px cells (8x8 sprites, 8x)
    assert im.size == (8 * 66 + 2, im.size[1]) and im.size[1] > 4 * 66
  with Image.open(paths["schedule"]) as im:  # the configured schedule and 3 or 4 others
    px = np.asarray(im.convert("RGB"))
  assert all((px == c).all(-1).any() for c in plots.COLORS[:4])
  # The loss curve peaks at its first step and falls: the 9.0 row and the eval row are out.
  with Image.open(paths["loss"]) as im:
    ys, xs = np.nonzero((np.asarray(im.convert("RGB")) == plots.COLORS[0]).all(-1))
  assert xs[ys.argmin()] <= xs.min() + 3 and xs[ys.argmax()] >= xs.max() - 3


def test_no_loss_picture_without_training_rows(tmp_path):
  c = tiny_config()
  write_rows(tmp_path, [{"step": 5, "mode": "eval", "fd": 1.0}, {"step": 6, "loss": float("nan")}])
  assert set(pictures.run(c, str(tmp_path), num_images=2)) == {"forward", "schedule"}
  os.remove(tmp_path / "metrics.jsonl")
  assert "loss" not in pictures.run(c, str(tmp_path), num_images=2)
