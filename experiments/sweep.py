"""Sweeps: a config's get_sweep() expanded into launch.py runs with deterministic workdirs.

Run locally (one after another, or N at once), print the command lines, or write cluster jobs:

  python -m experiments.sweep --config configs/ablations/schedules.py:tiny --root runs --eval
  python -m experiments.sweep --config configs/ablations/schedules.py --root runs --dry_run
  python -m experiments.sweep --config ... --root /shared/runs --eval --slurm [--dry_run]
  python -m experiments.sweep --config ... --root /mnt/runs --eval --tpu my-pod [--dry_run]

A config file may define `get_sweep()` (or `get_sweep(arg)`, with the arg of `file.py:arg`)
returning override dicts whose keys are dotted config paths, e.g.
`{"diffusion.schedule": "cosine", "diffusion.prediction": "v"}`; `product` and `chain` below
build them. Run i of the sweep trains in `<root>/<config name>[-arg]/<slug of its overrides>`
(e.g. `runs/schedules-tiny/prediction=v,schedule=cosine,weighting=simple`): the same overrides
always give the same folder, whatever their order, so a rerun skips finished runs and resumes
interrupted ones (launch.py resumes from the workdir's newest checkpoint). A relative --root is
relative to the repository root. The sweep's manifest, `<root>/<name>/sweep.json`, lists the
runs (index, workdir, overrides, steps); SLURM array tasks pick their run from it by index.

This module imports no JAX and nothing from diffusion/; configs import it only in get_sweep().
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import inspect
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MANIFEST = "sweep.json"
MODES = ("train", "eval")
_TEMPLATE_DIR = os.path.dirname(os.path.abspath(__file__))

Overrides = dict[str, Any]


# ---- building sweeps (used by configs' get_sweep) -----------------------------------------------


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


# ---- naming -----------------------------------------------------------------------------------


def canonical(overrides: Mapping[str, Any]) -> str:
  """Order-independent JSON text of an override dict (tuples as lists)."""
  return json.dumps(overrides, sort_keys=True, separators=(",", ":"), default=list)


def _flatten(overrides: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Nested dict values become dotted keys: {"a.p": {"x": 1}} -> {"a.p.x": 1}."""
  flat: dict[str, Any] = {}
  for k, v in overrides.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping) and v:
      flat.update(_flatten(v, key + "."))
    else:
      flat[key] = v
  return flat


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
  flat = _flatten(overrides)
  if not flat:
    return "base"
  leaves = {k: k.rsplit(".", 1)[-1] for k in flat}
  repeated = Counter(leaves.values())
  parts = [
    f"{leaves[k] if repeated[leaves[k]] == 1 else k}={_value_text(flat[k])}" for k in sorted(flat)
  ]
  text = ",".join(parts)
  if len(text) > max_len:
    digest = hashlib.sha256(canonical(overrides).encode()).hexdigest()[:8]
    text = f"{text[: max_len - 9]}-{digest}"
  return text


def config_name(config: str) -> str:
  """ "configs/ablations/schedules.py:tiny" -> "schedules-tiny" (as launch.py names runs)."""
  path, _, arg = config.partition(":")
  return os.path.splitext(os.path.basename(path))[0] + (f"-{arg}" if arg else "")


def sweep_name(config: str, common: Mapping[str, Any] | None = None) -> str:
  """The sweep's folder under the root; overrides given to every run (--set) are part of it."""
  name = config_name(config)
  return f"{name}+{slug(common)}" if common else name


# ---- configs ----------------------------------------------------------------------------------


def _load_module(path: str):
  if REPO not in sys.path:  # config files import `configs.*`
    sys.path.insert(0, REPO)
  full = path if os.path.isabs(path) else os.path.join(REPO, path)
  if not os.path.isfile(full):
    raise FileNotFoundError(f"config file {path!r} not found (relative paths start at {REPO}).")
  name = "_sweep_config_" + re.sub(r"\W", "_", os.path.relpath(full, REPO))
  spec = importlib.util.spec_from_file_location(name, full)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _call_with_arg(fn, arg: str | None):
  """Calls fn(arg) when `file.py:arg` gave one and fn takes it, else fn(), like config_flags."""
  if arg is not None and inspect.signature(fn).parameters:
    return fn(arg)
  return fn()


def apply_overrides(config, overrides: Mapping[str, Any]):
  """Sets dotted keys on an ml_collections config (in place; returns it). A dict value replaces a
  ConfigDict field whole. Unknown fields and wrong types raise with the key named."""
  import ml_collections

  for key in sorted(overrides):
    value = overrides[key]
    *parents, leaf = key.split(".")
    node = config
    for i, p in enumerate(parents):
      if not isinstance(node, ml_collections.ConfigDict) or p not in node:
        raise KeyError(f"override {key!r}: the config has no field {'.'.join(parents[: i + 1])!r}.")
      node = node[p]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
      known = ", ".join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) else ""
      raise KeyError(f"override {key!r}: no such config field (fields here: {known}).")
    try:
      if isinstance(node[leaf], ml_collections.ConfigDict):
        if not isinstance(value, Mapping):
          raise TypeError(f"{key} is a group of fields; give it a dict, got {value!r}")
        node[leaf] = ml_collections.ConfigDict(dict(value))
      else:
        node[leaf] = tuple(value) if isinstance(node[leaf], tuple) else value
    except (TypeError, ValueError) as e:
      raise TypeError(f"override {key}={value!r} does not fit the config: {e}") from None
  return config


def resolve_config(config: str, overrides: Mapping[str, Any]):
  """The config a run of the sweep trains with: get_config(arg) of the file plus overrides."""
  path, sep, arg = config.partition(":")
  module = _load_module(path)
  return apply_overrides(_call_with_arg(module.get_config, arg if sep else None), overrides)


def sweep_overrides(config: str) -> list[Overrides]:
  """The file's get_sweep() as a list of override dicts ([{}] when it defines none)."""
  path, sep, arg = config.partition(":")
  module = _load_module(path)
  if not hasattr(module, "get_sweep"):
    return [{}]
  runs = [dict(o) for o in _call_with_arg(module.get_sweep, arg if sep else None)]
  for o in runs:
    for k in o:
      if not isinstance(k, str) or not k:
        raise TypeError(f"sweep override keys must be dotted config paths, got {k!r} in {o}.")
  return runs


def _render_value(v: Any) -> str:
  """A value as launch.py's --config.key=VALUE text (ml_collections' parsers read it back)."""
  if isinstance(v, bool):
    return "true" if v else "false"
  if isinstance(v, str):
    return v
  if isinstance(v, list | tuple):
    return repr(tuple(v))
  return repr(v)


def _parse_set(items: Sequence[str]) -> Overrides:
  """["train.num_steps=50", "data.path=x"] -> {"train.num_steps": 50, "data.path": "x"}."""
  import ast

  out: Overrides = {}
  for item in items:
    key, sep, text = item.partition("=")
    if not sep or not key:
      raise ValueError(f"--set wants key=value (a dotted config path), got {item!r}.")
    key = key.removeprefix("config.")
    try:
      out[key] = ast.literal_eval({"true": "True", "false": "False"}.get(text, text))
    except (SyntaxError, ValueError):
      out[key] = text
  return out


# ---- the sweep -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Run:
  """One run of a sweep: its position, folder and overrides (the resolved step count too)."""

  index: int
  name: str
  workdir: str  # as launch.py gets it; relative paths start at the repository root
  overrides: Overrides
  num_steps: int
  eval_samplers: str = ""  # config.eval.samplers, to tell whether eval covered them all


@dataclasses.dataclass
class Sweep:
  config: str  # "path.py[:arg]", relative to the repository root or absolute
  root: str  # the sweep's folder: <--root>/<name>
  name: str
  common: Overrides  # --set overrides, applied to every run before its own
  eval: bool
  runs: list[Run]

  @property
  def manifest_path(self) -> str:
    return os.path.join(self.root, MANIFEST)

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
  """The runs of `config`'s get_sweep() (checked against its get_config) under root/name."""
  common = dict(common or {})
  name = sweep_name(config, common)
  sweep_root = os.path.normpath(os.path.join(root, name))
  runs, seen = [], {}
  for i, overrides in enumerate(sweep_overrides(config)):
    merged = {**common, **overrides}
    cfg = resolve_config(config, merged)
    run_slug = slug(overrides)
    if run_slug in seen:
      what = (
        "is listed twice"
        if canonical(overrides) == canonical(seen[run_slug])
        else (f"and {seen[run_slug]} share the folder name {run_slug!r}")
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
  return Sweep(config=config, root=sweep_root, name=name, common=common, eval=eval, runs=runs)


def local_path(path: str) -> str:
  """A manifest path on this machine (relative paths start at the repository root)."""
  return path if os.path.isabs(path) else os.path.join(REPO, path)


def write_manifest(sweep: Sweep) -> str:
  """Writes <root>/<name>/sweep.json atomically; returns its local path."""
  path = local_path(sweep.manifest_path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as fh:
    json.dump(sweep.to_json(), fh, indent=2, sort_keys=False)
    fh.write("\n")
  os.replace(tmp, path)
  return path


def read_manifest(path: str) -> Sweep:
  with open(path if os.path.isabs(path) or os.path.exists(path) else local_path(path)) as fh:
    return Sweep.from_json(json.load(fh))


# ---- run state --------------------------------------------------------------------------------


def last_train_step(workdir: str) -> int | None:
  """The step of metrics.jsonl's last training row (rows without "mode" or mode "train")."""
  path = os.path.join(local_path(workdir), "metrics.jsonl")
  if not os.path.exists(path):
    return None
  step = None
  with open(path) as fh:
    for line in fh:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:  # a line cut by a kill
        continue
      if row.get("mode", "train") == "train" and "step" in row and "loss" in row:
        step = int(row["step"])
  return step


def trained(run: Run) -> bool:
  """Training reached num_steps: the orbax step folder exists and the last row says so."""
  ckpt = os.path.join(local_path(run.workdir), "checkpoints", str(run.num_steps))
  return os.path.isdir(ckpt) and last_train_step(run.workdir) == run.num_steps


def _sampler_specs(text: str) -> set[tuple[str, int | None]]:
  specs = set()
  for item in filter(None, (s.strip() for s in text.split(","))):
    name, _, steps = item.partition(":")
    specs.add((name, int(steps) if steps else None))
  return specs


def evaluated(run: Run) -> bool:
  """eval/metrics.json exists for the final step and scores every requested sampler:steps."""
  path = os.path.join(local_path(run.workdir), "eval", "metrics.json")
  try:
    with open(path) as fh:
      result = json.load(fh)
  except (OSError, json.JSONDecodeError):
    return False
  if result.get("step") != run.num_steps:
    return False
  have = {(r.get("sampler"), r.get("num_steps")) for r in result.get("results", [])}
  names = {n for n, _ in have}
  return all(
    (name, steps) in have if steps is not None else name in names
    for name, steps in _sampler_specs(run.eval_samplers)
  )


def status(run: Run, eval: bool) -> str:
  """ "done", "trained" (eval still to do), "partial" (started, resumes) or "new"."""
  if trained(run):
    return "done" if not eval or evaluated(run) else "trained"
  started = os.path.isdir(os.path.join(local_path(run.workdir), "checkpoints"))
  return "partial" if started else "new"


def pending_modes(run: Run, eval: bool) -> list[str]:
  """What a rerun still has to do for this run: ["train", "eval"], ["eval"] or []."""
  modes = [] if trained(run) else ["train"]
  if eval and (modes or not evaluated(run)):
    modes.append("eval")
  return modes


def config_drift(sweep: Sweep, run: Run) -> list[str]:
  """Dotted keys whose value in the run's config.json (what it trained with) differs from the
  config the sweep gives it now, outside the sample and eval sections and train.num_steps (a
  longer run resumes); [] when it has not started. Such a run would resume or be skipped with
  settings that are no longer the sweep's."""
  path = os.path.join(local_path(run.workdir), "config.json")
  try:
    with open(path) as fh:
      saved = _flatten(json.load(fh))
  except (OSError, json.JSONDecodeError):
    return []
  cfg = resolve_config(sweep.config, {**sweep.common, **run.overrides})
  now = _flatten(json.loads(cfg.to_json(sort_keys=True)))
  ignored = lambda k: k.split(".")[0] in ("sample", "eval") or k == "train.num_steps"
  return sorted(k for k in set(saved) | set(now) if not ignored(k) and saved.get(k) != now.get(k))


def _drift_note(sweep: Sweep, run: Run) -> str:
  keys = config_drift(sweep, run)
  if not keys:
    return ""
  shown = ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
  return (
    f"; WARNING: its config.json differs from the sweep's config in {shown} (the config file "
    "changed since it trained): use another --root or --set to train afresh"
  )


def command(sweep: Sweep, run: Run, mode: str, python: str | None = None) -> list[str]:
  """The launch.py command line (argv) for one mode of one run, to run at the repository root."""
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
  merged = {**sweep.common, **run.overrides}
  flags = [f"--config.{k}={_render_value(merged[k])}" for k in sorted(merged)]
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


def shell(argv: Sequence[str]) -> str:
  return " ".join(shlex.quote(a) for a in argv)


def select(runs: Sequence[Run], spec: str | None) -> list[Run]:
  """Runs picked by "3", "0-3,7" or all of them (spec None)."""
  if spec is None:
    return list(runs)
  wanted: set[int] = set()
  for part in filter(None, spec.split(",")):
    lo, _, hi = part.partition("-")
    wanted.update(range(int(lo), int(hi or lo) + 1))
  bad = sorted(i for i in wanted if not 0 <= i < len(runs))
  if bad:
    raise IndexError(f"run index {bad} out of range: the sweep has runs 0-{len(runs) - 1}.")
  return [r for r in runs if r.index in wanted]


# ---- local execution --------------------------------------------------------------------------


class LocalRunner:
  """Runs launch.py subprocesses, `parallel` runs at a time, each run's modes in order.

  Output goes to <workdir>/sweep.log (and to the terminal when one run at a time). SIGTERM is
  passed on to the children (training saves a checkpoint and stops); Ctrl-C reaches them
  directly. No new run starts after either."""

  def __init__(
    self, sweep: Sweep, parallel: int = 1, echo: bool | None = None, only: str | None = None
  ):
    self.sweep, self.parallel, self.only = sweep, max(1, parallel), only
    self.echo = self.parallel == 1 if echo is None else echo
    self._procs: set[subprocess.Popen] = set()
    self._lock = threading.Lock()
    self.stopping = False

  def _run_mode(self, run: Run, mode: str) -> int:
    argv = command(self.sweep, run, mode)
    workdir = local_path(run.workdir)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "sweep.log"), "a") as log:
      log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {shell(argv)}\n")
      log.flush()
      with self._lock:
        if self.stopping:
          return -signal.SIGTERM
        proc = subprocess.Popen(
          argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        self._procs.add(proc)
      try:
        for line in proc.stdout:
          log.write(line)
          if self.echo:
            sys.stdout.write(line)
            sys.stdout.flush()
        return proc.wait()
      finally:
        with self._lock:
          self._procs.discard(proc)

  def _run(self, run: Run) -> tuple[Run, str]:
    """Train then (for an --eval sweep) evaluate, each only if still needed; a step whose
    predecessor did not finish (e.g. training stopped by a signal) is not started."""
    note = _drift_note(self.sweep, run)
    if note:
      print(f"[{run.index}] {run.name}{note}", flush=True)
    ran = []
    for mode in MODES:
      if self.only and mode != self.only:
        continue
      todo = pending_modes(run, self.sweep.eval or self.only == "eval")
      if mode not in todo:
        continue
      if todo[0] != mode:
        return run, f"{mode} waits for {todo[0]} to finish"
      if self.stopping:
        return run, "not started (stopping)"
      t0 = time.time()
      print(f"[{run.index}] {run.name}: {mode} ...", flush=True)
      rc = self._run_mode(run, mode)
      took = time.time() - t0
      if rc != 0:
        log = os.path.join(run.workdir, "sweep.log")
        print(
          f"[{run.index}] {run.name}: {mode} FAILED (exit {rc}) after {took:.0f} s; see {log}",
          flush=True,
        )
        return run, f"{mode} failed (exit {rc})"
      if mode == "train" and not trained(run):  # stopped by a signal: it saved and exited
        print(f"[{run.index}] {run.name}: train stopped before its last step", flush=True)
        return run, "train stopped before its last step (rerun to resume)"
      print(f"[{run.index}] {run.name}: {mode} done in {took:.0f} s", flush=True)
      ran.append(mode)
    return run, ("ran " + "+".join(ran)) if ran else "skipped (finished)"

  def terminate(self, signum: int = signal.SIGTERM) -> None:
    with self._lock:
      self.stopping = True
      for proc in self._procs:
        if proc.poll() is None:
          proc.send_signal(signum)

  def run(self, runs: Sequence[Run]) -> list[tuple[Run, str]]:
    """Runs what each run still needs; returns (run, outcome) in sweep order."""
    old = signal.signal(signal.SIGTERM, lambda s, f: self.terminate(s))
    try:
      with ThreadPoolExecutor(self.parallel) as pool:
        futures = [pool.submit(self._run, r) for r in runs]
        try:
          return [f.result() for f in futures]
        except KeyboardInterrupt:  # the children got the same SIGINT and are saving
          self.stopping = True
          for f in futures:
            f.cancel()
          raise
    finally:
      signal.signal(signal.SIGTERM, old)


# ---- cluster job scripts ----------------------------------------------------------------------


def render(template: str, values: Mapping[str, Any]) -> str:
  """Fills {{name}} placeholders and drops "#%" template notes; a placeholder without a value
  is an error."""
  template = "".join(
    line for line in template.splitlines(keepends=True) if not line.startswith("#%")
  )
  missing = sorted(set(re.findall(r"\{\{(\w+)\}\}", template)) - set(values))
  if missing:
    raise KeyError(f"template placeholders without a value: {missing}")
  return re.sub(r"\{\{(\w+)\}\}", lambda m: str(values[m.group(1)]), template)


def _template(name: str) -> str:
  with open(os.path.join(_TEMPLATE_DIR, name)) as fh:
    return fh.read()


def slurm_script(
  sweep: Sweep,
  *,
  gpus_per_node: int = 8,
  nodes: int = 1,
  time_limit: str = "24:00:00",
  cpus_per_task: int = 8,
  partition: str = "",
  max_concurrent: int = 0,
  setup: str = "",
  sbatch_args: Sequence[str] = (),
  python: str = "python",
) -> str:
  """The SLURM array job over the sweep (experiments/slurm.sh filled in): task i runs run i, one
  process per GPU via srun; training initialises jax.distributed from SLURM's environment."""
  n = len(sweep.runs)
  if n == 0:
    raise ValueError("the sweep has no runs.")
  array = f"0-{n - 1}" + (f"%{max_concurrent}" if max_concurrent else "")
  extra = [f"#SBATCH --partition={partition}"] if partition else []
  extra += [f"#SBATCH {a}" for a in sbatch_args]
  return render(
    _template("slurm.sh"),
    {
      "job_name": re.sub(r"[^A-Za-z0-9._+-]", "_", sweep.name),
      "array": array,
      "nodes": nodes,
      "gpus_per_node": gpus_per_node,
      "cpus_per_task": cpus_per_task,
      "time": time_limit,
      "log_dir": shlex.quote(os.path.join(local_path(sweep.root), "slurm")),
      "extra_sbatch": "\n".join(extra),
      "repo": shlex.quote(REPO),
      "setup": setup or ":",
      "python": shlex.quote(python),
      "manifest": shlex.quote(local_path(sweep.manifest_path)),
      "modes": " ".join(["train", "eval"] if sweep.eval else ["train"]),
      "num_runs": n,
      "config": sweep.config,
    },
  )


def _sweep_cli_args(sweep: Sweep, root: str) -> list[str]:
  """`--config ... --root ... [--set ...] [--eval]`: re-expands the same sweep elsewhere."""
  args = ["--config", sweep.config, "--root", root]
  for k in sorted(sweep.common):
    args += ["--set", f"{k}={_render_value(sweep.common[k])}"]
  return args + (["--eval"] if sweep.eval else [])


def tpu_script(
  sweep: Sweep,
  root: str,
  pods: Sequence[str],
  *,
  zone: str,
  project: str = "",
  remote_dir: str = "~/diffusion",
  setup: str = "",
  python: str = "python3",
) -> str:
  """The TPU-pod job (experiments/tpu_pod.sh filled in): every worker of a pod runs one run at a
  time (`gcloud ... ssh --worker=all`); with several pods, run i goes to pod i % len(pods) and the
  pods work in parallel. Workers re-expand the sweep from the config, so no manifest is copied."""
  if not pods:
    raise ValueError("name at least one TPU pod (--tpu NAME[,NAME...]).")
  blocks = []
  base = shlex.join(_sweep_cli_args(sweep, root))
  prefix = f"cd {remote_dir} && {setup + ' && ' if setup else ''}"
  for p, pod in enumerate(pods):
    lines = []
    for r in (r for r in sweep.runs if r.index % len(pods) == p):
      lines.append(f"  # run {r.index}: {r.name}")
      # Training runs on every worker (one jax.distributed job); eval is single-process: worker 0.
      for mode, worker in (("train", "all"), ("eval", "0")) if sweep.eval else (("train", "all"),):
        remote = f"{prefix}{python} -m experiments.sweep {base} --index {r.index} --only {mode}"
        lines.append(
          f"  run_on {shlex.quote(pod)} {worker} {r.index} {mode} {shlex.quote(remote)} || FAILED=1"
        )
    body = "\n".join(lines) if lines else "  :"
    if len(pods) > 1:  # a background subshell per pod; its exit status says whether all ran
      blocks.append(f"(\n{body}\n  exit $FAILED\n) &\nPIDS+=($!)")
    else:
      blocks.append(body.replace("\n  ", "\n").strip())
  return render(
    _template("tpu_pod.sh"),
    {
      "name": sweep.name,
      "num_runs": len(sweep.runs),
      "pods": " ".join(pods),
      "zone": zone,
      "project_flag": f" --project={shlex.quote(project)}" if project else "",
      "runs": "\n".join(blocks),
      "config": sweep.config,
    },
  )


def _write_script(path: str, text: str) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as fh:
    fh.write(text)
  os.chmod(path, 0o755)
  return path


# ---- command line -----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="python -m experiments.sweep",
    description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1],
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  src = p.add_argument_group("which sweep")
  src.add_argument("--config", help="config file with get_sweep(): path.py[:arg]")
  src.add_argument(
    "--root", default="runs", help="runs go to ROOT/<config name>/<slug> (default runs)"
  )
  src.add_argument(
    "--set",
    action="append",
    default=[],
    metavar="KEY=VALUE",
    help="override for every run (dotted config path); names the sweep folder",
  )
  src.add_argument("--eval", action="store_true", help="after training, run launch.py --mode eval")
  src.add_argument("--manifest", help="take the sweep from this sweep.json instead of --config")
  src.add_argument("--index", help="only these runs: 3 or 0-3,7")
  act = p.add_argument_group("what to do (default: run locally)")
  act.add_argument(
    "--dry_run",
    "--print",
    action="store_true",
    help="print the commands (or the job script) instead of running",
  )
  act.add_argument("--parallel", type=int, default=1, help="runs at once on this machine")
  act.add_argument(
    "--next",
    choices=MODES,
    help="print the launch.py command of this mode for "
    "--index if it is the run's next step (else nothing); for the SLURM script",
  )
  act.add_argument(
    "--only",
    choices=MODES,
    help="run only this step of each run (TPU pods: train on all workers, eval on worker 0)",
  )
  act.add_argument("--slurm", action="store_true", help="write (and sbatch) a SLURM array job")
  act.add_argument(
    "--tpu", metavar="NAME[,NAME]", help="write (and run) a gcloud job on these TPU pods"
  )
  sl = p.add_argument_group("cluster jobs (--slurm, --tpu)")
  sl.add_argument("--setup", default="", help="shell command before the runs (modules, venv)")
  sl.add_argument("--gpus_per_node", type=int, default=8, help="SLURM: tasks (GPUs) per node")
  sl.add_argument("--nodes", type=int, default=1, help="SLURM: nodes per run")
  sl.add_argument("--time", default="24:00:00", help="SLURM: time limit per array task")
  sl.add_argument("--cpus_per_task", type=int, default=8, help="SLURM: CPUs per GPU process")
  sl.add_argument("--partition", default="", help="SLURM: partition")
  sl.add_argument("--max_concurrent", type=int, default=0, help="SLURM: array throttle (%%N)")
  sl.add_argument("--sbatch_arg", action="append", default=[], help="SLURM: extra #SBATCH line")
  sl.add_argument("--zone", default="us-central2-b", help="TPU: the pods' zone")
  sl.add_argument("--project", default="", help="TPU: gcloud project (default: gcloud's)")
  sl.add_argument("--remote_dir", default="~/diffusion", help="TPU: the repository on workers")
  return p


def _load(args: argparse.Namespace) -> Sweep:
  if args.manifest:
    return read_manifest(args.manifest)
  if not args.config:
    raise SystemExit("give --config path.py[:arg] (or --manifest sweep.json).")
  return expand(args.config, args.root, common=_parse_set(args.set), eval=args.eval)


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  sweep = _load(args)
  runs = select(sweep.runs, args.index)

  if args.next:  # one command for the SLURM script: nothing when that step is finished
    if len(runs) != 1:
      raise SystemExit("--next needs --index with one run.")
    run = runs[0]
    todo = pending_modes(run, sweep.eval or args.next == "eval")
    if todo and todo[0] == args.next:
      print(shell(command(sweep, run, args.next)))
    elif args.next in todo:  # eval before training finished (e.g. stopped at the time limit)
      print(f"run {run.index}: {args.next} waits for {todo[0]} to finish", file=sys.stderr)
    else:
      print(f"run {run.index}: {args.next} already finished", file=sys.stderr)
    return 0

  if args.slurm:
    text = slurm_script(
      sweep,
      gpus_per_node=args.gpus_per_node,
      nodes=args.nodes,
      time_limit=args.time,
      cpus_per_task=args.cpus_per_task,
      partition=args.partition,
      max_concurrent=args.max_concurrent,
      setup=args.setup,
      sbatch_args=args.sbatch_arg,
    )
    path = os.path.join(local_path(sweep.root), "slurm.sbatch")
    if args.dry_run:
      print(text)
      print(f"# would write {local_path(sweep.manifest_path)} and {path}, then run: sbatch {path}")
      return 0
    write_manifest(sweep)
    os.makedirs(os.path.join(local_path(sweep.root), "slurm"), exist_ok=True)  # --output logs
    _write_script(path, text)
    if shutil.which("sbatch") is None:
      print(f"wrote {path}; sbatch is not on this machine: submit it with `sbatch {path}`.")
      return 0
    return subprocess.call(["sbatch", path])

  if args.tpu:
    text = tpu_script(
      sweep,
      args.root,
      args.tpu.split(","),
      zone=args.zone,
      project=args.project,
      remote_dir=args.remote_dir,
      setup=args.setup,
    )
    path = os.path.join(local_path(sweep.root), "tpu_pod.sh")
    if args.dry_run:
      print(text)
      print(f"# would write {path} and run: bash {path}")
      return 0
    write_manifest(sweep)
    _write_script(path, text)
    if shutil.which("gcloud") is None:
      print(f"wrote {path}; gcloud is not on this machine: run it with `bash {path}`.")
      return 0
    return subprocess.call(["bash", path])

  if args.dry_run:
    print(f"# sweep {sweep.name}: {len(sweep.runs)} runs in {sweep.root}")
    for r in runs:
      modes = pending_modes(r, sweep.eval)
      print(f"# [{r.index}] {r.name}: {status(r, sweep.eval)}{_drift_note(sweep, r)}")
      for mode in modes:
        print(shell(command(sweep, r, mode, python="python")))
    return 0

  if args.manifest is None and args.index is None:
    write_manifest(sweep)  # workers of a pod running one --index each leave it alone
  results = LocalRunner(sweep, args.parallel, only=args.only).run(runs)
  failed = [(r, what) for r, what in results if not what.startswith(("ran", "skipped"))]
  print(f"sweep {sweep.name}: {len(results) - len(failed)}/{len(results)} runs ok")
  for r, what in results:
    print(f"  [{r.index}] {r.name}: {what}")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
