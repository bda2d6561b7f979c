"""--mode eval (diffusion/modes/evaluate.py) on a fabricated checkpoint: the files and the
metrics.jsonl rows it writes, the feature-net cache, settings checked before anything is done."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from conftest import fabricate_checkpoints, tiny_config

from diffusion import data, runlog
from diffusion.evaluation import SAMPLE_FIELDS, parse_samplers
from diffusion.evaluation.heldout import feature_network
from diffusion.metrics import feature_net, inception
from diffusion.modes import evaluate


def eval_config():
  """8x8 sprites, 800 training / 200 held-out images, T = 20, a one-level U-Net (fast to
  compile), two samplers, a briefly trained feature net."""
  c = tiny_config()
  c.model.update(channel_mult=(1,), attn_resolutions=())
  c.data.update(num_sprites=1000, eval_fraction=0.2)
  c.diffusion.num_timesteps = 20
  c.eval.update(
    samplers="ddim:3,heun:2",
    num_images=40,
    reference_images=80,
    batch_size=40,
    bpd_images=24,
    bpd_batch_size=16,
    bpd_strata=4,
    feature_steps=10,
  )
  return c


def random_inception_weights(path):
  """An .npz of random FID-Inception weights by inception.torch_names() (the names and layouts
  are checked against an independent list in test_metrics_inception.py)."""
  rng = np.random.default_rng(1)
  w = {
    name: (
      rng.standard_normal(s) * np.sqrt(2.0 / np.prod(s[1:]))
      if len(s) == 4
      else rng.uniform(0.5, 1.5, s)
    ).astype(np.float32)
    for name, s in inception.torch_names().items()
  }
  np.savez(path, **w)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
  """(config, workdir, returned metrics) of one eval run on checkpoints at steps 20 and 40 and
  two training rows, with random Inception weights at 75 x 75 (299 is tested elsewhere)."""
  workdir = str(tmp_path_factory.mktemp("eval"))
  c = eval_config()
  fabricate_checkpoints(c, workdir, [20, 40])
  runlog.append_rows(workdir, [{"step": 20, "loss": 0.5}, {"step": 40, "loss": 0.4}])
  c.eval.inception_weights = os.path.join(workdir, "inception.npz")
  random_inception_weights(c.eval.inception_weights)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(inception, "SIZE", 75)  # the smallest input the network takes
    metrics = evaluate.run(c, workdir, progress=False)
  return c, workdir, metrics


def test_eval_mode_writes_the_fixed_format(evaluated):
  c, workdir, m = evaluated
  saved = json.load(open(os.path.join(workdir, "eval", "metrics.json")))
  assert saved == json.loads(json.dumps(m))
  assert set(saved) == {
    "protocol",
    "step",
    "bpd",
    "bpd_method",
    "bpd_protocol",
    "floor",
    "results",
    "num_images",
    "reference_images",
    "feature_net",
    "sample_settings",
    "runtime",
  }
  assert saved["runtime"] == {
    "devices": jax.device_count(),
    "processes": 1,
    "jax_version": jax.__version__,
    "backend": "cpu",
  }
  assert saved["protocol"] == "heldout"  # the default
  assert saved["step"] == 40 and np.isfinite(saved["bpd"]) and saved["bpd"] > 0
  assert saved["num_images"] == 40 and saved["reference_images"] == 80
  proto = saved["bpd_protocol"]
  assert proto["num_images"] == 24 and "none" in proto["dequantization"]
  assert proto["split"] == "held-out 0.2" and proto["data"].startswith("uint8")
  assert proto["parameters"] == "ema" and proto["conditioning"] == "none"
  assert saved["bpd_method"] == proto["method"] == "estimate" and proto["bpd"] == saved["bpd"]
  assert proto["bound"].startswith("unbiased estimate of the full 20-step VLB")
  assert "4 ranges (5 network evaluations per image)" in proto["bound"]
  assert 0 < proto["bpd_stderr"] < saved["bpd"]
  assert {"fd", "kid", "swd", "swd_levels", "fid", "inception_kid"} <= set(saved["floor"])
  assert saved["floor"]["num_images"] == 40
  keys = {
    "sampler",
    "num_steps",
    "nfe",
    "fd",
    "kid",
    "swd",
    "swd_levels",
    "fid",
    "inception_kid",
    "sampling_seconds",
  }
  assert [(r["sampler"], r["num_steps"], r["nfe"]) for r in saved["results"]] == [
    ("ddim", 3, 3),
    ("heun", 2, 3),
  ]
  for r in saved["results"] + [saved["floor"]]:
    assert keys - {"sampler", "num_steps", "nfe", "sampling_seconds"} <= set(r)
    assert all(np.isfinite(r[k]) for k in ("fd", "kid", "swd", "fid", "inception_kid"))
  for r in saved["results"]:
    assert set(r) == keys
    assert r["fd"] > saved["floor"]["fd"] and r["swd"] > saved["floor"]["swd"]
  assert saved["feature_net"]["steps"] == 10 and "accuracy" in saved["feature_net"]
  assert saved["sample_settings"] == {k: c.sample[k] for k in SAMPLE_FIELDS}
  assert json.load(open(os.path.join(workdir, "eval", "metrics_step40.json"))) == saved
  for name in ("samples_ddim3.png", "samples_heun2.png", "quality.png", "feature_net.npz"):
    assert os.path.exists(os.path.join(workdir, "eval", name))
  assert not [f for f in os.listdir(os.path.join(workdir, "eval")) if ".tmp" in f]


def test_eval_mode_appends_one_row_per_sampler(evaluated):
  c, workdir, _ = evaluated
  saved = json.load(open(os.path.join(workdir, "eval", "metrics.json")))
  rows = runlog.read_metrics(workdir)
  evals = runlog.eval_rows(rows)
  assert len(rows) == 4 and len(evals) == 2  # the training rows stay, without a mode
  assert [r["step"] for r in runlog.train_rows(rows)] == [20, 40]
  assert all("mode" not in r for r in rows[:2])
  for r, res in zip(evals, saved["results"], strict=True):
    assert list(r) == [
      "step",
      "mode",
      "protocol",
      "sampler",
      "num_steps",
      "nfe",
      "fd",
      "kid",
      "swd",
      "bpd",
      "bpd_method",
      "fid",
      "inception_kid",
      *SAMPLE_FIELDS,
      "num_images",
      "floor_fd",
      "floor_swd",
    ]
    assert r["step"] == 40 and r["mode"] == "eval" and r["bpd"] == saved["bpd"]
    assert r["bpd_method"] == "estimate"
    assert all(
      r[k] == res[k]
      for k in ("sampler", "num_steps", "nfe", "fd", "kid", "swd", "fid", "inception_kid")
    )
    assert r["eta"] == c.sample.eta and r["clip_x0"] == c.sample.clip_x0 and r["use_ema"]
    assert r["num_images"] == saved["floor"]["num_images"]
    assert r["floor_fd"] == saved["floor"]["fd"] and r["floor_swd"] == saved["floor"]["swd"]


def test_feature_net_is_cached_and_retrained_on_change(evaluated, tmp_path, monkeypatch):
  _, workdir, m = evaluated
  c = eval_config()
  os.makedirs(tmp_path / "eval")
  shutil.copy(os.path.join(workdir, "eval", "feature_net.npz"), tmp_path / "eval")
  calls, real_train = [], feature_net.train
  monkeypatch.setattr(
    feature_net, "train", lambda *a, **k: calls.append(k["steps"]) or real_train(*a, **k)
  )
  spec = data.DataSpec(**c.data.to_dict())
  sets = data.load(spec, split="train"), data.load(spec, split="eval")
  net = feature_network(c, str(tmp_path), *sets)
  assert calls == [] and net.meta == m["feature_net"]  # the eval run's net, loaded
  c.data.update(prefetch=0, random_flip=False)  # not the images: the same net
  feature_network(c, str(tmp_path), *sets)
  assert calls == []
  c.eval.feature_steps = 5
  net = feature_network(c, str(tmp_path), *sets)
  assert calls == [5] and net.meta["steps"] == 5 and 0 <= net.meta["accuracy"] <= 1
  again = feature_network(c, str(tmp_path), *sets)
  assert calls == [5]  # loaded, not trained
  x = sets[1].images[:8]
  np.testing.assert_allclose(net.features(x), again.features(x), rtol=1e-6)
  c.data.sprite_seed = 1  # other images: retrained
  feature_network(c, str(tmp_path), *sets)
  assert calls == [5, 5]


def test_bad_settings_fail_before_anything_is_written(tmp_path):
  c = eval_config()
  workdir = str(tmp_path / "run")
  (tmp_path / "w.pkl").write_bytes(b"not read")
  c.eval.inception_weights = str(tmp_path / "w.pkl")
  with pytest.raises(ValueError, match="pickle") as err:
    evaluate.run(c, workdir)
  assert inception.CONVERT in str(err.value)
  c.eval.inception_weights = ""
  for samplers, message in [
    ("ddim50", "sampler:steps"),
    ("dddim:5", "unknown sampler"),
    (" , ", "is empty"),
  ]:
    c.eval.samplers = samplers
    with pytest.raises(ValueError, match=message):
      evaluate.run(c, workdir)
  c.eval.samplers = "ddim:3"
  for field, value in [
    ("num_images", 1),
    ("reference_images", 0),
    ("batch_size", 0),
    ("bpd_strata", 0),
    ("feature_steps", 0),
  ]:
    bad = eval_config()
    bad.eval[field] = value
    with pytest.raises(ValueError, match=f"config.eval.{field} must be >= "):
      evaluate.run(bad, workdir)
  c.eval.bpd_method = "vlb"
  with pytest.raises(ValueError, match="bpd_method='vlb' is unknown; use one of: estimate, exact"):
    evaluate.run(c, workdir)
  c.eval.bpd_method = "exact"
  c.sample.labels = "3"  # the model is unconditional
  with pytest.raises(ValueError, match="unconditional"):
    evaluate.run(c, workdir)
  assert not os.path.exists(workdir)
  got = parse_samplers("ddim:10, dpm_solver++:20", c.sample)
  assert [(g.sampler, g.num_steps) for g in got] == [("ddim", 10), ("dpm_solver++", 20)]
  assert {g.spacing for g in got} == {c.sample.spacing}
