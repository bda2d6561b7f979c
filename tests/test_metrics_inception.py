"""diffusion.metrics.inception: the architecture against the PyTorch state dict, weight loading
(.npz only: pickles are refused unread), the first layer by hand, pool3 features."""

import pickle

import numpy as np
import pytest

from diffusion.metrics import inception

RNG = np.random.default_rng(0)


def torch_inception_shapes():
  """name -> shape of the FID Inception's PyTorch state dict, written out from its architecture
  (torchvision Inception3 blocks as pytorch-fid uses them), independently of inception.py."""
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
  w["Conv2d_1a_3x3.bn.num_batches_tracked"] = np.asarray(0, np.int64)
  path = str(tmp_path_factory.mktemp("inception") / "pt_inception-2015-12-05.npz")
  np.savez(path, **w)
  return path, w


def test_inception_architecture_matches_the_pytorch_state_dict():
  assert inception.torch_names() == torch_inception_shapes()


def test_inception_missing_or_wrong_file_says_what_to_do(tmp_path, inception_file):
  for path in ("", str(tmp_path / "nope.npz")):
    with pytest.raises(FileNotFoundError, match=r"config\.eval\.inception_weights") as err:
      inception.load_weights(path)
    assert "pt_inception-2015-12-05" in str(err.value) and inception.CONVERT in str(err.value)
  with pytest.raises(ValueError, match="use an .npz"):
    inception.load_weights(str(tmp_path / "weights.h5"))
  _, w = inception_file
  broken = {k: v for k, v in w.items() if k != "Mixed_6c.branch7x7_2.conv.weight"}
  broken["Conv2d_1a_3x3.bn.bias"] = np.zeros(31, np.float32)
  np.savez(tmp_path / "broken.npz", **broken)
  with pytest.raises(ValueError, match="missing Mixed_6c.branch7x7_2.conv.weight") as err:
    inception.load_weights(str(tmp_path / "broken.npz"))
  assert "Conv2d_1a_3x3.bn.bias: file (31,), expected (32,)" in str(err.value)


class _Marker:
  """Unpickling this creates the file `path` (as a hostile pickle could run any code)."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return (open, (self.path, "w"))


def test_inception_pickles_are_refused_unread(tmp_path):
  marker = tmp_path / "unpickled"
  payload = pickle.dumps({"Conv2d_1a_3x3.conv.weight": _Marker(str(marker))})
  pickle.loads(payload)  # the payload works: loading it creates the marker
  assert marker.exists()
  marker.unlink()
  for name in ("pt_inception.pkl", "w.pickle", "w.pt", "pt_inception-2015-12-05-6726825d.pth"):
    (tmp_path / name).write_bytes(payload)
    with pytest.raises(ValueError, match="is a pickle, which is never loaded") as err:
      inception.load_weights(str(tmp_path / name))
    assert inception.CONVERT in str(err.value) and "np.savez(" in str(err.value)
  # Pickled content behind an .npz name: a pickle file, and an .npz holding an object array.
  (tmp_path / "disguised.npz").write_bytes(payload)
  np.savez(tmp_path / "objects.npz", w=np.array([_Marker(str(marker))], dtype=object))
  for name in ("disguised.npz", "objects.npz"):
    with pytest.raises(ValueError, match="not an .npz of plain arrays") as err:
      inception.load_weights(str(tmp_path / name))
    assert inception.CONVERT in str(err.value)
  assert not marker.exists()
  # The conversion the message gives is the one the module documents.
  assert inception.CONVERT in inception.__doc__ and inception.CONVERT in inception.HELP


def test_inception_loads_weights_and_gives_pool3_features(inception_file):
  path, w = inception_file
  variables = inception.load_weights(path)
  # The first layer by hand: cross-correlation (3x3, stride 2, valid), BatchNorm, ReLU.
  stem = {c: variables[c]["Conv2d_1a_3x3"] for c in variables}  # params and batch_stats
  x = RNG.uniform(-1, 1, (1, 9, 9, 3)).astype(np.float32)
  got = inception._Conv(32, (3, 3), 2).apply(stem, x)
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
  fn = inception.feature_fn(variables)
  a = RNG.integers(0, 256, (2, 16, 16, 3)).astype(np.uint8)
  b = np.stack([a[0], 255 - a[1]])  # features per image: the first one's stay the same
  fa, fb = np.asarray(fn(a)), np.asarray(fn(b))
  assert fa.shape == (2, 2048) and np.isfinite(fa).all() and fa.std() > 0
  np.testing.assert_allclose(fa[0], fb[0], rtol=1e-4, atol=1e-5)
  assert np.abs(fa[1] - fb[1]).max() > 1e-3


def test_inception_preprocess_resizes_and_repeats_grayscale():
  a = RNG.integers(0, 256, (2, 16, 16, 3)).astype(np.uint8)
  x = np.asarray(inception.preprocess(a))
  assert x.shape == (2, 299, 299, 3) and x.dtype == np.float32
  assert -1 <= x.min() and x.max() <= 1
  # Grayscale input is repeated to RGB before the network: the same input, the same features.
  np.testing.assert_array_equal(
    np.asarray(inception.preprocess(a[..., :1])),
    np.asarray(inception.preprocess(np.repeat(a[..., :1], 3, -1))),
  )
  # At the network's size the pixels are only rescaled: 0 -> -1, 255 -> 1.
  full = np.zeros((1, 299, 299, 3), np.uint8)
  full[0, 0, 0] = 255
  y = np.asarray(inception.preprocess(full))
  assert y[0, 0, 0, 0] == 1.0 and y[0, 1, 1, 0] == -1.0
