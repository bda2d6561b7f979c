"""Weights published for diffusers (safetensors) -> this package's Flax parameter trees.

    python -m diffusion.nets.convert dit IN.safetensors OUT.safetensors [--num_heads 16]

writes OUT (safetensors, keys "params/block_0/attn/qkv/kernel", ...; metadata: the architecture)
for `config.model.init_from=OUT`. Only safetensors are read: a pickle (.pt, .bin, .pkl, .ckpt)
can run code when loaded, so it is refused unread. Each network has its own `<net>_from_diffusers`
mapping function and CLI subcommand (CONVERTERS).

diffusers' DiTTransformer2DModel keeps a copy of the timestep and label embedders in every block
(`transformer_blocks.i.norm1.emb`); the published DiT weights hold the one embedder of the DiT
code in all of them. `dit_from_diffusers` reads block 0's and refuses a state dict whose copies
differ.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from diffusion.nets import dit
from diffusion.nets.convert_autoencoder import autoencoder_from_diffusers, main_autoencoder

__all__ = ["autoencoder_from_diffusers", "dit_from_diffusers", "load_params", "main", "save_params"]

PICKLES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")


def _linear(sd: Mapping[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
  """torch Linear (out, in) -> flax Dense kernel (in, out), bias."""
  return {"kernel": np.asarray(sd[f"{name}.weight"]).T, "bias": np.asarray(sd[f"{name}.bias"])}


def _embedder(sd: Mapping[str, np.ndarray], prefix: str) -> dict[str, Any]:
  return {f"mlp_{i}": _linear(sd, f"{prefix}.linear_{i + 1}") for i in range(2)}


def dit_from_diffusers(state_dict: Mapping[str, Any], config: dit.DiTConfig) -> dict[str, Any]:
  """Flax params {"params": ...} of `dit.DiT(config, ...)` from a diffusers DiTTransformer2DModel
  state dict (name -> array, NumPy or torch on the CPU). The DiT options diffusers lacks
  (qk_norm, rmsnorm, swiglu, rope, second_time) must be off. Raises ValueError naming a missing,
  unused or misshapen entry."""
  sd = {k: np.asarray(v, np.float32) for k, v in state_dict.items()}
  off = dict(qk_norm=False, norm="layernorm", mlp="gelu", pos_embed="sincos", second_time=False)
  bad = [k for k, v in off.items() if getattr(config, k) != v]
  if bad:
    raise ValueError(f"diffusers' DiT has no {', '.join(bad)} option; convert with the defaults.")
  used: set[str] = set()

  class Reader(dict):
    def __getitem__(self, key: str) -> np.ndarray:
      if key not in sd:
        raise ValueError(f"the state dict has no {key!r}: not a diffusers DiTTransformer2DModel.")
      used.add(key)
      return sd[key]

  r = Reader()
  emb = "transformer_blocks.{}.norm1.emb"
  p: dict[str, Any] = {"t_embedder": _embedder(r, emb.format(0) + ".timestep_embedder")}
  if config.num_classes > 0:
    p["y_embedder"] = {"embedding": r[emb.format(0) + ".class_embedder.embedding_table.weight"]}
  w = r["pos_embed.proj.weight"]  # (D, C, p, p) -> (p, p, C, D)
  p["patch_embed"] = {"kernel": w.transpose(2, 3, 1, 0), "bias": r["pos_embed.proj.bias"]}
  for i in range(config.depth):
    b = f"transformer_blocks.{i}"
    for key in [k for k in sd if k.startswith(emb.format(i) + ".")]:
      if not np.array_equal(sd[key], sd[key.replace(emb.format(i), emb.format(0), 1)]):
        raise ValueError(f"{key} differs from block 0's: the DiT shares one embedder.")
      used.add(key)
    q, k, v = (_linear(r, f"{b}.attn1.to_{n}") for n in "qkv")
    p[f"block_{i}"] = {
      "adaLN": _linear(r, f"{b}.norm1.linear"),
      "attn": {
        "qkv": {n: np.concatenate([q[n], k[n], v[n]], axis=-1) for n in ("kernel", "bias")},
        "proj": _linear(r, f"{b}.attn1.to_out.0"),
      },
      "mlp": {"fc1": _linear(r, f"{b}.ff.net.0.proj"), "fc2": _linear(r, f"{b}.ff.net.2")},
    }
  p["final_adaLN"] = _linear(r, "proj_out_1")
  p["final_proj"] = _linear(r, "proj_out_2")
  unused = sorted(set(sd) - used - {"pos_embed.pos_embed"})
  if unused:
    raise ValueError(
      f"{len(unused)} state dict entries do not fit a depth-{config.depth} DiT, e.g. "
      f"{unused[0]!r}; set the depth (and preset) to the checkpoint's."
    )
  params = {"params": p}
  _check_shapes(params, config, in_channels=w.shape[1])
  return params


def _check_shapes(params: Any, config: dit.DiTConfig, *, in_channels: int) -> None:
  import jax
  import jax.numpy as jnp

  p = config.patch_size
  out = params["params"]["final_proj"]["bias"].shape[0] // (p * p)
  net = dit.DiT(config, out_channels=out)
  x = jax.ShapeDtypeStruct((1, 4 * p, 4 * p, in_channels), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  y = jax.ShapeDtypeStruct((1,), jnp.int32) if config.num_classes else None
  want = jax.eval_shape(lambda x, t, y: net.init(jax.random.PRNGKey(0), x, t, y), x, t, y)
  flat_want, flat_got = flatten(want), flatten(params)
  for key in sorted(set(flat_want) | set(flat_got)):
    a, b = flat_want.get(key), flat_got.get(key)
    if a is None or b is None or tuple(a.shape) != tuple(b.shape):
      raise ValueError(
        f"{key}: the DiT config expects {None if a is None else tuple(a.shape)}, the state dict "
        f"gives {None if b is None else tuple(b.shape)}; match the config to the checkpoint."
      )


def infer_dit_config(state_dict: Mapping[str, Any], num_heads: int) -> dit.DiTConfig:
  """The DiTConfig of a diffusers DiT state dict (depth, width, patch, classes from the shapes;
  the head count is not in the weights)."""
  w = state_dict["pos_embed.proj.weight"]
  blocks = {k.split(".")[1] for k in state_dict if k.startswith("transformer_blocks.")}
  table = state_dict.get("transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight")
  return dit.DiTConfig(
    patch_size=int(w.shape[2]),
    hidden_size=int(w.shape[0]),
    depth=len(blocks),
    num_heads=num_heads,
    num_classes=0 if table is None else int(table.shape[0]) - 1,
  )


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Nested dicts -> {"a/b/c": leaf}."""
  out: dict[str, Any] = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flatten(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = v
  return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """{"a/b/c": leaf} -> nested dicts."""
  out: dict[str, Any] = {}
  for key, v in flat.items():
    node = out
    *path, last = key.split("/")
    for part in path:
      node = node.setdefault(part, {})
    node[last] = v
  return out


def refuse_pickle(path: str) -> None:
  """Raises ValueError for anything but a .safetensors file (a pickle is never opened)."""
  if path.lower().endswith(PICKLES) or not path.lower().endswith(".safetensors"):
    raise ValueError(
      f"{path}: only .safetensors weights are read (a pickle can run code when loaded); "
      "download the checkpoint's .safetensors file."
    )


def save_params(params: Any, path: str, metadata: Mapping[str, str] | None = None) -> None:
  """Writes a Flax parameter tree as safetensors (float32, "/"-joined keys)."""
  from safetensors.numpy import save_file

  flat = {k: np.ascontiguousarray(v, np.float32) for k, v in flatten(params).items()}
  save_file(flat, path, metadata=dict(metadata or {}))


def load_params(path: str) -> dict[str, Any]:
  """A parameter tree written by `save_params` (config.model.init_from); NumPy leaves."""
  refuse_pickle(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config.model.init_from: no file {path}; convert weights first.")
  from safetensors.numpy import load_file

  return unflatten(load_file(path))


def _convert_dit(args: argparse.Namespace) -> None:
  from safetensors.numpy import load_file

  sd = load_file(args.input)
  heads = args.num_heads
  config_json = os.path.join(os.path.dirname(os.path.abspath(args.input)), "config.json")
  if not heads and os.path.isfile(config_json):
    with open(config_json) as f:
      heads = int(json.load(f).get("num_attention_heads", 0))
  if not heads:
    raise ValueError(
      "the head count is not in the weights and there is no config.json beside them; "
      "pass --num_heads (16 for DiT-XL/2)."
    )
  cfg = infer_dit_config(sd, heads)
  params = dit_from_diffusers(sd, cfg)
  meta = {"arch": "dit", "config": json.dumps(cfg.__dict__)}
  save_params(params, args.output, meta)
  print(f"{args.output}: DiT depth {cfg.depth}, width {cfg.hidden_size}, patch {cfg.patch_size}")


CONVERTERS: dict[str, Callable[[argparse.Namespace], None]] = {"dit": _convert_dit}


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if argv[:1] == [
    "autoencoder"
  ]:  # IN.safetensors OUT_FOLDER (diffusion/nets/convert_autoencoder.py)
    return main_autoencoder(argv[1:])
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("net", choices=sorted([*CONVERTERS, "autoencoder"]))
  p.add_argument("input", help="diffusers weights, .safetensors")
  p.add_argument("output", help="Flax parameters, .safetensors (config.model.init_from)")
  p.add_argument("--num_heads", type=int, default=0, help="DiT heads (default: config.json)")
  args = p.parse_args(argv)
  try:
    refuse_pickle(args.input)
    if not args.output.endswith(".safetensors"):
      raise ValueError(f"{args.output}: name the output .safetensors.")
    if not os.path.isfile(args.input):
      raise ValueError(f"{args.input}: no such file.")
    CONVERTERS[args.net](args)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
