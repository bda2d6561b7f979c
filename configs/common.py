"""Config loading, overrides, sweep building and the one list of fields that cannot change training.

Used by launch.py (workdir hash, config history), experiments/ (sweeps, benchmark, report) and the
tests. Imports nothing from diffusion/ or experiments/.

Run:  nothing to run; `python launch.py --config configs/X.py` loads configs through ml_collections'
flags, everything else through `load("configs/X.py[:arg]", overrides)`.
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import importlib.util
import inspect
import itertools
import json
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import ml_collections

from diffusion.rundir import flatten

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
Overrides = dict[str, Any]

# Fields that cannot change the trained parameters: sampling, eval, logging and checkpoint cadence,
# where the data files live, prefetching, steps per call (the same steps, fused differently),
# rematerialisation (the same maths, recomputed in the backward pass), how the processes find
# each other and the device mesh (the same numbers on any mesh, up to float rounding). The
# workdir hash leaves them out, a sweep does not call a change of them drift, and a relaunch may
# change them (config.json keeps the history). (The data fingerprint's own list:
# diffusion/data/fingerprint.py.)
NOT_HASHED = (
  "sample",
  "eval",
  "data.prefetch",
  "data.data_dir",
  "data.cache_dir",
  "train.log_every",
  "train.checkpoint_every",
  "train.keep_checkpoints",
  "train.keep_every",
  "train.sample_every",
  "train.posthoc_every",
  "train.steps_per_call",
  "model.remat",
  "train.distributed",
  "train.coordinator_address",
  "train.num_processes",
  "train.process_id",
  "parallel",
)
# Fields added after workdir names were first derived, at their defaults: the hash leaves a field
# out while it has this value, so the folders of earlier runs keep their names.
_ADDED = {
  "diffusion.process": "vp",
  "diffusion.sigma_data": 0.5,
  "diffusion.sigma_min": 0.002,
  "diffusion.sigma_max": 80.0,
  "diffusion.rho": 7.0,
  "diffusion.p_mean": -1.2,
  "diffusion.p_std": 1.2,
  "diffusion.t_distribution": "uniform",
  "diffusion.logit_mean": 0.0,
  "diffusion.logit_std": 1.0,
  "train.posthoc_ema": [],
  "model.arch": "unet",
  "model.init_from": "",
  "model.preset": "",
  "model.patch_size": 2,
  "model.hidden_size": 384,
  "model.depth": 12,
  "model.mlp_ratio": 4.0,
  "model.qk_norm": False,
  "model.norm": "layernorm",
  "model.mlp": "gelu",
  "model.pos_embed": "sincos",
  "model.time_freq_shift": 0.0,
  "model.second_time": False,
  "diffusion.objective": "denoising",
  "diffusion.meanflow_ratio": 0.25,
  "diffusion.meanflow_norm_p": 1.0,
  "diffusion.meanflow_norm_c": 1e-3,
  "diffusion.meanflow_guidance": 1.0,
  "diffusion.meanflow_time_scale": 1.0,
  "distill.teacher": "",
  "distill.num_scales": 18,
  "distill.solver": "heun",
  "distill.target_ema": 0.95,
}
# Groups whose fields a config file may add: schedules.make kwargs; the autoencoder of a latent run
# (path) or of an autoencoder run (configs/autoencoder.py declares its fields); the run kind.
FREE_GROUPS = ("diffusion.schedule_params", "autoencoder", "task")


def _listed(key: str, fields: Iterable[str]) -> bool:
  return any(key == f or key.startswith(f + ".") for f in fields)


def as_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as plain JSON values (tuples as lists), as config.json stores it."""
  return json.loads(config.to_json(sort_keys=True))


def trained_fields(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
  """Dotted key -> value of every field that can change the trained parameters."""
  d = as_dict(config) if isinstance(config, ml_collections.ConfigDict) else dict(config)
  return {k: v for k, v in flatten(d).items() if not _listed(k, NOT_HASHED)}


def training_changes(
  old: Mapping[str, Any], new: Mapping[str, Any], ignore: Sequence[str] = ()
) -> list[str]:
  """Dotted keys of training fields that differ between two config dicts (config.json form)."""
  a, b = trained_fields(old), trained_fields(new)
  return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and not _listed(k, ignore))


def config_hash(config: ml_collections.ConfigDict) -> str:
  """8 hex digits of the fields that can change the trained parameters."""
  d = as_dict(config)
  flat = flatten(d)
  dropped = [*NOT_HASHED, *(k for k, v in _ADDED.items() if flat.get(k) == v)]
  for dotted in dropped:
    *parents, leaf = dotted.split(".")
    section = d
    for p in parents:
      section = section.get(p, {})
    section.pop(leaf, None)
    if len(parents) == 1 and not section:  # a section added whole, emptied by the pops
      d.pop(parents[0], None)
  text = ml_collections.ConfigDict(d).to_json(sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:8]


def config_name(spec: str) -> str:
  """ "configs/ablations/schedules.py:tiny" -> "schedules-tiny"."""
  path, _, arg = spec.partition(":")
  return os.path.splitext(os.path.basename(path))[0] + (f"-{arg}" if arg else "")


def default_workdir(spec: str, config: ml_collections.ConfigDict) -> str:
  """runs/<config name>-<config_hash>: the same training config always maps to the same folder,
  whatever the sampling, eval or logging settings, so a relaunch resumes."""
  return os.path.join("runs", f"{config_name(spec)}-{config_hash(config)}")


# ---- loading ------------------------------------------------------------------------------------


class ConfigError(ValueError):
  """A config file that cannot be loaded (missing, a syntax error, its function raised); the
  message names the file and the cause (a syntax error adds the line and its caret)."""


def syntax_error_text(e: SyntaxError) -> str:
  """ "<file> line N: <msg>" and, when known, the offending line with a caret under the column."""
  head = f"syntax error in {e.filename} line {e.lineno}: {e.msg}"
  if not e.text:
    return head
  line = e.text.rstrip("\n")
  stripped = line.lstrip()
  caret = " " * max((e.offset or 1) - 1 - (len(line) - len(stripped)), 0) + "^"
  return f"{head}\n    {stripped}\n    {caret}"


def resolve_config_path(path: str) -> str:
  """`path` as given when it exists from the working directory, else from the repository root
  (configs/X.py works from any directory); raises ConfigError when neither exists."""
  if os.path.isfile(path):
    return path
  full = os.path.join(REPO, path)
  if not os.path.isabs(path) and os.path.isfile(full):
    return full
  where = "" if os.path.isabs(path) else f" (looked in {os.getcwd()} and in {REPO})"
  raise ConfigError(
    f"config file {path!r} not found{where}; give --config configs/X.py with an existing file."
  )


def _load_module(path: str):
  if REPO not in sys.path:  # config files import `configs.*`
    sys.path.insert(0, REPO)
  full = os.path.abspath(resolve_config_path(path))
  name = "_config_" + re.sub(r"\W", "_", os.path.relpath(full, REPO))
  spec = importlib.util.spec_from_file_location(name, full)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SyntaxError as e:
    raise ConfigError(syntax_error_text(e)) from e
  except Exception as e:
    raise ConfigError(f"config file {path}: {type(e).__name__}: {e}") from e
  return module


def _call_with_arg(fn, arg: str | None, path: str = "the config file"):
  """fn(arg) when `file.py:arg` gave one and fn takes it, else fn(), like config_flags. Its
  exceptions become ConfigError naming the function and `path`."""
  try:
    if arg is not None and inspect.signature(fn).parameters:
      return fn(arg)
    return fn()
  except Exception as e:
    given = "" if arg is None else repr(arg)
    raise ConfigError(f"{fn.__name__}({given}) of {path} failed: {type(e).__name__}: {e}") from e


def parse_value(text: str) -> Any:
  """Command-line text as a Python value: literals (numbers, tuples, True/true), else the text."""
  try:
    return ast.literal_eval({"true": "True", "false": "False"}.get(text, text))
  except (SyntaxError, ValueError):
    return text


def parse_overrides(items: Sequence[str]) -> Overrides:
  """["train.num_steps=50", "config.data.path=x"] -> {"train.num_steps": 50, "data.path": "x"}."""
  out: Overrides = {}
  for item in items:
    key, sep, text = item.partition("=")
    if not sep or not key:
      raise ValueError(f"an override is key=value with a dotted config path, got {item!r}.")
    out[key.removeprefix("--").removeprefix("config.")] = parse_value(text)
  return out


def apply_overrides(
  config: ml_collections.ConfigDict, overrides: Mapping[str, Any]
) -> ml_collections.ConfigDict:
  """Sets dotted keys in place (returns the config). A dict value replaces a group of fields
  whole; a string given to a non-string field is parsed. Unknown fields raise with the key named
  and the nearest field suggested; wrong types raise naming the key."""
  for key in sorted(overrides):
    value = overrides[key]
    *parents, leaf = key.split(".")
    node = config
    for i, p in enumerate([*parents, leaf]):
      if not isinstance(node, ml_collections.ConfigDict) or p not in node:
        here = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        near = difflib.get_close_matches(p, here, n=1)
        hint = f' Did you mean "{near[0]}"?' if near else f" Fields here: {', '.join(here)}."
        raise KeyError(
          f"override {key!r}: the config has no field "
          f"{'.'.join([*parents, leaf][: i + 1])!r}.{hint}"
        )
      if i < len(parents):
        node = node[p]
    try:
      old = node[leaf]
      if isinstance(old, ml_collections.ConfigDict):
        if not isinstance(value, Mapping):
          raise TypeError(f"{key} is a group of fields; give it a dict, got {value!r}")
        node[leaf] = ml_collections.ConfigDict(dict(value))
      else:
        if isinstance(value, str) and not isinstance(old, str):
          value = parse_value(value)
        node[leaf] = tuple(value) if isinstance(old, tuple) else value
    except (TypeError, ValueError) as e:
      raise TypeError(f"override {key}={value!r} does not fit the config: {e}") from None
  return config


def check_fields(config: ml_collections.ConfigDict | Mapping[str, Any]) -> None:
  """Raises ValueError naming a field that configs/default.py does not declare (a config file's
  typo would otherwise be ignored), with the nearest declared field suggested."""
  from configs import default

  known = flatten(as_dict(default.get_config()))
  d = as_dict(config) if isinstance(config, ml_collections.ConfigDict) else dict(config)
  for key in sorted(flatten(d)):
    if key in known or _listed(key, FREE_GROUPS):
      continue
    near = difflib.get_close_matches(key, list(known), n=1)
    hint = f'; did you mean "{near[0]}"?' if near else "; remove it."
    raise ValueError(f"the config sets config.{key}, which is not a config field{hint}")


def load(spec: str, overrides: Mapping[str, Any] | Sequence[str] = ()) -> ml_collections.ConfigDict:
  """get_config(arg) of `path.py[:arg]` (relative paths start at the repository root) with
  overrides (a dict of dotted keys, or "a.b=value" strings), locked against new fields."""
  path, sep, arg = spec.partition(":")
  config = _call_with_arg(_load_module(path).get_config, arg if sep else None, path)
  if not isinstance(overrides, Mapping):
    overrides = parse_overrides(overrides)
  config = apply_overrides(config, overrides)
  check_fields(config)
  config.lock()
  return config


def sweep_overrides(spec: str) -> list[Overrides]:
  """The file's get_sweep() as a list of override dicts ([{}] when it defines none)."""
  path, sep, arg = spec.partition(":")
  module = _load_module(path)
  if not hasattr(module, "get_sweep"):
    return [{}]
  got = _call_with_arg(module.get_sweep, arg if sep else None, path)
  if isinstance(got, Mapping | str | bytes) or not isinstance(got, Iterable):
    raise ConfigError(f"get_sweep() of {path} must return a list of override dicts, got {got!r}.")
  runs = []
  for i, o in enumerate(got):
    if not isinstance(o, Mapping):
      raise ConfigError(
        f"get_sweep() of {path}: run {i} is {o!r}, not a dict of dotted config paths to values."
      )
    for k in o:
      if not isinstance(k, str) or not k:
        raise ConfigError(f"sweep override keys must be dotted config paths, got {k!r} in {o}.")
    runs.append(dict(o))
  return runs


# ---- building sweeps (configs' get_sweep) -------------------------------------------------------


def canonical(overrides: Mapping[str, Any]) -> str:
  """Order-independent JSON text of an override dict (tuples as lists)."""
  return json.dumps(overrides, sort_keys=True, separators=(",", ":"), default=list)


def grid(axes: Mapping[str, Sequence[Any]]) -> list[Overrides]:
  """Cartesian product of one dict of value lists: {"a": [1, 2], "b": ["x"]} ->
  [{"a": 1, "b": "x"}, {"a": 2, "b": "x"}]. The last key varies fastest."""
  keys = list(axes)
  for k in keys:
    if isinstance(axes[k], str | bytes) or not isinstance(axes[k], Iterable):
      raise TypeError(f"sweep axis {k!r} must be a list of values, got {axes[k]!r}.")
  return [
    dict(zip(keys, values, strict=True))
    for values in itertools.product(*(list(axes[k]) for k in keys))
  ]


def product(*axes: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]]) -> list[Overrides]:
  """Cartesian product of axes, merged into override dicts (later axes vary fastest).

  An axis is a dict of value lists (a grid, see `grid`) or a list of override dicts (alternatives
  that set several keys together), e.g. `product([{"diffusion.schedule": "linear"},
  {"diffusion.schedule": "x", "diffusion.schedule_params": {...}}], {"diffusion.prediction":
  ["eps", "v"]})` gives 4 runs. Two axes setting one key is an error.
  """
  options = [grid(a) if isinstance(a, Mapping) else [dict(o) for o in a] for a in axes]
  out = []
  for combo in itertools.product(*options):
    merged: Overrides = {}
    for part in combo:
      clash = sorted(set(merged) & set(part))
      if clash:
        raise ValueError(f"sweep axes both set {clash}; each key belongs to one axis.")
      merged.update(part)
    out.append(merged)
  return out


def chain(*sweeps: Iterable[Mapping[str, Any]]) -> list[Overrides]:
  """Concatenation of sweeps, keeping the first of repeated override dicts."""
  out, seen = [], set()
  for s in sweeps:
    for o in s:
      key = canonical(o)
      if key not in seen:
        seen.add(key)
        out.append(dict(o))
  return out
