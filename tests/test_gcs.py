"""A gs:// workdir end to end against a local GCS (gcp-storage-emulator, in memory): training,
an exact resume, metrics.jsonl, TensorBoard, config.json, the lock, a damaged checkpoint set
aside, the sample and pictures modes and a sweep's manifest and status, all in the bucket, never
in a local folder "gs:"."""

import io
import json
import logging
import os
import socket
from http import HTTPStatus

import jax
import numpy as np
import pytest
from conftest import tiny_config
from PIL import Image

from configs import common
from diffusion import checkpoints, rundir, runlog, train
from diffusion.modes import pictures, sample
from experiments import sweep

BUCKET = "bkt"


def _faithful_emulator(mp: pytest.MonkeyPatch) -> None:
  """Two GCS behaviours the emulator lacks: an upload with ifGenerationMatch=0 of an object that
  exists is refused (412; the trainer's lock relies on it), and a download says the object's
  generation in x-goog-generation (without it TensorStore fails now and then: "Malformed
  StorageGeneration")."""
  from gcp_storage_emulator import server
  from gcp_storage_emulator.exceptions import NotFound
  from gcp_storage_emulator.handlers import objects

  def stored(request, storage, name: str) -> dict | None:
    try:
      return storage.get_file_obj(request.params["bucket_name"], name)
    except NotFound:
      return None

  def insert(request, response, storage, *args, **kwargs):
    meta = request.data.get("meta", request.data) if isinstance(request.data, dict) else {}
    name = (request.query.get("name") or [meta.get("name")])[0]
    if request.query.get("ifGenerationMatch") == ["0"] and stored(request, storage, name):
      response.status = HTTPStatus.PRECONDITION_FAILED
      return None
    return plain_insert(request, response, storage, *args, **kwargs)

  def download(request, response, storage, *args, **kwargs):
    obj = stored(request, storage, request.params["object_id"])
    if obj:
      response["x-goog-generation"] = obj["generation"]
    return plain_download(request, response, storage, *args, **kwargs)

  plain_insert, plain_download = objects.insert, objects.download
  for _, handlers in server.HANDLERS:
    if handlers.get("POST") is plain_insert:
      mp.setitem(handlers, "POST", insert)
    if handlers.get("GET") is plain_download:
      mp.setitem(handlers, "GET", download)
  mp.setattr(objects, "download", download)  # objects.get calls it for ?alt=media


@pytest.fixture(scope="module")
def gcs():
  """The emulator on a free port, with gcsfs (STORAGE_EMULATOR_HOST) and TensorStore (orbax's
  arrays) pointed at it; yields an fsspec file system on it."""
  import gcsfs
  from gcp_storage_emulator import server

  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  url = f"http://localhost:{port}"
  with pytest.MonkeyPatch.context() as mp:
    _faithful_emulator(mp)
    # The emulator logs every missing object TensorStore probes for; gcsfs warns that it cannot
    # tell the bucket's type without credentials, and falls back from the moveTo call the
    # emulator lacks to copy and delete.
    for name in ("gcp_storage_emulator", "gcsfs"):
      mp.setattr(logging.getLogger(name), "level", logging.CRITICAL)
    mp.setenv("STORAGE_EMULATOR_HOST", url)
    mp.setenv("TENSORSTORE_GCS_HTTP_URL", url)
    mp.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "test")  # TensorStore's credentials
    mp.setenv("NO_GCE_CHECK", "true")  # google-auth: no metadata server to ask here
    emulator = server.create_server("localhost", port, in_memory=True, default_bucket=BUCKET)
    emulator.start()
    gcsfs.GCSFileSystem.clear_instance_cache()
    try:
      yield gcsfs.GCSFileSystem(use_listings_cache=False)
    finally:
      gcsfs.GCSFileSystem.clear_instance_cache()  # none pointing at the stopped emulator is reused
      emulator.stop()


def restore(workdir: str):
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  try:
    return ckpt.latest_step(), ckpt.restore_host()
  finally:
    ckpt.close()


def events_scalars(gcs, folder: str) -> dict:
  """{(tag, step): value} of every TensorBoard event file in `folder` of the bucket."""
  from tensorboardX.proto import event_pb2

  scalars = {}
  for name in gcs.ls(folder):
    raw, pos = gcs.cat(name), 0
    while pos < len(raw):  # records: length, crc, Event proto, crc
      n = int.from_bytes(raw[pos : pos + 8], "little")
      event = event_pb2.Event.FromString(raw[pos + 12 : pos + 12 + n])
      pos += 16 + n
      for v in event.summary.value:
        scalars[(v.tag, event.step)] = v.simple_value
  return scalars


def png(gcs, key: str) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(gcs.cat(key))))


def test_training_resumes_exactly_in_a_bucket_and_sampling_writes_there(
  gcs, tmp_path, monkeypatch, tiny_reference
):
  monkeypatch.chdir(tmp_path)  # where os.path.abspath would have made gs:/bkt/...
  url, key = f"gs://{BUCKET}/run", f"{BUCKET}/run"
  first = tiny_config(num_steps=3, checkpoint_every=2, log_every=1)
  with rundir.Lock(url):
    assert json.loads(gcs.cat(f"{key}/lock"))["pid"] == os.getpid()
    with pytest.raises(rundir.WorkdirBusyError, match="in use by another trainer"):
      rundir.Lock(url).acquire()
    assert rundir.record_config(url, common.as_dict(first), common.training_changes) == []
    train.train(first, url)
  assert not gcs.exists(f"{key}/lock")  # released
  # Killed after step 3 was logged but before it was saved: the resume starts at step 2.
  gcs.rm(f"{key}/checkpoints/3", recursive=True)
  resumed = tiny_config(num_steps=4, checkpoint_every=2, log_every=1)
  resumed.sample.num_images = 4  # the end of training writes a grid
  wider = common.as_dict(resumed)
  wider["model"]["base_channels"] *= 2
  with pytest.raises(ValueError, match="holds checkpoints trained with another config"):
    rundir.record_config(
      url, wider, common.training_changes
    )  # it sees the checkpoints in the bucket
  with rundir.Lock(url):
    changed = rundir.record_config(url, common.as_dict(resumed), common.training_changes)
    assert changed == ["sample.num_images", "train.num_steps"]
    train.train(resumed, url)

  (s1, want), (s2, got) = restore(tiny_reference), restore(url)  # uninterrupted, local
  assert s1 == s2 == 4
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
    np.testing.assert_array_equal(a, b)
  lines = gcs.cat(f"{key}/metrics.jsonl").decode().splitlines()
  assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]  # step 3 once
  assert runlog.read_metrics(url) == [json.loads(line) for line in lines]
  scalars = events_scalars(gcs, f"{key}/tensorboard")
  last = json.loads(lines[-1])
  assert scalars[("loss", 4)] == pytest.approx(last["loss"], rel=1e-6)
  assert json.loads(gcs.cat(f"{key}/config.json")) == common.as_dict(resumed)
  (row,) = [json.loads(x) for x in gcs.cat(f"{key}/config_history.jsonl").decode().splitlines()]
  assert row["changes"] == {"sample.num_images": [0, 4], "train.num_steps": [3, 4]}
  assert png(gcs, f"{key}/samples/step_4.png").ndim == 3
  run = sweep.Run(index=0, name="run", workdir=url, overrides={}, num_steps=4)
  assert sweep.status(run, eval=False) == "done"  # a sweep reads the bucket too

  c = tiny_config(num_steps=4)
  c.sample.update(num_images=5, batch_size=4, gif_images=2)
  out = sample.run(c, url, progress=False)
  assert out.startswith(f"{url}/samples/step4_")
  folder = out.removeprefix("gs://")
  with gcs.open(f"{folder}/samples.npz", "rb") as fh, np.load(fh) as z:
    images = z["images"]
  assert images.shape == (5, 8, 8, 3)
  names = sorted(os.path.basename(p) for p in gcs.ls(f"{folder}/images"))
  assert names == [f"{i:05d}.png" for i in range(5)]
  np.testing.assert_array_equal(png(gcs, f"{folder}/images/00003.png"), images[3])
  assert json.loads(gcs.cat(f"{folder}/settings.json"))["checkpoint_step"] == 4
  assert gcs.exists(f"{folder}/grid.png") and gcs.exists(f"{folder}/reverse.gif")
  c.sample.update(num_images=2, gif_images=0)  # a smaller rerun leaves no extras
  assert sample.run(c, url, progress=False) == out
  assert sorted(os.path.basename(p) for p in gcs.ls(f"{folder}/images")) == names[:2]
  assert not gcs.exists(f"{folder}/reverse.gif")

  drawn = pictures.run(c, url)  # loss.png only when the metrics are read back from the bucket
  assert sorted(drawn) == ["forward", "loss", "schedule"]
  assert all(png(gcs, p.removeprefix("gs://")).ndim >= 2 for p in drawn.values())
  assert not [name for name in os.listdir(tmp_path) if name.startswith("gs")]


def test_a_sweep_manifest_in_a_bucket(gcs, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  s = sweep.expand("configs/ablations/schedules.py:tiny", f"gs://{BUCKET}/sweeps")
  path = sweep.write_manifest(s)
  assert path == f"gs://{BUCKET}/sweeps/schedules-tiny/sweep.json"
  assert json.loads(gcs.cat(path))["num_runs"] == len(s.runs) == 16
  assert sweep.read_manifest(path).to_json() == s.to_json()
  assert sweep.status(s.runs[0], eval=True) == "new"
  assert not os.listdir(tmp_path)


def test_a_damaged_checkpoint_in_a_bucket_is_moved_aside(gcs):
  url, key = f"gs://{BUCKET}/damaged/checkpoints", f"{BUCKET}/damaged"
  states = {s: {"w": np.full((4, 3), s, np.float32)} for s in (1, 2)}
  ckpt = checkpoints.Checkpointer(url, async_save=False)
  for s, state in states.items():
    ckpt.save(s, state)
  ckpt.close()
  for n in (1, 2):  # damaged twice: set aside as 2.1, then 2.2
    gcs.rm(f"{key}/checkpoints/2/default/_METADATA")
    ckpt = checkpoints.Checkpointer(url, async_save=False)
    try:
      np.testing.assert_array_equal(ckpt.restore(states[1])["w"], states[1]["w"])
      assert ckpt.restored_step == 1 and ckpt.all_steps() == [1]
      assert gcs.exists(f"{key}/checkpoints_damaged/2.{n}/default/manifest.ocdbt")
      assert not gcs.exists(f"{key}/checkpoints/2")
      ckpt.save(2, states[2])
    finally:
      ckpt.close()
