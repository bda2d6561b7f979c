"""The TF FID Inception v3 in Flax: pool3 features (FID, KID, precision/recall) and the 1008-way
logits (Inception Score), comparable with published numbers.

The weights are pytorch-fid's pt_inception-2015-12-05-6726825d.pth (SHA-256 `SHA256` below),
converted ONCE, where torch is installed, into an .npz that this module reads with
allow_pickle=False (the library never unpickles anything):

  python -m diffusion.metrics.inception --convert pt_inception-2015-12-05-6726825d.pth \
    pt_inception-2015-12-05.npz

The converter checks the .pth's SHA-256 before reading a byte of it, reads it with
torch.load(weights_only=True), and writes the arrays with their provenance (the source's SHA-256
and a SHA-256 of the converted arrays), which `load_weights` checks on every load: a damaged
.npz, or one converted from another file, is a one-line error. An .npz without provenance (made by
hand, or random weights in tests) loads with a warning, or is refused with `official_only=True`.

Images are resized to 299 x 299 (bilinear, no antialiasing, as PyTorch's interpolate) and scaled
to [-1, 1]; the network is pytorch-fid's FIDInception blocks (average pools without the padding,
a max pool in Mixed_7c), BatchNorm with running statistics (eps 1e-3). The logits are pool3 times
the fc weights WITHOUT the fc bias, as the Inception Score's reference code (Salimans et al. 2016)
and torch-fidelity's "logits_unbiased" compute them.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import sys
import zipfile
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util

from diffusion.metrics import reference
from diffusion.metrics.inception_net import NUM_LOGITS as NUM_LOGITS
from diffusion.metrics.inception_net import InceptionV3

SIZE = 299  # the standard input side; feature_fn's default
PTH = "pt_inception-2015-12-05-6726825d.pth"
URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{PTH}"
SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"  # of PTH
PTH_BYTES = 95_628_359
NPZ = "pt_inception-2015-12-05.npz"
CONVERT = f"python -m diffusion.metrics.inception --convert {PTH} {NPZ}"
HELP = (
  f"Inception metrics need pytorch-fid's FID Inception weights as an .npz: download {URL} "
  f"(SHA-256 {SHA256}), convert it once where torch is installed with `{CONVERT}`, then set "
  f"config.eval.inception_weights={NPZ}."
)
_PICKLES = (".pkl", ".pickle", ".pt", ".pth")
_SOURCE_KEY, _CONTENT_KEY = "meta.source_sha256", "meta.content_sha256"  # provenance in the .npz


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
  """(Flax variable path, PyTorch state-dict name, Flax shape) of every variable of InceptionV3
  with its logits, from its abstract initialisation (nothing computed)."""
  variables = jax.eval_shape(
    lambda: InceptionV3(logits=True).init(jax.random.PRNGKey(0), jnp.zeros((1, 299, 299, 3)))
  )
  return tuple(
    (path, ".".join(path[1:-1]) + "." + _TORCH_SUFFIX[(path[0], path[-1])], leaf.shape)
    for path, leaf in traverse_util.flatten_dict(variables).items()
  )


def _torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
  if path[-1] != "kernel":
    return shape
  return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]


def _to_flax(arr: np.ndarray) -> np.ndarray:
  """A PyTorch weight in the Flax layout: convolutions OIHW -> HWIO, linear (out, in) -> (in, out);
  vectors unchanged."""
  return arr.transpose(2, 3, 1, 0) if arr.ndim == 4 else arr.T if arr.ndim == 2 else arr


def torch_names() -> dict[str, tuple[int, ...]]:
  """PyTorch state-dict name -> shape (OIHW for convolutions, (1008, 2048) for fc.weight) of every
  weight InceptionV3 needs."""
  return {name: _torch_shape(path, shape) for path, name, shape in _layout()}


def _numpy(value: Any) -> np.ndarray:
  """A torch tensor or array-like -> NumPy (no torch import here)."""
  if hasattr(value, "detach"):
    value = value.detach().cpu().numpy()
  return np.asarray(value)


def _select(raw: Mapping[str, Any], what: str) -> dict[str, np.ndarray]:
  """The float32 arrays of `raw` that InceptionV3 needs, by PyTorch name (PyTorch layouts); extra
  entries (num_batches_tracked, provenance) are dropped. ValueError listing what is missing or
  misshapen, in one line."""
  out, problems = {}, []
  for name, shape in torch_names().items():
    if name not in raw:
      problems.append(f"missing {name}")
      continue
    arr = _numpy(raw[name])
    if arr.shape != shape or not np.issubdtype(arr.dtype, np.floating):
      problems.append(f"{name}: file {arr.shape} {arr.dtype}, expected {shape} float")
      continue
    out[name] = arr.astype(np.float32)
  if problems:
    more = f"; and {len(problems) - 4} more" if len(problems) > 4 else ""
    raise ValueError(
      f"{what} is not the FID Inception state dict ({len(problems)} problems: "
      f"{'; '.join(problems[:4])}{more}). {HELP}"
    )
  return out


def content_sha256(arrays: Mapping[str, np.ndarray]) -> str:
  """SHA-256 of the weights themselves (names, shapes, float32 little-endian bytes, by name), so
  a converted file can be checked whatever its zip container looks like."""
  h = hashlib.sha256()
  for name in sorted(arrays):
    a = np.ascontiguousarray(arrays[name], "<f4")
    h.update(f"{name}{a.shape}".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def file_sha256(path: str) -> str:
  """SHA-256 of the bytes of the file at `path` (read in 1 MiB chunks)."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(1 << 20):
      h.update(chunk)
  return h.hexdigest()


def convert_torch_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """pytorch-fid's FID Inception state dict (name -> tensor or array) -> name -> float32 NumPy
  array, exactly the names of `torch_names()` in the PyTorch layouts (what the .npz holds).
  ValueError when a weight is missing or misshapen."""
  return _select(state_dict, "the state dict")


def convert(pth: str, out: str, *, check_sha256: bool = True) -> str:
  """pytorch-fid's .pth -> the .npz `load_weights` reads, with its provenance; returns the
  weights' `content_sha256`. The .pth's SHA-256 must be `SHA256` (unless not `check_sha256`: any
  file, for tests) BEFORE it is read; then torch.load(weights_only=True) reads it (torch is needed
  here only). ValueError (one line) for another file, an unreadable one or a wrong state dict."""
  if not os.path.isfile(pth):
    raise FileNotFoundError(f"{pth} does not exist. {HELP}")
  digest = file_sha256(pth)
  if check_sha256 and digest != SHA256:
    raise ValueError(
      f"{pth} is not pytorch-fid's {PTH}: its SHA-256 is {digest}, expected {SHA256} "
      f"(a partial or different download); nothing was read from it. Download {URL} again."
    )
  try:
    import torch  # noqa: PLC0415 (only the one-time conversion needs torch)
  except ImportError:
    raise ValueError(f"Converting {pth} needs torch: pip install torch (the CPU build).") from None
  try:
    state = torch.load(pth, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises several types for unreadable or unsafe content
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise ValueError(
      f"{pth}: torch.load(weights_only=True) cannot read it ({msg}). {HELP}"
    ) from None
  if not isinstance(state, Mapping):
    raise ValueError(f"{pth} holds a {type(state).__name__}, not a state dict. {HELP}")
  arrays = convert_torch_state_dict(state)
  content = content_sha256(arrays)
  meta = {_SOURCE_KEY: np.array(digest), _CONTENT_KEY: np.array(content)}
  reference.savez_atomic(out, {**arrays, **meta})
  return content


def _read_npz(path: str) -> dict[str, np.ndarray]:
  """Every array of the .npz at `path`; pickled content (object arrays, a pickle renamed .npz) is
  refused unread."""
  problem = reference.not_npz(path) if os.path.isfile(path) else None
  if problem:
    raise ValueError(
      f"config.eval.inception_weights={path!r} is not an .npz of plain arrays ({problem}). {HELP}"
    )
  try:
    with np.load(path, allow_pickle=False) as z:
      return {k: z[k] for k in z.files}
  except (ValueError, OSError, TypeError, EOFError, zipfile.BadZipFile) as e:  # TypeError: .npy
    raise ValueError(
      f"config.eval.inception_weights={path!r} is not an .npz of plain arrays "
      f"({str(e).splitlines()[0] if str(e) else type(e).__name__}). {HELP}"
    ) from None


def _refuse_pickle(path: str) -> ValueError:
  """The error for a pickle given as weights; for pytorch-fid's .pth, says whether its SHA-256 is
  the expected one (hashing reads bytes; nothing is unpickled)."""
  never = "a pickle, which the library never loads (it can run code)"
  if path.lower().endswith(".pth") and os.path.isfile(path):
    digest = file_sha256(path)
    if digest == SHA256:
      return ValueError(
        f"config.eval.inception_weights={path!r} is pytorch-fid's weights file (SHA-256 "
        f"verified) but {never}: convert it once with `python -m diffusion.metrics.inception "
        f"--convert {path} {NPZ}` and set config.eval.inception_weights={NPZ}."
      )
    return ValueError(
      f"config.eval.inception_weights={path!r} is {never}, and not pytorch-fid's {PTH} (SHA-256 "
      f"{digest}). {HELP}"
    )
  return ValueError(f"config.eval.inception_weights={path!r} is {never}. {HELP}")


def _provenance(raw: Mapping[str, np.ndarray], arrays: Mapping[str, np.ndarray], path: str) -> str:
  """ "" (the official weights, intact) or why not. ValueError when the recorded content hash does
  not match the arrays (a damaged or edited file)."""
  if _CONTENT_KEY not in raw or _SOURCE_KEY not in raw:
    return "has no provenance (it was not written by the converter)"
  recorded, actual = str(raw[_CONTENT_KEY]), content_sha256(arrays)
  if recorded != actual:
    raise ValueError(
      f"config.eval.inception_weights={path!r} is damaged: its weights hash to {actual}, not "
      f"the {recorded} recorded when it was converted. Convert it again with `{CONVERT}`."
    )
  source = str(raw[_SOURCE_KEY])
  return "" if source == SHA256 else f"was converted from another file (SHA-256 {source})"


def load_weights(path: str, *, official_only: bool = False) -> dict[str, Any]:
  """Flax variables {"params", "batch_stats"} of InceptionV3 (with its fc) from an .npz of the
  FID Inception's PyTorch state dict (see the module docstring). Extra entries are ignored.

  An .npz from `convert` is checked against its recorded provenance: damaged -> ValueError;
  converted from another file, or no provenance (hand-made, test weights) -> a warning, or
  ValueError when `official_only` (the paper protocol). Raises FileNotFoundError (no path, no
  file) or ValueError (a pickle, another format, missing or misshapen entries), each one line
  saying how to make the file."""
  if not path:
    raise FileNotFoundError(f"config.eval.inception_weights is empty. {HELP}")
  if path.lower().endswith(_PICKLES):
    raise _refuse_pickle(path)
  if not path.lower().endswith(".npz"):
    raise ValueError(f"config.eval.inception_weights={path!r}: use an .npz file. {HELP}")
  if not os.path.exists(path):
    raise FileNotFoundError(f"config.eval.inception_weights={path!r} does not exist. {HELP}")
  raw = _read_npz(path)
  arrays = _select(raw, f"config.eval.inception_weights={path!r}")
  why_not = _provenance(raw, arrays, path)
  if why_not and official_only:
    raise ValueError(
      f"config.eval.inception_weights={path!r} {why_not}, so it is not known to be the FID "
      f"Inception. {HELP}"
    )
  if why_not:
    logging.warning(
      "Inception weights %s %s: FID, IS and precision/recall from them are not comparable with "
      "published numbers.",
      path,
      why_not,
    )
  flat = {p: _to_flax(arrays[name]) for p, name, _ in _layout()}
  return traverse_util.unflatten_dict(flat)


def is_official(path: str) -> bool:
  """Whether the .npz at `path` is pytorch-fid's weights, converted by `convert` and intact
  (ValueError when damaged). For recording beside the numbers."""
  raw = _read_npz(path)
  return not _provenance(raw, _select(raw, repr(path)), path)


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
  variables: dict[str, Any], size: int | None = None, *, logits: bool = False
) -> Callable[[jax.Array], Any]:
  """jit-compiled uint8 (B, H, W, C) -> float32 (B, 2048) pool3 features, or with `logits` the
  pair (pool3 (B, 2048), unbiased logits (B, 1008)); the images resized to `size` (default
  SIZE = 299, the standard; smaller only for tests)."""
  net, variables, size = InceptionV3(logits=logits), jax.device_put(variables), size or SIZE
  # The weights are an argument: closed over, their 95 MB would be compiled into the program as
  # constants (slow to compile, a 90 MB compilation-cache entry, twice the memory).
  apply = jax.jit(lambda v, x: net.apply(v, preprocess(x, size)))
  return lambda x: apply(variables, x)


def main(argv: list[str] | None = None) -> int:
  """`python -m diffusion.metrics.inception --convert IN.pth OUT.npz`."""
  parser = argparse.ArgumentParser(
    prog="python -m diffusion.metrics.inception",
    description=f"Convert pytorch-fid's {PTH} (its SHA-256 checked first) into the .npz that "
    "config.eval.inception_weights names.",
  )
  parser.add_argument("--convert", nargs=2, metavar=("PTH", "NPZ"), required=True)
  args = parser.parse_args(argv)
  try:
    content = convert(*args.convert)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {args.convert[1]} (source SHA-256 {SHA256}, weights SHA-256 {content})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
