"""Evaluation: bits/dim, the feature net, FD/KID/SWD, the Inception path and the eval mode."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.ndimage
from test_train import tiny_config

from diffusion import data, evaluate, losses, train

RNG = np.random.default_rng(0)


def eval_config():
  """8x8 sprites, 800 training / 200 held-out images, T = 100, a one-level U-Net (fast to
  compile)."""
  c = tiny_config(num_steps=40, checkpoint_every=40, learning_rate=1e-3)
  c.model.update(channel_mult=(1,), attn_resolutions=())
  c.data.update(num_sprites=1000, eval_fraction=0.2)
  c.diffusion.num_timesteps = 100
  c.eval.update(
    samplers="ddim:3,heun:2",
    num_images=40,
    reference_images=160,
    batch_size=40,
    bpd_images=24,
    bpd_batch_size=16,
    feature_steps=150,
  )
  return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A workdir with a tiny model trained 40 steps (checkpoint at step 40, metrics.jsonl)."""
  workdir = str(tmp_path_factory.mktemp("trained"))
  train.train_and_evaluate(eval_config(), workdir)
  return workdir


@pytest.fixture(scope="module")
def sets():
  c = eval_config()
  return data.load(c.data, split="train"), data.load(c.data, split="eval")


def test_bits_per_dim_finite_and_lower_after_training(trained, sets):
  c = eval_config()
  held = sets[1]
  from diffusion import sample

  step, params = sample.load_params(c, trained)
  assert step == 40
  # The fresh U-Net is the zero function (zero-initialised output layers), as are zero weights.
  fresh = jax.tree.map(np.zeros_like, params)
  kw = dict(batch_size=16, seed=0, progress=False)  # 24 images: a padded second batch
  before = evaluate.bits_per_dim(c, fresh, held.images[:24], **kw)
  after = evaluate.bits_per_dim(c, params, held.images[:24], **kw)
  assert np.isfinite(before["bpd"]) and np.isfinite(after["bpd"])
  assert 0 < after["bpd"] < before["bpd"] - 0.5, (before, after)
  assert after["num_images"] == 24 and 0 < after["bpd_stderr"] < after["bpd"]
  assert 0 <= after["prior"] < 0.01  # the cosine schedule ends near pure noise
  again = evaluate.bits_per_dim(c, params, held.images[:24], **kw)
  assert again == after  # deterministic given the seed
  # The protocol: uint8 -> [-1, 1], then the core's T-term bound, batch b keyed fold_in(seed, b).
  model, schedule = train.make_model(c), train.make_schedule(c)
  direct = losses.bits_per_dim(lambda x, t, y: model.apply(params, x, t, y, train=False), schedule,
                               data.normalize(jnp.asarray(held.images[:8])),
                               jax.random.fold_in(jax.random.PRNGKey(0), 0))
  one = evaluate.bits_per_dim(c, params, held.images[:8], batch_size=8, seed=0, progress=False)
  assert one["bpd"] == pytest.approx(float(direct["total"].mean()), rel=1e-5)


def test_frechet_distance_matches_scipy_sqrtm():
  a = RNG.standard_normal((300, 5)) @ RNG.standard_normal((5, 5))
  b = RNG.standard_normal((200, 5)) @ RNG.standard_normal((5, 5)) + 0.5
  s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  root = scipy.linalg.sqrtm(s_a @ s_b).real
  want = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(s_a + s_b - 2 * root)
  assert evaluate.frechet_distance(a, b) == pytest.approx(want, rel=1e-6)
  assert abs(evaluate.frechet_distance(a, a)) < 1e-8
  # Fewer vectors than dimensions (as Inception's 2048 with small sets): the Gram form.
  a, b = RNG.standard_normal((30, 64)), RNG.standard_normal((45, 64)) * 1.5 + 0.2
  s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  r_a = scipy.linalg.sqrtm(s_a).real
  root = scipy.linalg.sqrtm(r_a @ s_b @ r_a).real
  want = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(s_a + s_b - 2 * root)
  assert evaluate.frechet_distance(a, b) == pytest.approx(want, rel=1e-4)
  assert evaluate.frechet_distance(b, a) == pytest.approx(want, rel=1e-4)


def test_kernel_distance_is_the_unbiased_mmd():
  a, b = RNG.standard_normal((20, 3)), RNG.standard_normal((20, 3)) + 1.0
  k = lambda x, y: (np.dot(x, y) / 3 + 1) ** 3
  n = 20
  xx = sum(k(a[i], a[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
  yy = sum(k(b[i], b[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
  xy = sum(k(a[i], b[j]) for i in range(n) for j in range(n)) / n**2
  # Subsets of all 20 rows are permutations; the estimate does not depend on the order.
  assert evaluate.kernel_distance(a, b, num_subsets=3) == pytest.approx(xx + yy - 2 * xy)
  per_subset = evaluate.kernel_distance(a, b, num_subsets=3, max_kernel=0)  # no full kernel
  assert per_subset == pytest.approx(xx + yy - 2 * xy)
  same = evaluate.kernel_distance(RNG.standard_normal((400, 3)), RNG.standard_normal((400, 3)))
  assert abs(same) < 0.05 < evaluate.kernel_distance(a, b)


def test_laplacian_pyramid_reconstructs_the_image():
  x = RNG.uniform(0, 255, (2, 16, 16, 3)).astype(np.float32)
  levels = evaluate.laplacian_pyramid(x, 3)
  assert [lv.shape[1] for lv in levels] == [16, 8, 4]
  rec = levels[-1]
  for lv in levels[-2::-1]:
    rec = evaluate._up(rec, lv.shape) + lv
  np.testing.assert_allclose(rec, x, atol=1e-3)
  # Reconstruction holds for any filter; the filter itself: Karras's 5-tap binomial, mirrored.
  k = np.outer([1, 4, 6, 4, 1], [1, 4, 6, 4, 1])[None, :, :, None] / 256.0
  want = scipy.ndimage.convolve(x, k, mode="mirror")[:, ::2, ::2]
  np.testing.assert_allclose(levels[-1], scipy.ndimage.convolve(
    want, k, mode="mirror")[:, ::2, ::2], rtol=1e-5)
  flat = evaluate.laplacian_pyramid(np.full((1, 16, 16, 3), 77.0, np.float32), 3)
  assert all(np.abs(lv).max() < 1e-4 for lv in flat[:-1])  # no band-pass content
  np.testing.assert_allclose(flat[-1], 77.0, rtol=1e-6)
  assert [evaluate.pyramid_depth(s) for s in (7, 8, 16, 28, 32, 64)] == [1, 1, 2, 2, 3, 4]


def test_quality_ranks_real_above_noise_and_blur(trained, sets):
  c = eval_config()
  train_set, held = sets
  net = evaluate.feature_network(c, trained, train_set, held)  # the eval mode test reuses it
  assert net.meta["kind"] == "classifier" and net.meta["accuracy"] > 0.5  # 8 classes
  ref = evaluate.Reference(train_set.images[:400], net.features(train_set.images[:400]))
  real = held.images[:100]
  noise = RNG.integers(0, 256, real.shape).astype(np.uint8)
  blur = evaluate._up(evaluate._down(real.astype(np.float32)), real.shape)
  blur = np.clip(np.round(blur), 0, 255).astype(np.uint8)
  q = {
    name: evaluate.quality(x, ref, net)
    for name, x in [("real", real), ("noise", noise), ("blur", blur)]
  }
  for metric in ("fd", "kid", "swd"):
    assert q["real"][metric] < q["blur"][metric], (metric, q)
    assert q["real"][metric] < q["noise"][metric], (metric, q)
  assert q["real"]["fid"] is None  # no Inception weights given


def test_feature_net_is_cached_and_retrained_on_change(tmp_path, sets, monkeypatch):
  c = eval_config()
  c.eval.feature_steps = 20
  calls = []
  real_train = evaluate.train_feature_net
  monkeypatch.setattr(
    evaluate, "train_feature_net", lambda *a, **k: calls.append(k["steps"]) or real_train(*a, **k)
  )
  first = evaluate.feature_network(c, str(tmp_path), *sets)
  path = tmp_path / "eval" / "feature_net.npz"
  assert path.exists() and calls == [20]
  second = evaluate.feature_network(c, str(tmp_path), *sets)
  assert calls == [20]  # loaded, not trained
  x = sets[1].images[:8]
  np.testing.assert_allclose(first.features(x), second.features(x), rtol=1e-6)
  c.eval.feature_steps = 21
  evaluate.feature_network(c, str(tmp_path), *sets)
  assert calls == [20, 21]
  # Unlabelled data: rotation prediction.
  unlabelled = data.Dataset(sets[0].images[:200], None, 0)
  net = evaluate.train_feature_net(unlabelled.images, None, 0, steps=5)
  assert net.meta["kind"] == "rotation" and net.meta["num_outputs"] == 4


# ---- Inception -------------------------------------------------------------------------------


def torch_inception_shapes():
  """name -> shape of the FID Inception's PyTorch state dict, written out from its architecture
  (torchvision Inception3 blocks as pytorch-fid uses them), independently of evaluate.py."""
  shapes = {}

  def conv(name, cin, cout, kh, kw=None):
    shapes[f"{name}.conv.weight"] = (cout, cin, kh, kw or kh)
    for s in ("weight", "bias", "running_mean", "running_var"):
      shapes[f"{name}.bn.{s}"] = (cout,)

  for name, cin, cout, k in [
    ("Conv2d_1a_3x3", 3, 32, 3),
    ("Conv2d_2a_3x3", 32, 32, 3),
    ("Conv2d_2b_3x3", 32, 64, 3),
    ("Conv2d_3b_1x1", 64, 80, 1),
    ("Conv2d_4a_3x3", 80, 192, 3),
  ]:
    conv(name, cin, cout, k)
  for m, cin, pool in [("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)]:
    for b, i, o, k in [
      ("1x1", cin, 64, 1),
      ("5x5_1", cin, 48, 1),
      ("5x5_2", 48, 64, 5),
      ("3x3dbl_1", cin, 64, 1),
      ("3x3dbl_2", 64, 96, 3),
      ("3x3dbl_3", 96, 96, 3),
      ("_pool", cin, pool, 1),
    ]:
      conv(f"{m}.branch{b}", i, o, k)
  for b, i, o, k in [
    ("3x3", 288, 384, 3),
    ("3x3dbl_1", 288, 64, 1),
    ("3x3dbl_2", 64, 96, 3),
    ("3x3dbl_3", 96, 96, 3),
  ]:
    conv(f"Mixed_6a.branch{b}", i, o, k)
  for m, c7 in [("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)]:
    for b, i, o, kh, kw in [
      ("1x1", 768, 192, 1, 1),
      ("7x7_1", 768, c7, 1, 1),
      ("7x7_2", c7, c7, 1, 7),
      ("7x7_3", c7, 192, 7, 1),
      ("7x7dbl_1", 768, c7, 1, 1),
      ("7x7dbl_2", c7, c7, 7, 1),
      ("7x7dbl_3", c7, c7, 1, 7),
      ("7x7dbl_4", c7, c7, 7, 1),
      ("7x7dbl_5", c7, 192, 1, 7),
      ("_pool", 768, 192, 1, 1),
    ]:
      conv(f"{m}.branch{b}", i, o, kh, kw)
  for b, i, o, kh, kw in [
    ("3x3_1", 768, 192, 1, 1),
    ("3x3_2", 192, 320, 3, 3),
    ("7x7x3_1", 768, 192, 1, 1),
    ("7x7x3_2", 192, 192, 1, 7),
    ("7x7x3_3", 192, 192, 7, 1),
    ("7x7x3_4", 192, 192, 3, 3),
  ]:
    conv(f"Mixed_7a.branch{b}", i, o, kh, kw)
  for m, cin in [("Mixed_7b", 1280), ("Mixed_7c", 2048)]:
    for b, i, o, kh, kw in [
      ("1x1", cin, 320, 1, 1),
      ("3x3_1", cin, 384, 1, 1),
      ("3x3_2a", 384, 384, 1, 3),
      ("3x3_2b", 384, 384, 3, 1),
      ("3x3dbl_1", cin, 448, 1, 1),
      ("3x3dbl_2", 448, 384, 3, 3),
      ("3x3dbl_3a", 384, 384, 1, 3),
      ("3x3dbl_3b", 384, 384, 3, 1),
      ("_pool", cin, 192, 1, 1),
    ]:
      conv(f"{m}.branch{b}", i, o, kh, kw)
  return shapes


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
  """Random FID-Inception weights in the PyTorch layout (He-scaled convolutions, BatchNorm with
  random statistics), plus the fc layer and counters a real state dict also holds."""
  rng = np.random.default_rng(1)
  w = {}
  for k, s in torch_inception_shapes().items():
    if k.endswith("conv.weight"):
      w[k] = rng.standard_normal(s) * np.sqrt(2.0 / np.prod(s[1:]))
    elif k.endswith("running_var"):
      w[k] = rng.uniform(0.5, 2.0, s)
    elif k.endswith("bn.weight"):
      w[k] = rng.uniform(0.5, 1.5, s)
    else:
      w[k] = rng.normal(0, 0.1, s)
  w = {k: v.astype(np.float32) for k, v in w.items()}
  w["fc.weight"], w["fc.bias"] = np.zeros((1008, 2048), np.float32), np.zeros(1008, np.float32)
  path = str(tmp_path_factory.mktemp("inception") / "pt_inception-2015-12-05.npz")
  np.savez(path, **w)
  return path, w


def test_inception_architecture_matches_the_pytorch_state_dict():
  assert evaluate.inception_torch_names() == torch_inception_shapes()


def test_inception_missing_or_wrong_file_says_what_to_do(tmp_path, inception_file):
  for path in ("", str(tmp_path / "nope.npz")):
    with pytest.raises(FileNotFoundError, match=r"config\.eval\.inception_weights") as err:
      evaluate.load_inception(path)
    assert "pt_inception-2015-12-05" in str(err.value)
  _, w = inception_file
  broken = {k: v for k, v in w.items() if k != "Mixed_6c.branch7x7_2.conv.weight"}
  broken["Conv2d_1a_3x3.bn.bias"] = np.zeros(31, np.float32)
  np.savez(tmp_path / "broken.npz", **broken)
  with pytest.raises(ValueError, match="missing Mixed_6c.branch7x7_2.conv.weight") as err:
    evaluate.load_inception(str(tmp_path / "broken.npz"))
  assert "Conv2d_1a_3x3.bn.bias" in str(err.value)


def test_inception_loads_weights_and_gives_pool3_features(inception_file):
  path, w = inception_file
  variables = evaluate.load_inception(path)
  # The first layer by hand: cross-correlation (3x3, stride 2, valid), BatchNorm, ReLU.
  stem = {c: variables[c]["Conv2d_1a_3x3"] for c in variables}  # params and batch_stats
  x = RNG.uniform(-1, 1, (1, 9, 9, 3)).astype(np.float32)
  got = evaluate._Conv(32, (3, 3), 2).apply(stem, x)
  k = w["Conv2d_1a_3x3.conv.weight"]  # (out, in, kh, kw)
  patches = np.stack(
    [[x[0, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3] for j in range(4)] for i in range(4)]
  )  # (4, 4, kh, kw, in)
  conv = np.einsum("ijhwc,ochw->ijo", patches, k)
  bn = lambda s: w[f"Conv2d_1a_3x3.bn.{s}"]
  want = (conv - bn("running_mean")) / np.sqrt(bn("running_var") + 1e-3) * bn("weight")
  want = np.maximum(want + bn("bias"), 0)
  np.testing.assert_allclose(np.asarray(got)[0], want, rtol=1e-4, atol=1e-4)
  # The whole network at 299 x 299: 2048 pool3 features, a distance that sees differences.
  fn = evaluate.inception_feature_fn(variables)
  a = RNG.integers(0, 256, (4, 16, 16, 3)).astype(np.uint8)
  b = np.concatenate([a[:2], 255 - a[2:]])
  fa, fb = np.asarray(fn(a)), np.asarray(fn(b))
  assert fa.shape == (4, 2048) and np.isfinite(fa).all() and fa.std() > 0
  np.testing.assert_allclose(fa[:2], fb[:2], rtol=1e-4, atol=1e-5)
  assert np.abs(fa[2:] - fb[2:]).max() > 1e-3
  gray = np.asarray(fn(a[..., :1]))  # grayscale input is repeated to RGB
  np.testing.assert_allclose(gray, np.asarray(fn(np.repeat(a[..., :1], 3, -1))), rtol=1e-5)


# ---- the eval mode -------------------------------------------------------------------------


def test_eval_mode_writes_the_fixed_format(trained, inception_file, monkeypatch):
  monkeypatch.setattr(evaluate, "INCEPTION_SIZE", 75)  # the smallest input; 299 is tested above
  c = eval_config()
  c.eval.inception_weights = inception_file[0]
  m = evaluate.run(c, trained, progress=False)
  saved = json.load(open(os.path.join(trained, "eval", "metrics.json")))
  assert saved == json.loads(json.dumps(m))
  assert {"step", "bpd", "bpd_protocol", "floor", "results"} <= set(saved)
  assert saved["step"] == 40 and np.isfinite(saved["bpd"]) and saved["bpd"] > 0
  proto = saved["bpd_protocol"]
  assert proto["num_images"] == 24 and "none" in proto["dequantization"]
  assert proto["split"].startswith("held-out") and proto["data"].startswith("uint8")
  assert {"fd", "kid", "swd"} <= set(saved["floor"])
  keys = {"sampler", "num_steps", "nfe", "fd", "kid", "swd", "fid", "inception_kid"}
  assert [(r["sampler"], r["num_steps"], r["nfe"]) for r in saved["results"]] == [
    ("ddim", 3, 3),
    ("heun", 2, 3),
  ]
  for r in saved["results"]:
    assert keys <= set(r)
    assert all(np.isfinite(r[k]) for k in ("fd", "kid", "swd", "fid", "inception_kid"))
    assert r["fd"] > saved["floor"]["fd"] and r["swd"] > saved["floor"]["swd"]
  rows = [json.loads(line) for line in open(os.path.join(trained, "metrics.jsonl"))]
  evals = [r for r in rows if r.get("mode") == "eval"]
  assert len(evals) == 2 and len(rows) > 2  # the training rows stay, without a mode
  assert all("mode" not in r for r in rows[: len(rows) - 2])
  for r, res in zip(evals, saved["results"], strict=True):
    assert {"step", "mode", "sampler", "num_steps", "nfe", "fd", "kid", "swd", "bpd"} <= set(r)
    assert r["step"] == 40 and r["bpd"] == saved["bpd"] and r["fd"] == res["fd"]
    assert r["eta"] == c.sample.eta and r["clip_x0"] == c.sample.clip_x0 and r["use_ema"]
    assert r["num_images"] == saved["floor"]["num_images"] and r["floor_fd"] == saved["floor"]["fd"]
  assert json.load(open(os.path.join(trained, "eval", "metrics_step40.json"))) == saved
  for name in ("samples_ddim3.png", "samples_heun2.png", "quality.png", "feature_net.npz"):
    assert os.path.exists(os.path.join(trained, "eval", name))
  with pytest.raises(ValueError, match="sampler:steps"):
    evaluate.parse_samplers("ddim50")
  with pytest.raises(ValueError, match="unknown sampler"):
    evaluate.parse_samplers("dddim:5")
