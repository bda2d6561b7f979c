"""diffusion.metrics.inception: the architecture against the PyTorch state dict, the port against
pytorch-fid's own network on shared random weights (pool3 features, logits, preprocessing), the
conversion and its SHA-256 checks, weight loading (.npz only: pickles are refused unread)."""

import hashlib
import pickle

import numpy as np
import pytest

from diffusion.data import sprites
from diffusion.metrics import inception, inception_net

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
  shapes["fc.weight"], shapes["fc.bias"] = (1008, 2048), (1008,)  # the 1008-way logits
  return shapes


def random_state_dict(seed):
  """Random FID-Inception weights in the PyTorch layout: He-scaled convolutions, BatchNorm with
  random affine parameters and running statistics, a random fc, and the counters a real state
  dict also holds."""
  import torch  # here, not at the top: collecting the suite in every worker should not load torch

  g = torch.Generator().manual_seed(seed)
  sd = {}
  for k, s in torch_inception_shapes().items():
    if k.endswith("conv.weight"):
      sd[k] = torch.randn(s, generator=g) * float(np.sqrt(2.0 / np.prod(s[1:])))
    elif k.endswith("running_var"):
      sd[k] = torch.rand(s, generator=g) * 1.5 + 0.5
      sd[k.replace("running_var", "num_batches_tracked")] = torch.tensor(0)
    elif k.endswith("bn.weight"):
      sd[k] = torch.rand(s, generator=g) + 0.5
    elif k == "fc.weight":
      sd[k] = torch.randn(s, generator=g) / np.sqrt(2048)
    else:  # BatchNorm biases and running means, the fc bias
      sd[k] = torch.randn(s, generator=g) * 0.1
  return sd


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """A random state dict saved by torch as a .pth and converted by inception.convert (any
  source hash accepted): (state dict, .pth path, .npz path)."""
  import torch

  folder = tmp_path_factory.mktemp("inception")
  sd = random_state_dict(0)
  pth, npz = str(folder / "random.pth"), str(folder / "random.npz")
  torch.save(sd, pth)
  content = inception.convert(pth, npz, check_sha256=False)
  assert content == inception.content_sha256(
    {k: v.numpy() for k, v in sd.items() if "num_" not in k}
  )
  return sd, pth, npz


def test_inception_architecture_matches_the_pytorch_state_dict():
  assert inception.torch_names() == torch_inception_shapes()


def test_inception_equals_pytorch_fid_on_shared_random_weights(converted, monkeypatch):
  """pytorch-fid's InceptionV3 (FIDInceptionA/C/E, its resize and scaling) and the port, given the
  same random weights through the .pth -> .npz conversion, on sprites (16 x 16 -> 299 x 299)."""
  import torch
  import torch.nn.functional as F
  from pytorch_fid import inception as pytorch_fid_inception

  sd, _, npz = converted
  # pytorch-fid builds its network, then loads the downloaded weights: give it ours (strictly,
  # so the state dict's names are also checked against torchvision's modules).
  monkeypatch.setattr(pytorch_fid_inception, "load_state_dict_from_url", lambda *a, **k: sd)
  fid_net = pytorch_fid_inception.InceptionV3([3]).eval()  # pool3, resizes and scales itself
  images = sprites.generate(8, seed=0)[0][::4]  # 2 sprites of different classes, 16 x 16
  x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0  # pytorch-fid's [0, 1] input
  with torch.no_grad():
    want_pool3 = fid_net(x)[0][:, :, 0, 0]
    want_logits = F.linear(want_pool3, sd["fc.weight"]).double().numpy()  # IS: no fc bias
    want_pool3 = want_pool3.double().numpy()
  pool3, logits = inception.feature_fn(inception.load_weights(npz), logits=True)(images)
  pool3, logits = np.asarray(pool3, np.float64), np.asarray(logits, np.float64)
  assert pool3.shape == (2, 2048) and logits.shape == (2, 1008)
  # Float32 agreement: within 1e-4 relative, and 1e-5 of the features' scale absolute (measured
  # on a 2-core CPU: max |difference| ~ 4e-7 of the scale). The images' features differ far more.
  for got, want in ((pool3, want_pool3), (logits, want_logits)):
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale)
    assert np.abs(want[0] - want[1]).max() > 1e-2 * scale
  # The first layer by hand through the same variables: cross-correlation (3x3, stride 2),
  # BatchNorm (eps 1e-3) and ReLU.
  variables = inception.load_weights(npz)
  stem = {c: variables[c]["Conv2d_1a_3x3"] for c in ("params", "batch_stats")}
  z = np.random.default_rng(0).uniform(-1, 1, (1, 9, 9, 3)).astype(np.float32)
  got = np.asarray(inception_net._Conv(32, (3, 3), 2).apply(stem, z))[0]
  w = {k: v.double().numpy() for k, v in sd.items() if k.startswith("Conv2d_1a_3x3")}
  patches = np.stack(
    [[z[0, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3] for j in range(4)] for i in range(4)]
  )  # (4, 4, kh, kw, in)
  conv = np.einsum("ijhwc,ochw->ijo", patches, w["Conv2d_1a_3x3.conv.weight"])
  bn = lambda s: w[f"Conv2d_1a_3x3.bn.{s}"]
  want = (conv - bn("running_mean")) / np.sqrt(bn("running_var") + 1e-3) * bn("weight")
  np.testing.assert_allclose(got, np.maximum(want + bn("bias"), 0), rtol=1e-4, atol=1e-5)


def test_inception_preprocess_is_pytorch_fids_resize_and_scaling():
  import torch
  import torch.nn.functional as F

  rng = np.random.default_rng(0)
  for side in (16, 320):  # upsampling (sprites, CIFAR) and downsampling, no antialiasing
    a = rng.integers(0, 256, (2, side, side, 3)).astype(np.uint8)
    x = torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255.0  # as pytorch-fid runs it
    want = 2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1
    got = np.asarray(inception.preprocess(a))
    assert got.shape == (2, 299, 299, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, want.permute(0, 2, 3, 1).numpy(), rtol=0, atol=1e-6)
  # Grayscale input is repeated to RGB before the network: the same input, the same features.
  np.testing.assert_array_equal(
    np.asarray(inception.preprocess(a[..., :1])),
    np.asarray(inception.preprocess(np.repeat(a[..., :1], 3, -1))),
  )


class _Marker:
  """Unpickling this creates the file `path` (as a hostile pickle could run any code)."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return (open, (self.path, "w"))


@pytest.fixture
def hostile(tmp_path):
  """(pickle bytes that create `marker` when unpickled, marker path); the payload works."""
  marker = tmp_path / "unpickled"
  payload = pickle.dumps({"Conv2d_1a_3x3.conv.weight": _Marker(str(marker))})
  pickle.loads(payload)
  assert marker.exists()
  marker.unlink()
  return payload, marker


def one_line(err):
  text = str(err.value)
  assert "\n" not in text, text
  return text


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_inception_convert_checks_the_sha256_before_reading(tmp_path, hostile, converted, capsys):
  payload, marker = hostile
  pth = tmp_path / inception.PTH
  pth.write_bytes(payload)
  digest = hashlib.sha256(payload).hexdigest()
  with pytest.raises(ValueError, match="is not pytorch-fid's") as err:
    inception.convert(str(pth), str(tmp_path / "out.npz"))
  assert (
    digest in one_line(err)
    and inception.SHA256 in str(err.value)
    and inception.URL in str(err.value)
  )
  # The command line: the same one-line error, exit status 2, nothing written.
  assert inception.main(["--convert", str(pth), str(tmp_path / "out.npz")]) == 2
  assert "is not pytorch-fid's" in capsys.readouterr().err
  # Even with the hash check off, torch's restricted loader refuses the payload.
  with pytest.raises(ValueError, match="cannot read it"):
    inception.convert(str(pth), str(tmp_path / "out.npz"), check_sha256=False)
  assert not marker.exists() and not (tmp_path / "out.npz").exists()
  # The real file's published hash is the one the file name carries the prefix of.
  assert inception.SHA256.startswith(inception.PTH.rsplit("-", 1)[1].split(".")[0])
  # A state dict that is not the FID Inception's: one line naming what is wrong.
  (tmp_path / "garbage.npz").write_bytes(bytes(range(256)))
  with pytest.raises(ValueError, match="not a valid .npz file") as err:
    inception.load_weights(str(tmp_path / "garbage.npz"))
  assert "pickle" not in one_line(err) and inception.CONVERT in str(err.value)
  sd, _, _ = converted
  broken = {k: v for k, v in sd.items() if k != "Mixed_6c.branch7x7_2.conv.weight"}
  import torch

  broken["Conv2d_1a_3x3.bn.bias"] = torch.zeros(31)
  with pytest.raises(ValueError, match="missing Mixed_6c.branch7x7_2.conv.weight") as err:
    inception.convert_torch_state_dict(broken)
  assert "Conv2d_1a_3x3.bn.bias: file (31,)" in one_line(err)


def test_inception_provenance_is_checked_on_load(tmp_path, converted, monkeypatch):
  sd, pth, npz = converted
  # Converted from another file (here: random weights): loads, is not official, refused when
  # official weights are required.
  assert not inception.is_official(npz)
  with pytest.raises(ValueError, match="was converted from another file") as err:
    inception.load_weights(npz, official_only=True)
  assert inception.CONVERT in one_line(err)
  # A hand-made .npz without provenance, likewise.
  bare = str(tmp_path / "bare.npz")
  np.savez(bare, **{k: v.numpy() for k, v in sd.items()})
  assert not inception.is_official(bare)
  with pytest.raises(ValueError, match="has no provenance"):
    inception.load_weights(bare, official_only=True)
  # When the source is the published file (faked by patching the expected hash): official.
  monkeypatch.setattr(inception, "SHA256", hashlib.sha256(open(pth, "rb").read()).hexdigest())
  official = str(tmp_path / "official.npz")
  inception.convert(pth, official)
  assert inception.is_official(official)
  assert inception.load_weights(official, official_only=True)["params"]["fc"]["kernel"].shape == (
    2048,
    1008,
  )
  # Edited or damaged weights no longer match the recorded content hash.
  with np.load(official) as z:
    arrays = {k: z[k] for k in z.files}
  arrays["Mixed_7c.branch_pool.bn.running_var"] = (
    arrays["Mixed_7c.branch_pool.bn.running_var"] * 1.01
  )
  np.savez(tmp_path / "edited.npz", **arrays)
  with pytest.raises(ValueError, match="is damaged") as err:
    inception.load_weights(str(tmp_path / "edited.npz"))
  assert inception.CONVERT in one_line(err)


def test_inception_missing_or_wrong_file_says_what_to_do(tmp_path, converted):
  for path in ("", str(tmp_path / "nope.npz")):
    with pytest.raises(FileNotFoundError, match=r"config\.eval\.inception_weights") as err:
      inception.load_weights(path)
    assert inception.PTH in one_line(err) and inception.CONVERT in str(err.value)
  with pytest.raises(ValueError, match="use an .npz"):
    inception.load_weights(str(tmp_path / "weights.h5"))
  (tmp_path / "garbage.npz").write_bytes(bytes(range(256)))
  with pytest.raises(ValueError, match="not a valid .npz file") as err:
    inception.load_weights(str(tmp_path / "garbage.npz"))
  assert "pickle" not in one_line(err) and inception.CONVERT in str(err.value)
  sd, _, _ = converted
  broken = {k: v.numpy() for k, v in sd.items() if k != "Mixed_6c.branch7x7_2.conv.weight"}
  broken["Conv2d_1a_3x3.bn.bias"] = np.zeros(31, np.float32)
  np.savez(tmp_path / "broken.npz", **broken)
  with pytest.raises(ValueError, match="missing Mixed_6c.branch7x7_2.conv.weight") as err:
    inception.load_weights(str(tmp_path / "broken.npz"))
  assert "Conv2d_1a_3x3.bn.bias: file (31,) float32, expected (32,)" in one_line(err)


def test_inception_pickles_are_refused_unread(tmp_path, hostile, monkeypatch):
  payload, marker = hostile
  for name in ("pt_inception.pkl", "w.pickle", "w.pt", inception.PTH):
    (tmp_path / name).write_bytes(payload)
    with pytest.raises(ValueError, match="a pickle, which the library never loads") as err:
      inception.load_weights(str(tmp_path / name))
    assert inception.CONVERT in one_line(err)
  # A .pth says whether it is the published file: this one is not ...
  with pytest.raises(ValueError, match="not pytorch-fid's") as err:
    inception.load_weights(str(tmp_path / inception.PTH))
  assert hashlib.sha256(payload).hexdigest() in str(err.value)
  # ... and when it is (the expected hash patched to this file's), the conversion to run.
  monkeypatch.setattr(inception, "SHA256", hashlib.sha256(payload).hexdigest())
  with pytest.raises(ValueError, match=r"SHA-256 verified.*--convert") as err:
    inception.load_weights(str(tmp_path / inception.PTH))
  # Pickled content behind an .npz name: a pickle file, and an .npz holding an object array.
  (tmp_path / "disguised.npz").write_bytes(payload)
  np.savez(tmp_path / "objects.npz", w=np.array([_Marker(str(marker))], dtype=object))
  for name in ("disguised.npz", "objects.npz"):
    with pytest.raises(ValueError, match="not an .npz of plain arrays") as err:
      inception.load_weights(str(tmp_path / name))
    assert inception.CONVERT in one_line(err)
  assert not marker.exists()
  # The conversion the message gives is the one the module documents.
  assert "python -m diffusion.metrics.inception --convert" in inception.__doc__
