"""What a sweep is: its runs (folder, overrides, steps), their launch.py command lines and the
manifest (sweep.json) that cluster jobs read.

Configs come through configs.common: `sweep_overrides` gives a file's get_sweep() override dicts,
`load(spec, overrides)` the config each run trains with (checked before anything starts).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shlex
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from configs.common import REPO, canonical, config_name, flatten, load, sweep_overrides
from diffusion import storage

MANIFEST = "sweep.json"
MODES = ("train", "eval")


# ---- naming ---------------------------------------------------------------------------------


def _value_text(v: Any) -> str:
  if isinstance(v, bool):
    text = "true" if v else "false"
  elif isinstance(v, Mapping):
    text = "empty"
  elif isinstance(v, list | tuple):
    text = "-".join(_value_text(x) for x in v) or "empty"
  elif v is None:
    text = "none"
  else:
    text = str(v)
  return re.sub(r"[^A-Za-z0-9._+\-]", "_", text)


def slug(overrides: Mapping[str, Any], max_len: int = 120) -> str:
  """Short readable folder name: `leaf=value` pairs sorted by dotted key, joined by commas, e.g.
  "prediction=v,schedule=cosine". A leaf shared by two keys is written in full; a name over
  `max_len` characters is cut and ends in 8 hex of the overrides' hash. {} -> "base"."""
  flat = flatten(overrides)
  if not flat:
    return "base"
  leaves = {k: k.rsplit(".", 1)[-1] for k in flat}
  repeated = Counter(leaves.values())
  text = ",".join(
    f"{leaves[k] if repeated[leaves[k]] == 1 else k}={_value_text(flat[k])}" for k in sorted(flat)
  )
  if len(text) > max_len:
    digest = hashlib.sha256(canonical(overrides).encode()).hexdigest()[:8]
    text = f"{text[: max_len - 9]}-{digest}"
  return text


def sweep_name(config: str, overrides: Mapping[str, Any] | None = None) -> str:
  """The sweep's folder under the root; overrides given to every run (--set) are part of it."""
  name = config_name(config)
  return f"{name}+{slug(overrides)}" if overrides else name


def render_value(v: Any) -> str:
  """A value as launch.py's --config.key=VALUE text (ml_collections' parsers read it back)."""
  if isinstance(v, bool):
    return "true" if v else "false"
  if isinstance(v, str):
    return v
  return repr(tuple(v)) if isinstance(v, list | tuple) else repr(v)


# ---- the sweep --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Run:
  """One run of a sweep: its position, folder and overrides (the resolved step count too)."""

  index: int
  name: str
  workdir: str  # as launch.py gets it; relative paths start at the repository root
  overrides: dict[str, Any]
  num_steps: int
  eval_samplers: str = ""  # config.eval.samplers, to tell whether eval covered them all


@dataclasses.dataclass
class Sweep:
  config: str  # "path.py[:arg]", relative to the repository root or absolute
  root: str  # the sweep's folder: <--root>/<name>
  name: str
  common: dict[str, Any]  # --set overrides, applied to every run before its own
  eval: bool
  runs: list[Run]

  @property
  def manifest_path(self) -> str:
    return os.path.join(self.root, MANIFEST)

  def overrides(self, run: Run) -> dict[str, Any]:
    """Everything `run` overrides: the --set overrides, then its own."""
    return {**self.common, **run.overrides}

  def to_json(self) -> dict:
    return {
      "config": self.config,
      "name": self.name,
      "root": self.root,
      "common": self.common,
      "eval": self.eval,
      "num_runs": len(self.runs),
      "runs": [dataclasses.asdict(r) for r in self.runs],
    }

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> Sweep:
    return cls(
      config=d["config"],
      root=d["root"],
      name=d["name"],
      common=dict(d["common"]),
      eval=bool(d["eval"]),
      runs=[Run(**r) for r in d["runs"]],
    )


def expand(
  config: str, root: str = "runs", *, common: Mapping[str, Any] | None = None, eval: bool = False
) -> Sweep:
  """The runs of `config`'s get_sweep() under root/name, each checked by loading its config
  (a misspelt key or a value of the wrong type raises, naming the key)."""
  shared = dict(common or {})
  name = sweep_name(config, shared)
  remote = storage.is_remote(root)  # gs://: normpath would make it gs:/
  sweep_root = (
    f"{root.rstrip('/')}/{name}" if remote else os.path.normpath(os.path.join(root, name))
  )
  runs, seen = [], {}
  for i, overrides in enumerate(sweep_overrides(config)):
    cfg = load(config, {**shared, **overrides})
    run_slug = slug(overrides)
    if run_slug in seen:
      what = (
        "is listed twice"
        if canonical(overrides) == canonical(seen[run_slug])
        else f"and {seen[run_slug]} share the folder name {run_slug!r}"
      )
      raise ValueError(f"sweep run {overrides} {what}; make each run's overrides distinct.")
    seen[run_slug] = overrides
    samplers = cfg.eval.samplers if "eval" in cfg and "samplers" in cfg.eval else ""
    runs.append(
      Run(
        index=i,
        name=run_slug,
        workdir=os.path.join(sweep_root, run_slug),
        overrides=overrides,
        num_steps=int(cfg.train.num_steps),
        eval_samplers=samplers,
      )
    )
  return Sweep(config=config, root=sweep_root, name=name, common=shared, eval=eval, runs=runs)


def local_path(path: str) -> str:
  """A manifest path on this machine (relative paths start at the repository root; a gs:// URL
  is kept)."""
  return path if os.path.isabs(path) or storage.is_remote(path) else os.path.join(REPO, path)


def write_manifest(sweep: Sweep) -> str:
  """Writes <root>/<name>/sweep.json atomically; returns its local path."""
  path = local_path(sweep.manifest_path)
  storage.makedirs(os.path.dirname(path))
  storage.write_text(path, json.dumps(sweep.to_json(), indent=2) + "\n")
  return path


def read_manifest(path: str) -> Sweep:
  """The sweep of a sweep.json; ValueError naming the file when it is not one."""
  where = path if os.path.isabs(path) or storage.exists(path) else local_path(path)
  if not storage.exists(where):
    raise FileNotFoundError(
      f"--manifest {path}: no such file (a sweep's <root>/<name>/sweep.json)."
    )
  try:
    return Sweep.from_json(json.loads(storage.read_text(where)))
  except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
    raise ValueError(
      f"--manifest {path} is not a sweep manifest ({type(e).__name__}: {e}); give the "
      "sweep.json that the sweep wrote."
    ) from None


def select(runs: Sequence[Run], spec: str | None) -> list[Run]:
  """Runs picked by "3", "0-3,7" or all of them (spec None)."""
  if spec is None:
    return list(runs)
  wanted: set[int] = set()
  for part in filter(None, spec.split(",")):
    lo, _, hi = part.partition("-")
    try:
      wanted.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
      raise ValueError(f"--index {spec!r}: give run numbers such as 3 or 0-3,7.") from None
  bad = sorted(i for i in wanted if not 0 <= i < len(runs))
  if bad:
    raise IndexError(f"run index {bad} out of range: the sweep has runs 0-{len(runs) - 1}.")
  return [r for r in runs if r.index in wanted]


# ---- command lines ----------------------------------------------------------------------------


def command(sweep: Sweep, run: Run, mode: str, python: str | None = None) -> list[str]:
  """The launch.py command line (argv) for one mode of one run, to run at the repository root."""
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
  merged = sweep.overrides(run)
  flags = [f"--config.{k}={render_value(merged[k])}" for k in sorted(merged)]
  return [
    python or sys.executable,
    "launch.py",
    "--config",
    sweep.config,
    "--workdir",
    run.workdir,
    "--mode",
    mode,
    *flags,
  ]


def cli_args(sweep: Sweep, root: str) -> list[str]:
  """`--config ... --root ... [--set ...] [--eval]`: re-expands the same sweep elsewhere."""
  args = ["--config", sweep.config, "--root", root]
  for k in sorted(sweep.common):
    args += ["--set", f"{k}={render_value(sweep.common[k])}"]
  return args + (["--eval"] if sweep.eval else [])


def shell(argv: Sequence[str]) -> str:
  return shlex.join(argv)
