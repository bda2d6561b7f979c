"""diffusers `AutoencoderKL` weights (safetensors) -> `diffusion.nets.autoencoder` params, and the
converted-weights folder that `prepare --encode` and latent runs read.

  python -m diffusion.nets.convert autoencoder IN.safetensors OUT [--config config.json]

IN is diffusers' `diffusion_pytorch_model.safetensors` (e.g. stabilityai/sd-vae-ft-ema or -mse,
what DiT and SiT use); its `config.json` beside it (or --config) gives norm_num_groups and the
latent normalisation, the rest is read off the weights. Only safetensors are read: a .pt, .bin
or .ckpt is refused unread, nothing is ever unpickled. OUT gets `autoencoder.json` (the module's
fields and the fingerprint) and `params.safetensors` (flat "encoder/conv_in/kernel" keys),
written into a hidden folder renamed into place last.

The fingerprint is sha256 over the fields and every parameter (name, shape, bytes), 16 hex
digits: latent shards and latent runs record it, and a mismatch is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import re
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from diffusion.nets.autoencoder import AutoencoderKL

CONFIG_FILE, PARAMS_FILE = "autoencoder.json", "params.safetensors"
FIELDS = tuple(
  f.name for f in dataclasses.fields(AutoencoderKL) if f.name not in ("parent", "name")
)
_NORMS = ("norm1", "norm2", "group_norm", "conv_norm_out")
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out"}
_MODULE_RULES = (  # diffusers module path -> this module's path, applied in order
  (r"down_blocks\.(\d+)\.resnets\.(\d+)", r"down_\1_resnets_\2"),
  (r"down_blocks\.(\d+)\.downsamplers\.0\.conv", r"down_\1_downsample"),
  (r"up_blocks\.(\d+)\.resnets\.(\d+)", r"up_\1_resnets_\2"),
  (r"up_blocks\.(\d+)\.upsamplers\.0\.conv", r"up_\1_upsample"),
  (r"mid_block\.attentions\.0", "mid_block.attention"),
  (r"mid_block\.resnets\.(\d+)", r"mid_block.resnets_\1"),
  (r"to_out\.0", "to_out"),
)


def _target(key: str) -> tuple[tuple[str, ...], str]:
  """'encoder.down_blocks.0.resnets.1.conv1.weight' -> (('encoder', 'down_0_resnets_1',
  'conv1'), 'weight')."""
  module, leaf = key.rsplit(".", 1)
  for pattern, repl in _MODULE_RULES:
    module = re.sub(pattern, repl, module)
  parts = module.split(".")
  parts[-1] = _LEGACY_ATTENTION.get(parts[-1], parts[-1])
  return tuple(parts), leaf


def autoencoder_from_diffusers(state_dict: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """diffusers AutoencoderKL state dict (NumPy arrays, PyTorch layouts) -> {'params': tree} for
  `AutoencoderKL.apply`. Conv (O, I, kh, kw) -> kernel (kh, kw, I, O); Linear (O, I), or the
  legacy 1x1-conv attention projections, -> (I, O); GroupNorm weight -> scale. Raises ValueError
  on a key that has no place in the module."""
  params: dict[str, Any] = {}
  for key, value in state_dict.items():
    path, leaf = _target(key)
    if path[0] not in ("encoder", "decoder", "quant_conv", "post_quant_conv"):
      raise ValueError(f"{key}: not a diffusers AutoencoderKL weight.")
    a = np.asarray(value, dtype=np.float32)
    if leaf == "weight" and path[-1] in _NORMS:
      leaf = "scale"
    elif leaf == "weight" and path[-1] in ("to_q", "to_k", "to_v", "to_out"):
      leaf, a = "kernel", a.reshape(a.shape[0], a.shape[1]).T
    elif leaf == "weight" and a.ndim == 4:
      leaf, a = "kernel", a.transpose(2, 3, 1, 0)
    elif leaf != "bias":
      raise ValueError(f"{key}: unexpected weight of shape {a.shape}.")
    node = params
    for p in path:
      node = node.setdefault(p, {})
    node[leaf] = np.ascontiguousarray(a)
  return {"params": params}


def config_from_diffusers(
  state_dict: Mapping[str, np.ndarray], diffusers_config: Mapping[str, Any] | None = None
) -> dict[str, Any]:
  """The `AutoencoderKL` fields: shapes from the weights; norm_num_groups, scaling_factor and
  shift_factor from diffusers' config.json (defaults 32, 0.18215, 0 when absent)."""
  cfg = dict(diffusers_config or {})
  levels = sorted(
    {int(m.group(1)) for k in state_dict if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k))}
  )
  if not levels:
    raise ValueError("no encoder.down_blocks.* weights: not a diffusers AutoencoderKL state dict.")
  chans = tuple(
    int(state_dict[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0]) for i in levels
  )
  layers = len(
    {k.split(".")[4] for k in state_dict if k.startswith("encoder.down_blocks.0.resnets.")}
  )
  latent = int(state_dict["decoder.conv_in.weight"].shape[1])
  return {
    "block_out_channels": chans,
    "layers_per_block": layers,
    "latent_channels": latent,
    "norm_num_groups": int(cfg.get("norm_num_groups", 32)),
    "in_channels": int(state_dict["encoder.conv_in.weight"].shape[1]),
    "out_channels": int(state_dict["decoder.conv_out.weight"].shape[0]),
    "use_quant_conv": "quant_conv.weight" in state_dict,
    "use_post_quant_conv": "post_quant_conv.weight" in state_dict,
    "mid_block_add_attention": any(".mid_block.attentions." in k for k in state_dict),
    "scaling_factor": float(cfg.get("scaling_factor") or 0.18215),
    "shift_factor": float(cfg.get("shift_factor") or 0.0),
  }


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
  out: dict[str, np.ndarray] = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, f"{prefix}{k}/"))
    else:
      out[prefix + k] = np.asarray(v, dtype=np.float32)
  return out


def _unflatten(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for key, v in flat.items():
    *path, leaf = key.split("/")
    node = tree
    for p in path:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree


def fingerprint(fields: Mapping[str, Any], params: Mapping[str, Any]) -> str:
  """16 hex digits of sha256 over the fields (JSON) and every parameter (name, shape, bytes)."""
  h = hashlib.sha256(json.dumps({k: fields[k] for k in FIELDS}, sort_keys=True).encode())
  for name, a in sorted(_flatten(params).items()):
    h.update(f"{name}{a.shape}".encode())
    h.update(np.ascontiguousarray(a, dtype=np.float32).tobytes())
  return h.hexdigest()[:16]


def _fields(raw: Mapping[str, Any]) -> dict[str, Any]:
  out = {k: raw[k] for k in FIELDS if k in raw}
  out["block_out_channels"] = tuple(int(c) for c in raw["block_out_channels"])
  return out


def save(folder: str | Path, fields: Mapping[str, Any], params: Mapping[str, Any]) -> str:
  """Writes a converted-weights folder atomically (hidden folder, renamed last); returns the
  fingerprint. `params` is {'params': tree}."""
  from safetensors.numpy import save_file

  folder = Path(folder)
  fields = _fields(fields)
  fp = fingerprint(fields, params)
  tmp = folder.parent / f".{folder.name}.tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  save_file(_flatten(params), str(tmp / PARAMS_FILE))
  meta = {**fields, "block_out_channels": list(fields["block_out_channels"]), "fingerprint": fp}
  (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=1) + "\n")
  if folder.exists():
    shutil.rmtree(folder)
  tmp.rename(folder)
  return fp


def load(folder: str | Path) -> tuple[AutoencoderKL, dict[str, Any], str]:
  """A converted-weights folder -> (module, {'params': tree}, fingerprint). Raises ValueError
  (one line naming the fix) when it is missing, damaged or does not match its fingerprint."""
  from safetensors import SafetensorError
  from safetensors.numpy import load_file

  folder = Path(folder)
  fix = "convert it again with python -m diffusion.nets.convert autoencoder IN OUT"
  try:
    meta = json.loads((folder / CONFIG_FILE).read_text())
    fields = _fields(meta)
    params = {"params": _unflatten(load_file(str(folder / PARAMS_FILE)))["params"]}
  except (OSError, ValueError, KeyError, SafetensorError) as e:
    raise ValueError(f"{folder}: not a readable autoencoder folder ({e}); {fix}.") from None
  fp = fingerprint(fields, params)
  if fp != meta.get("fingerprint"):
    raise ValueError(f"{folder}: the weights do not match their fingerprint (damaged); {fix}.")
  return AutoencoderKL(**fields), params, fp


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
  """A .safetensors file -> NumPy arrays. Any other suffix is refused unread (ValueError)."""
  from safetensors import SafetensorError
  from safetensors.numpy import load_file

  path = Path(path)
  if path.suffix != ".safetensors":
    raise ValueError(
      f"{path}: only .safetensors weights are read (pickled {path.suffix or 'files'} are never "
      "unpickled); download diffusion_pytorch_model.safetensors instead."
    )
  try:
    return load_file(str(path))
  except (OSError, SafetensorError) as e:
    raise ValueError(f"{path}: unreadable safetensors file ({e}); download it again.") from None


def main_autoencoder(argv: list[str] | None = None) -> int:
  """CLI: IN.safetensors OUT [--config config.json]. Exit 0 done, 2 a user error (one line)."""
  ap = argparse.ArgumentParser(prog="python -m diffusion.nets.convert autoencoder")
  ap.add_argument("input", help="diffusers diffusion_pytorch_model.safetensors")
  ap.add_argument("output", help="folder to write (autoencoder.json, params.safetensors)")
  ap.add_argument("--config", help="diffusers config.json (default: beside the input)")
  args = ap.parse_args(argv)
  try:
    state = read_safetensors(args.input)
    cfg_path = Path(args.config) if args.config else Path(args.input).with_name("config.json")
    try:
      diffusers_cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else None
    except ValueError:
      raise ValueError(
        f"{cfg_path}: not JSON; pass --config with diffusers' config.json."
      ) from None
    fields = config_from_diffusers(state, diffusers_cfg)
    params = autoencoder_from_diffusers(state)
    _check_shapes(fields, params)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  fp = save(args.output, fields, params)
  print(f"wrote {args.output} (fingerprint {fp}, {fields['latent_channels']} latent channels)")
  return 0


def _check_shapes(fields: Mapping[str, Any], params: Mapping[str, Any]) -> None:
  """Raises ValueError unless `params` has exactly the tree and shapes `fields` build."""
  import jax
  import jax.numpy as jnp

  module = AutoencoderKL(**_fields(fields))
  side = 2 * module.downsample_factor
  x = jax.ShapeDtypeStruct((1, side, side, fields["in_channels"]), jnp.float32)
  want = jax.eval_shape(module.init, jax.random.key(0), x)
  got = _flatten(params)
  want_flat = {k: tuple(v.shape) for k, v in _flatten_shapes(want).items()}
  if {k: tuple(v.shape) for k, v in got.items()} != want_flat:
    missing = sorted(set(want_flat) - set(got))[:3]
    extra = sorted(set(got) - set(want_flat))[:3]
    raise ValueError(
      f"weights do not fit the inferred AutoencoderKL (missing {missing}, unexpected {extra}); "
      "pass --config with the model's config.json."
    )


def _flatten_shapes(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out: dict[str, Any] = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten_shapes(v, f"{prefix}{k}/"))
    else:
      out[prefix + k] = v
  return out


if __name__ == "__main__":
  sys.exit(main_autoencoder())
