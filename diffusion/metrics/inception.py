"""The TF FID Inception v3 (pool3 features) in Flax, for FID and KID comparable with published ones.

The weights are pytorch-fid's pt_inception-2015-12-05 state dict, read from an .npz with
allow_pickle=False: PyTorch names ("Mixed_5b.branch1x1.conv.weight") and layouts (convolutions
OIHW). Pickles (.pkl, .pickle, .pt, .pth) are refused, since loading one can run code. Convert the
official file once, where torch is installed, after downloading
https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth:

  python -c "import torch, numpy as np; sd = torch.load('pt_inception-2015-12-05-6726825d.pth', map_location='cpu', weights_only=True); np.savez('pt_inception-2015-12-05.npz', **{k: v.numpy() for k, v in sd.items()})"

Images are resized to 299 x 299 (bilinear, no antialiasing, as PyTorch's interpolate) and scaled
to [-1, 1]; the network is pytorch-fid's FIDInception blocks (average pools without the padding,
a max pool in Mixed_7c), BatchNorm with running statistics (eps 1e-3).
"""  # noqa: E501

from __future__ import annotations

import functools
import os
import zipfile
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

SIZE = 299  # the standard input side; feature_fn's default
URL = (
  "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
  "pt_inception-2015-12-05-6726825d.pth"
)
CONVERT = (
  'python -c "import torch, numpy as np; sd = torch.load('
  "'pt_inception-2015-12-05-6726825d.pth', map_location='cpu', weights_only=True); "
  "np.savez('pt_inception-2015-12-05.npz', **{k: v.numpy() for k, v in sd.items()})\""
)
HELP = (
  "Inception FID needs the TF FID Inception v3 weights (pt_inception-2015-12-05, the file "
  "pytorch-fid uses) as an .npz of their PyTorch state dict; pickles (.pkl, .pickle, .pt, "
  f".pth) are refused because loading one can run code. Download {URL} and convert it once "
  f"where torch is installed:\n  {CONVERT}\nthen set "
  "config.eval.inception_weights=pt_inception-2015-12-05.npz."
)
_PICKLES = (".pkl", ".pickle", ".pt", ".pth")


# ---- the network --------------------------------------------------------------------------------


class _Conv(nn.Module):
  """BasicConv2d: convolution without bias, BatchNorm (eps 1e-3, running statistics), ReLU."""

  features: int
  kernel: tuple[int, int] = (1, 1)
  stride: int = 1
  pad: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    pads = [(p, p) for p in self.pad]
    x = nn.Conv(self.features, self.kernel, self.stride, pads, use_bias=False, name="conv")(x)
    return nn.relu(nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x))


def _seq(x: jax.Array, *layers: Callable[[jax.Array], jax.Array]) -> jax.Array:
  for layer in layers:
    x = layer(x)
  return x


_avg3 = lambda x: nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)
_max3 = lambda x: nn.max_pool(x, (3, 3), (2, 2))
_cat = lambda *xs: jnp.concatenate(xs, axis=-1)
_R17, _C17, _R13, _C13 = (1, 7), (7, 1), (1, 3), (3, 1)  # factorised kernels and their pads
_P17, _P71, _P13, _P31 = (0, 3), (3, 0), (0, 1), (1, 0)


class _MixedA(nn.Module):  # Mixed_5b/c/d (FIDInceptionA: average pool without the padding)
  pool: int

  @nn.compact
  def __call__(self, x):
    C = _Conv
    return _cat(
      C(64, name="branch1x1")(x),
      _seq(x, C(48, name="branch5x5_1"), C(64, (5, 5), pad=(2, 2), name="branch5x5_2")),
      _seq(
        x,
        C(64, name="branch3x3dbl_1"),
        C(96, (3, 3), pad=(1, 1), name="branch3x3dbl_2"),
        C(96, (3, 3), pad=(1, 1), name="branch3x3dbl_3"),
      ),
      C(self.pool, name="branch_pool")(_avg3(x)),
    )


class _MixedB(nn.Module):  # Mixed_6a: grid reduction 35 -> 17
  @nn.compact
  def __call__(self, x):
    C = _Conv
    return _cat(
      C(384, (3, 3), 2, name="branch3x3")(x),
      _seq(
        x,
        C(64, name="branch3x3dbl_1"),
        C(96, (3, 3), pad=(1, 1), name="branch3x3dbl_2"),
        C(96, (3, 3), 2, name="branch3x3dbl_3"),
      ),
      _max3(x),
    )


class _MixedC(nn.Module):  # Mixed_6b/c/d/e: factorised 7x7 (FIDInceptionC)
  c7: int

  @nn.compact
  def __call__(self, x):
    C, c7 = _Conv, self.c7
    return _cat(
      C(192, name="branch1x1")(x),
      _seq(
        x,
        C(c7, name="branch7x7_1"),
        C(c7, _R17, pad=_P17, name="branch7x7_2"),
        C(192, _C17, pad=_P71, name="branch7x7_3"),
      ),
      _seq(
        x,
        C(c7, name="branch7x7dbl_1"),
        C(c7, _C17, pad=_P71, name="branch7x7dbl_2"),
        C(c7, _R17, pad=_P17, name="branch7x7dbl_3"),
        C(c7, _C17, pad=_P71, name="branch7x7dbl_4"),
        C(192, _R17, pad=_P17, name="branch7x7dbl_5"),
      ),
      C(192, name="branch_pool")(_avg3(x)),
    )


class _MixedD(nn.Module):  # Mixed_7a: grid reduction 17 -> 8
  @nn.compact
  def __call__(self, x):
    C = _Conv
    return _cat(
      _seq(x, C(192, name="branch3x3_1"), C(320, (3, 3), 2, name="branch3x3_2")),
      _seq(
        x,
        C(192, name="branch7x7x3_1"),
        C(192, _R17, pad=_P17, name="branch7x7x3_2"),
        C(192, _C17, pad=_P71, name="branch7x7x3_3"),
        C(192, (3, 3), 2, name="branch7x7x3_4"),
      ),
      _max3(x),
    )


class _MixedE(nn.Module):  # Mixed_7b (average pool) / Mixed_7c (max pool): FIDInceptionE_1/2
  max_pool: bool

  @nn.compact
  def __call__(self, x):
    C = _Conv
    b3 = C(384, name="branch3x3_1")(x)
    bd = _seq(x, C(448, name="branch3x3dbl_1"), C(384, (3, 3), pad=(1, 1), name="branch3x3dbl_2"))
    pool = nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1))) if self.max_pool else _avg3(x)
    return _cat(
      C(320, name="branch1x1")(x),
      C(384, _R13, pad=_P13, name="branch3x3_2a")(b3),
      C(384, _C13, pad=_P31, name="branch3x3_2b")(b3),
      C(384, _R13, pad=_P13, name="branch3x3dbl_3a")(bd),
      C(384, _C13, pad=_P31, name="branch3x3dbl_3b")(bd),
      C(192, name="branch_pool")(pool),
    )


class InceptionV3(nn.Module):
  """The FID Inception v3 up to pool3: x (B, 299, 299, 3) in [-1, 1] -> (B, 2048).

  Module names follow the PyTorch state dict (e.g. Mixed_5b/branch1x1/conv), so weights load
  by name (`load_weights`)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    C = _Conv
    x = _seq(
      x,
      C(32, (3, 3), 2, name="Conv2d_1a_3x3"),
      C(32, (3, 3), name="Conv2d_2a_3x3"),
      C(64, (3, 3), pad=(1, 1), name="Conv2d_2b_3x3"),
      _max3,
      C(80, name="Conv2d_3b_1x1"),
      C(192, (3, 3), name="Conv2d_4a_3x3"),
      _max3,
    )
    x = _seq(
      x,
      _MixedA(32, name="Mixed_5b"),
      _MixedA(64, name="Mixed_5c"),
      _MixedA(64, name="Mixed_5d"),
      _MixedB(name="Mixed_6a"),
      _MixedC(128, name="Mixed_6b"),
      _MixedC(160, name="Mixed_6c"),
      _MixedC(160, name="Mixed_6d"),
      _MixedC(192, name="Mixed_6e"),
      _MixedD(name="Mixed_7a"),
      _MixedE(False, name="Mixed_7b"),
      _MixedE(True, name="Mixed_7c"),
    )
    return x.mean(axis=(1, 2))


# ---- weights ------------------------------------------------------------------------------------

# Flax leaf (collection, name) -> PyTorch state-dict suffix.
_TORCH_SUFFIX = {
  ("params", "kernel"): "weight",
  ("params", "scale"): "weight",
  ("params", "bias"): "bias",
  ("batch_stats", "mean"): "running_mean",
  ("batch_stats", "var"): "running_var",
}


@functools.cache
def _layout() -> tuple[tuple[tuple[str, ...], str, tuple[int, ...]], ...]:
  """(Flax variable path, PyTorch state-dict name, Flax shape) of every variable of InceptionV3,
  from its abstract initialisation (nothing computed)."""
  variables = jax.eval_shape(
    lambda: InceptionV3().init(jax.random.PRNGKey(0), jnp.zeros((1, 299, 299, 3)))
  )
  return tuple(
    (path, ".".join(path[1:-1]) + "." + _TORCH_SUFFIX[(path[0], path[-1])], leaf.shape)
    for path, leaf in traverse_util.flatten_dict(variables).items()
  )


def _torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
  return (shape[3], shape[2], shape[0], shape[1]) if path[-1] == "kernel" else shape  # HWIO->OIHW


def torch_names() -> dict[str, tuple[int, ...]]:
  """PyTorch state-dict name -> shape (OIHW for convolutions) of every weight InceptionV3 needs."""
  return {name: _torch_shape(path, shape) for path, name, shape in _layout()}


def _read_npz(path: str) -> dict[str, np.ndarray]:
  """Every array of the .npz at `path`; pickled content (object arrays, a pickle renamed .npz) is
  refused unread."""
  try:
    with np.load(path, allow_pickle=False) as z:
      return {k: z[k] for k in z.files}
  except (ValueError, OSError, TypeError, zipfile.BadZipFile) as e:  # TypeError: an .npy
    raise ValueError(
      f"config.eval.inception_weights={path!r} is not an .npz of plain arrays ({e}). {HELP}"
    ) from None


def load_weights(path: str) -> dict[str, Any]:
  """Flax variables {"params", "batch_stats"} of InceptionV3 from an .npz of the PyTorch state
  dict of the FID Inception (see the module docstring). Extra entries (fc, num_batches_tracked)
  are ignored. Raises FileNotFoundError (no path, no file) or ValueError (a pickle, another
  format, missing or misshapen entries), each saying how to make the file."""
  if not path:
    raise FileNotFoundError(f"config.eval.inception_weights is empty. {HELP}")
  if path.lower().endswith(_PICKLES):
    raise ValueError(
      f"config.eval.inception_weights={path!r} is a pickle, which is never loaded "
      f"(it can run code). {HELP}"
    )
  if not path.lower().endswith(".npz"):
    raise ValueError(f"config.eval.inception_weights={path!r}: use an .npz file. {HELP}")
  if not os.path.exists(path):
    raise FileNotFoundError(f"config.eval.inception_weights={path!r} does not exist. {HELP}")
  raw = _read_npz(path)
  flat, problems = {}, []
  for p, name, shape in _layout():
    if name not in raw:
      problems.append(f"missing {name}")
      continue
    arr = np.asarray(raw[name], np.float32)
    if p[-1] == "kernel" and arr.ndim == 4:
      arr = arr.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if arr.shape != shape:
      problems.append(f"{name}: file {raw[name].shape}, expected {_torch_shape(p, shape)}")
    flat[p] = arr
  if problems:
    more = "\n  ..." if len(problems) > 8 else ""
    raise ValueError(
      f"{path} is not the FID Inception state dict ({len(problems)} problems):\n  "
      + "\n  ".join(problems[:8])
      + more
      + "\n"
      + HELP
    )
  return traverse_util.unflatten_dict(flat)


# ---- features -----------------------------------------------------------------------------------


def preprocess(images: jax.Array, size: int = SIZE) -> jax.Array:
  """uint8 (B, H, W, C), C in {1, 3} -> float32 (B, size, size, 3) in [-1, 1]: bilinear resize
  without antialiasing (PyTorch's interpolate, align_corners=False), then 2 x / 255 - 1."""
  x = images.astype(jnp.float32) / 255.0
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  if x.shape[1:3] != (size, size):
    x = jax.image.resize(x, (x.shape[0], size, size, 3), "bilinear", antialias=False)
  return 2.0 * x - 1.0


def feature_fn(
  variables: dict[str, Any], size: int | None = None
) -> Callable[[jax.Array], jax.Array]:
  """jit-compiled uint8 (B, H, W, C) -> float32 (B, 2048) pool3 features, the images resized to
  `size` (default SIZE = 299, the standard; smaller only for tests)."""
  net, variables, size = InceptionV3(), jax.device_put(variables), size or SIZE
  return jax.jit(lambda x: net.apply(variables, preprocess(x, size)))
