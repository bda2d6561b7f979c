"""Checkpointer: read-only access leaves a training run's unfinished save alone; retention."""

import shutil
import time

import numpy as np

from diffusion import checkpoints

UNFINISHED = "2.orbax-checkpoint-tmp-1763880000"  # orbax names a save in progress so


def test_read_only_restores_without_deleting_an_unfinished_save(tmp_path):
  state = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "step": np.int32(1)}
  writer = checkpoints.Checkpointer(str(tmp_path), async_save=False)
  writer.save(1, state)
  writer.close()
  shutil.copytree(tmp_path / "1", tmp_path / UNFINISHED)  # a concurrent save, half done

  reader = checkpoints.Checkpointer(str(tmp_path), read_only=True)
  assert reader.latest_step() == 1
  np.testing.assert_array_equal(reader.restore_host(1)["w"], state["w"])
  reader.close()
  time.sleep(2.0)  # time for a (wrongly started) background cleanup to act
  assert (tmp_path / UNFINISHED).exists()

  # The writable manager does clean it up (what a reader must not do).
  checkpoints.Checkpointer(str(tmp_path), async_save=False).close()
  deadline = time.time() + 30  # orbax removes it in a background thread
  while (tmp_path / UNFINISHED).exists() and time.time() < deadline:
    time.sleep(0.05)
  assert not (tmp_path / UNFINISHED).exists()


def test_keeps_the_newest_k_and_every_mth_step(tmp_path):
  ckpt = checkpoints.Checkpointer(str(tmp_path), keep=2, keep_every=4, async_save=False)
  for step in range(1, 11):
    ckpt.save(step, {"w": np.full(3, step, np.float32)})
  ckpt.close()
  reader = checkpoints.Checkpointer(str(tmp_path), read_only=True)
  assert reader.all_steps() == [4, 8, 9, 10]
  np.testing.assert_array_equal(reader.restore_host(4)["w"], np.full(3, 4, np.float32))
  reader.close()
