"""The fid50k protocol of --mode eval (modes/evaluate.py, evaluation/fid50k.py) on
fabricated checkpoints: the numbers and what is written beside them, the cached whole-training-set
reference, per-image keys (two processes of two devices = one device), an interrupted eval
resuming to the same numbers, and watch mode."""

import json
import os
import shutil

import numpy as np
import pytest
from conftest import fabricate_checkpoints, launch, processes, tiny_config

from diffusion import data, generate, parameters, runlog
from diffusion.evaluation import SAMPLE_FIELDS, fid50k
from diffusion.evaluation.heldout import feature_network
from diffusion.metrics import distances
from diffusion.model import Diffusion, SampleSettings
from diffusion.modes import evaluate

N, BATCH = 24, 8  # samples per sampler, global batch (a multiple of 1, 2 and 4 devices)


def fid_config(reference_dir: str):
  """8x8 sprites (196 training images), T = 20, a one-level U-Net predicting v, 2 DDIM steps;
  fid50k with 24 samples, states saved every batch, the in-house feature net (5 steps)."""
  c = tiny_config()
  c.model.update(channel_mult=(1,), attn_resolutions=())
  c.data.update(num_sprites=200)
  c.diffusion.update(num_timesteps=20, prediction="v")
  c.train.num_steps = 4
  c.eval.update(
    protocol="fid50k",
    samplers="ddim:2",
    num_samples=N,
    batch_size=BATCH,
    chunk_images=BATCH,
    kid_pr_samples=16,
    is_splits=3,
    feature_steps=5,
    reference_dir=reference_dir,
  )
  return c


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """(make_workdir, the reference cache, the metrics of one eval of "ddim:2,ddim:3"): workdirs
  are copies of one with checkpoints at steps 2 and 4 and one feature net (trained once, so
  that every run uses the same)."""
  root = tmp_path_factory.mktemp("fid")
  c = fid_config(str(root / "refcache"))
  template = str(root / "template")
  spec = data.DataSpec(**c.data.to_dict())
  feature_network(c, template, data.load(spec, split="train"))
  fabricate_checkpoints(c, template, [2, 4])

  def make(name: str) -> str:
    shutil.copytree(template, root / name)
    return str(root / name)

  c.eval.samplers = "ddim:2,ddim:3"
  workdir = make("baseline")
  with pytest.MonkeyPatch.context() as mp:
    calls, real = [], fid50k.real_features
    mp.setattr(fid50k, "real_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    metrics = evaluate.run(c, workdir, progress=False)
    assert calls == [1]  # the reference was computed
  return make, str(root / "refcache"), workdir, metrics


def test_fid50k_numbers_reference_cache_and_labels(setup, monkeypatch):
  make, refcache, workdir, m = setup
  c = fid_config(refcache)
  saved = json.load(open(os.path.join(workdir, "eval", "metrics.json")))
  assert saved == json.loads(json.dumps(m))
  assert saved == json.load(open(os.path.join(workdir, "eval", "fid50k", "metrics_step4.json")))
  assert (saved["protocol"], saved["step"], saved["num_samples"]) == ("fid50k", 4, N)
  assert saved["features"]["network"] == "feature_net" and not saved["paper_comparable"]
  about = saved["reference"]
  assert about["source"] == "computed" and about["training_images"] == 196
  assert about["data_fingerprint"] == data.fingerprint(c.data)
  assert os.path.dirname(about["path"]) == refcache and os.path.exists(about["path"])
  assert [(r["sampler"], r["num_steps"], r["nfe"]) for r in saved["results"]] == [
    ("ddim", 2, 2),
    ("ddim", 3, 3),
  ]
  r = saved["results"][0]
  assert r["fid"] > 0 and 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1
  assert np.isfinite(r["kid"]) and r["inception_score"] >= 1  # sprite classes: labelled logits
  assert os.path.exists(os.path.join(workdir, "eval", "fid50k", "samples_ddim2.png"))
  assert not os.path.exists(os.path.join(workdir, "eval", "fid50k", "step4"))  # states removed

  # The numbers are those of the features of `generate.generate`'s images and of every training
  # image, computed directly.
  spec = data.DataSpec(**c.data.to_dict())
  train = data.load(spec, split="train")
  ext = evaluate.extractor(c, workdir)
  net = feature_network(c, workdir, train)
  diffusion = Diffusion.from_config(c)
  _, params = parameters.load(diffusion, workdir)
  st = SampleSettings.from_config(c.sample, sampler="ddim", num_steps=2)
  images = generate.generate(diffusion, params, st, num_images=N, batch_size=4, seed=0)
  fake, real_all = net.features(images), net.features(train.images)
  assert ext.scale == net.meta["feature_scale"]
  assert r["fid"] == pytest.approx(distances.frechet_distance(fake, real_all), rel=1e-4)
  real_sub = real_all[np.random.default_rng(0).permutation(len(train))[:16]]
  assert r["kid"] == pytest.approx(distances.kernel_distance(fake[:16], real_sub), rel=1e-3)
  want_pr = distances.precision_recall(real_sub, fake[:16], k=3)
  assert (r["precision"], r["recall"]) == pytest.approx(want_pr)
  is_mean, is_std = distances.inception_score(net.logits(images), 3)
  assert (r["inception_score"], r["inception_score_std"]) == pytest.approx((is_mean, is_std), 1e-4)

  rows = runlog.eval_rows(runlog.read_metrics(workdir))
  assert [row["num_steps"] for row in rows] == [2, 3]
  row = rows[0]
  assert row["protocol"] == "fid50k" and row["num_samples"] == N and row["fid"] == r["fid"]
  assert row["features"] == "feature_net" and row["reference"] == about["path"]
  assert row["data_fingerprint"] == about["data_fingerprint"] and row["step"] == 4
  assert all(row[k] == c.sample[k] for k in SAMPLE_FIELDS)

  # The reference is read from the cache by the next eval (another workdir, same data and net).
  calls, real = [], fid50k.real_features
  monkeypatch.setattr(fid50k, "real_features", lambda *a, **k: calls.append(1) or real(*a, **k))
  again = evaluate.run(c, make("again"), progress=False)
  assert calls == [] and again["reference"]["source"] == "cache"
  assert again["results"][0]["fid"] == pytest.approx(r["fid"], rel=1e-9)


def test_interrupted_eval_resumes_to_the_same_numbers(setup, monkeypatch):
  make, refcache, _, whole = setup
  c = fid_config(refcache)
  c.eval.samplers = "ddim:2,ddim:3"
  workdir, saves, real = make("cut"), [], fid50k._save_state

  def save_then_die(directory, done, acc):
    real(directory, done, acc)
    saves.append(done)
    if len(saves) == 5:  # the second sampler, after its second of three batches
      raise KeyboardInterrupt

  monkeypatch.setattr(fid50k, "_save_state", save_then_die)
  with pytest.raises(KeyboardInterrupt):
    evaluate.run(c, workdir, progress=False)
  assert saves == [8, 16, 24, 8, 16]
  saves.clear()
  resumed = evaluate.run(c, workdir, progress=False)
  assert saves == [24]  # the first sampler's final state read back, the second's last batch drawn
  strip = lambda m: [{k: v for k, v in r.items() if k != "seconds"} for r in m["results"]]
  assert strip(resumed) == strip(whole)


def test_streamed_inception_score_equals_the_formula():
  rng = np.random.default_rng(0)
  n, splits, k = 23, 4, 7
  logits = rng.standard_normal((n, k)) * 3
  acc = fid50k.Accumulator(2, k, n, keep=5, splits=splits)
  order = rng.permutation(n)  # any order, any grouping
  for part in np.array_split(order, 3):
    acc.add(part, rng.standard_normal((len(part), 2)), logits[part])
  want = distances.inception_score(logits, splits)  # every logit at once
  assert acc.inception_score() == pytest.approx(want, rel=1e-10)
  assert sorted(acc.index.tolist()) == [0, 1, 2, 3, 4]


def test_watch_scores_each_checkpoint_once_and_stops_at_the_final_step(setup, monkeypatch):
  make, refcache, _, _ = setup
  c = fid_config(refcache)
  c.eval.update(watch=True, poll_seconds=0.05, watch_timeout=5.0)
  workdir = make("watched")
  scored, real = [], evaluate.evaluate
  monkeypatch.setattr(evaluate, "evaluate", lambda cfg, w, step, **k: scored.append(step) or {})
  assert evaluate.run(c, workdir, progress=False) == {"scored": [2, 4]}
  assert scored == [2, 4]
  monkeypatch.setattr(evaluate, "evaluate", real)
  c.eval.num_samples = 8
  os.makedirs(os.path.join(workdir, "eval", "fid50k"), exist_ok=True)
  open(evaluate.result_path(workdir, "fid50k", 2), "w").write("{}")  # step 2: already scored
  assert evaluate.run(c, workdir, progress=False) == {"scored": [4]}
  assert json.load(open(evaluate.result_path(workdir, "fid50k", 4)))["num_samples"] == 8
  # Training not finished (final step 6): the watch times out without new checkpoints.
  c.train.num_steps, c.eval.watch_timeout = 6, 0.3
  assert evaluate.run(c, workdir, progress=False) == {"scored": []}


SCRIPT = r"""
import json, sys
sys.path.insert(0, ".")
from diffusion import parallel, runtime
runtime.configure_xla()
workdir, port, pid, nproc = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if nproc > 1:
  parallel.initialize_distributed(
    mode="on", coordinator_address="127.0.0.1:" + port, num_processes=nproc, process_id=pid
  )
import numpy as np
sys.path.insert(0, "tests")
from test_eval_protocol import N, fid_config
from diffusion.model import Diffusion, SampleSettings
from diffusion import generate, parameters
from diffusion.modes import evaluate
c = fid_config(sys.argv[5])
c.eval.samplers = "ddim:2,ddim:3"
d = Diffusion.from_config(c)
_, params = parameters.load(d, workdir)
st = SampleSettings.from_config(c.sample, sampler="ddim", num_steps=2)
images = generate.generate(d, params, st, num_images=10, batch_size=8, seed=3, progress=False)
np.save(f"{workdir}/images{pid}.npy", images)
evaluate.run(c, workdir, progress=False)
"""


def run_processes(workdir: str, refcache: str, nproc: int, devices: int) -> list:
  argv = lambda i, port: [workdir, port, str(i), str(nproc), refcache]
  return processes(SCRIPT, argv, nproc, devices=devices)


def test_two_processes_of_two_devices_match_one_device(setup, tmp_path):
  """Per-image keys: 2 x 2 devices in two processes draw the same images as one device and
  produce the same statistics (reference and samples)."""
  make, refcache, _, single = setup
  two = make("two")
  procs = run_processes(two, str(tmp_path / "ref2"), 2, 2)
  outs = [p.communicate(timeout=300)[0] for p in procs]
  codes = [p.returncode for p in procs]
  assert codes == [0, 0], f"exit codes {codes}\n" + "\n---\n".join(o[-3000:] for o in outs)
  c = fid_config(refcache)
  d = Diffusion.from_config(c)
  _, params = parameters.load(d, two)
  st = SampleSettings.from_config(c.sample, sampler="ddim", num_steps=2)
  one = generate.generate(d, params, st, num_images=10, batch_size=2, seed=3, progress=False)
  assert one.std() > 5  # not a constant picture
  for path in (f"{two}/images0.npy", f"{two}/images1.npy"):
    np.testing.assert_array_equal(np.load(path), one)
  got = json.load(open(os.path.join(two, "eval", "metrics.json")))
  assert got["reference"]["source"] == "computed"
  for a, b in zip(got["results"], single["results"], strict=True):
    for k in ("fid", "kid", "inception_score", "precision", "recall"):
      assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-9), k
  (name,) = os.listdir(refcache)  # the cached reference statistics too
  with np.load(os.path.join(refcache, name)) as a, np.load(tmp_path / "ref2" / name) as b:
    # Up to float rounding relative to each array's scale (batches of another size may take
    # another vectorised path): elements near zero differ by ~1e-8 absolute.
    for k, rtol in (("mu", 1e-6), ("sigma", 1e-5), ("features", 1e-5)):
      np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=rtol * np.abs(b[k]).max(), err_msg=k)


def test_user_errors_are_one_line_before_anything_runs(tmp_path):
  c = fid_config(str(tmp_path / "ref"))
  workdir = str(tmp_path / "run")
  for field, value, message in [
    ("protocol", "fid5k", "config.eval.protocol='fid5k' is unknown; use one of: heldout, fid50k"),
    ("is_splits", 30, "is_splits=30 exceeds"),
    ("num_samples", 1, "num_samples must be >= 2"),
    ("reference", "stats.pkl", "use an .npz"),
    ("reference", str(tmp_path / "none.npz"), "does not exist"),
  ]:
    bad = fid_config(str(tmp_path / "ref"))
    bad.eval[field] = value
    with pytest.raises((ValueError, FileNotFoundError), match=message):
      evaluate.run(bad, workdir)
  c.eval.update(watch=True, checkpoint=2)
  with pytest.raises(ValueError, match="leave config.eval.checkpoint at -1"):
    evaluate.run(c, workdir)
  assert not os.path.exists(workdir)
  r = launch(workdir, "--mode", "eval", "--config.eval.protocol=fid5k")
  assert r.returncode == 2 and "Traceback" not in r.stderr
  assert r.stderr.strip().splitlines()[-1].startswith("error: config.eval.protocol='fid5k'")
