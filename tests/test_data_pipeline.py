"""data/pipeline.py: batches as pure functions of (seed, k, process), prefetching, scaling."""

import threading

import jax
import numpy as np
import pytest

from diffusion import data


def _indexed(n, labelled=True):
  """Image i holds i in pixel (0, 0) and an asymmetric pattern (so flips are visible)."""
  imgs = np.zeros((n, 4, 4, 1), np.uint8)
  imgs[:, 0, 0, 0] = np.arange(n)
  imgs[:, 1, 3, 0] = 255
  return data.Dataset(imgs, np.arange(n, dtype=np.int32) if labelled else None, n * labelled)


def _ids(batch):
  return batch["label"].reshape(-1)


def test_batches_shape_and_epochs_are_permutations():
  ds = _indexed(50)
  kw = dict(global_batch=10, seed=3, local_devices=2, process_index=0, process_count=1)
  b = data.batch_at(ds, 0, **kw)
  assert b["image"].shape == (2, 5, 4, 4, 1) and b["image"].dtype == np.uint8
  assert b["label"].shape == (2, 5) and b["label"].dtype == np.int32
  np.testing.assert_array_equal(b["image"][..., 0, 0, 0], b["label"])  # image matches label
  epoch0 = np.concatenate([_ids(data.batch_at(ds, s, **kw)) for s in range(5)])
  epoch1 = np.concatenate([_ids(data.batch_at(ds, s, **kw)) for s in range(5, 10)])
  assert sorted(epoch0) == list(range(50)) and sorted(epoch1) == list(range(50))
  assert (epoch0 != epoch1).any() and (epoch0 != np.arange(50)).any()  # shuffled, per epoch
  other_seed = data.batch_at(ds, 0, **{**kw, "seed": 4})
  assert (_ids(other_seed) != _ids(b)).any()
  # A dataset smaller than the batch still works: the stream wraps into the next epoch.
  tiny = _indexed(3)
  stream = _ids(data.batch_at(tiny, 0, **kw))
  assert sorted(stream[:3]) == [0, 1, 2] and sorted(stream[3:6]) == [0, 1, 2]
  unlabelled = data.batch_at(_indexed(50, labelled=False), 0, **kw)
  assert (unlabelled["label"] == 0).all() and unlabelled["label"].dtype == np.int32


def test_restart_gives_the_same_batches():
  ds = _indexed(37)
  kw = dict(
    global_batch=8, seed=11, local_devices=2, process_index=0, process_count=1, random_flip=True
  )
  with data.train_iterator(ds, **kw, prefetch=3) as it:
    straight = [next(it) for _ in range(12)]
  with data.train_iterator(ds, **kw, start_step=5, prefetch=2) as it:
    resumed = [next(it) for _ in range(7)]
    assert it.next_step == 12
  for a, b in zip(straight[5:], resumed, strict=True):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  without_prefetch = data.train_iterator(ds, **kw, start_step=5, prefetch=0)
  np.testing.assert_array_equal(next(without_prefetch)["image"], straight[5]["image"])


def test_process_shards_are_disjoint_and_cover_the_global_batch():
  ds = _indexed(100)
  common = dict(global_batch=16, seed=5, random_flip=True)
  for step in (0, 7):
    whole = data.batch_at(ds, step, **common, local_devices=4, process_index=0, process_count=1)
    parts = [
      data.batch_at(ds, step, **common, local_devices=2, process_index=p, process_count=2)
      for p in (0, 1)
    ]
    assert parts[0]["image"].shape == (2, 4, 4, 4, 1)
    ids = [set(_ids(p)) for p in parts]
    assert not ids[0] & ids[1] and len(ids[0] | ids[1]) == 16
    # Process p holds the p-th contiguous half of the same global batch, flips included.
    glued = np.concatenate([p["image"].reshape(-1, 4, 4, 1) for p in parts])
    np.testing.assert_array_equal(glued, whole["image"].reshape(-1, 4, 4, 1))


def test_random_flip_mirrors_some_examples():
  ds = _indexed(64)
  kw = dict(global_batch=64, seed=0, local_devices=1, process_index=0, process_count=1)
  plain = data.batch_at(ds, 2, **kw)["image"][0]
  flipped = data.batch_at(ds, 2, **kw, random_flip=True)["image"][0]
  mirrored = (flipped == plain[:, :, ::-1]).all(axis=(1, 2, 3))
  same = (flipped == plain).all(axis=(1, 2, 3))
  assert (mirrored ^ same).all() and 10 < mirrored.sum() < 54


def test_batch_not_divisible_is_a_clear_error():
  ds = _indexed(20)
  with pytest.raises(ValueError, match=r"batch size 10 .* 4 devices .*multiple of 4"):
    data.batch_at(ds, 0, global_batch=10, seed=0, local_devices=2, process_index=0, process_count=2)
  with pytest.raises(ValueError, match="12 .* 8 devices"):
    data.train_iterator(
      ds, global_batch=12, seed=0, local_devices=8, process_index=0, process_count=1
    )


def test_prefetch_thread_stops_and_forwards_errors():
  before = threading.active_count()
  it = data.train_iterator(
    _indexed(10),
    global_batch=2,
    seed=0,
    local_devices=1,
    process_index=0,
    process_count=1,
    prefetch=2,
  )
  next(it)
  it.close()
  assert threading.active_count() == before
  with pytest.raises(StopIteration):
    next(it)

  def make(step):
    if step == 3:
      raise KeyError("boom")
    return {"step": step}

  with data.Prefetcher(make, 0, 2) as it:
    assert [next(it)["step"] for _ in range(3)] == [0, 1, 2]
    with pytest.raises(KeyError, match="boom"):
      next(it)


def test_prefetcher_runs_ahead_of_the_consumer_and_stays_bounded():
  made, events = [], {k: threading.Event() for k in range(6)}

  def make(step):
    made.append(step)
    if step in events:
      events[step].set()
    return {"step": step}

  with data.Prefetcher(make, 0, 3) as it:
    # Before the consumer asks for anything: `depth` batches queued and one more made, waiting.
    assert events[3].wait(timeout=60), f"the prefetch thread made only {made}"
    assert made == [0, 1, 2, 3]  # bounded: the full queue stops it
    assert next(it)["step"] == 0
    assert events[4].wait(timeout=60), f"the prefetch thread made only {made}"
    assert made == [0, 1, 2, 3, 4]  # before the consumer asks for the second batch
    assert [next(it)["step"] for _ in range(2)] == [1, 2]
  made.clear()
  on_demand = data.Prefetcher(make, 5, 0)  # depth 0: nothing is made before it is asked for
  assert made == [] and next(on_demand)["step"] == 5 and made == [5]


def test_normalize_and_to_uint8_round_trip():
  x = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
  y = jax.jit(data.normalize)(x)
  assert y.dtype == np.float32 and float(y.min()) == -1.0 and float(y.max()) == 1.0
  np.testing.assert_array_equal(data.to_uint8(y), x)
  np.testing.assert_array_equal(data.to_uint8(np.array([-3.0, 3.0])), [0, 255])
