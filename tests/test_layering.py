"""The import graph of the whole `diffusion` package: no cycles, no upward imports, the maths and
the data knowing nothing of what sits above them, no mode importing another, and no library
module reading `configs/`, `launch.py` or `experiments/`. Imports are read from the source (at
any depth: lazy imports and TYPE_CHECKING ones count too)."""

import ast
from pathlib import Path

from diffusion import data

PACKAGE = Path(__file__).resolve().parent.parent / "diffusion"
# Lowest first: a module may import modules of its own layer or of the layers below it.
LAYERS = (
  # the maths, the networks, the data, storage and the device setup
  {"schedules", "gaussian", "processes", "denoiser", "solvers", "losses", "objectives", "nets"}
  | {"data"},
  {"storage", "runtime", "flops", "posthoc_ema", "plots", "parallel", "sharding"},
  {"checkpoints", "runlog", "rundir", "visualize", "train_state", "metrics", "unet", "few_step"}
  | {"sample_settings"},
  {"model"},
  {"train", "generate", "parameters", "autoencoding", "encode"},
  {"evaluation"},
  {"modes"},
)
MATHS = {"schedules", "gaussian", "processes", "denoiser", "solvers", "losses", "objectives"}
# The one import that crosses the rules on purpose: `python -m diffusion.data.prepare --encode`
# hands its arguments to the encoder (the data library itself imports no model).
COMMAND_LINE = {("diffusion.data.prepare", "diffusion.encode")}
OUTSIDE = {"configs", "launch", "experiments"}


def _name(path: Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path) -> set[str]:
  """Modules of the package `path` imports (`from a import b` counts as a.b where that is a
  module, else a), and the top-level names of every other import."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names = [
        f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
        for a in node.names
      ]
    else:
      continue
    for name in names:
      parts = name.split(".")
      inner = [
        ".".join(parts[:k]) for k in range(len(parts), 0, -1) if ".".join(parts[:k]) in MODULES
      ]
      found.add(inner[0] if inner else parts[0])
  return found


GRAPH = {m: _imports(p) - {m} for m, p in MODULES.items()}


def _part(module: str) -> str:
  """The top-level part of the package a module belongs to: diffusion.data.npz -> data."""
  return module.split(".")[1] if "." in module else ""


def _layer(module: str) -> int:
  part = _part(module)
  return next(i for i, layer in enumerate(LAYERS) if part in layer)


def test_every_module_has_a_layer():
  assert all(_part(m) == "" or any(_part(m) in layer for layer in LAYERS) for m in MODULES)


def test_no_import_cycle():
  done: set[str] = set()

  def visit(m: str, path: tuple[str, ...]) -> None:
    assert m not in path, f"import cycle: {' -> '.join((*path, m))}"
    if m not in done:
      for dep in sorted(GRAPH[m] & set(MODULES)):
        if dep != "diffusion" and (m, dep) not in COMMAND_LINE:  # that one is a lazy import
          visit(dep, (*path, m))
      done.add(m)

  for m in sorted(MODULES):
    visit(m, ())


def test_no_upward_import():
  upward = [
    f"{m} -> {d}"
    for m, deps in GRAPH.items()
    if _part(m)
    for d in deps
    if d in MODULES and _part(d) and _layer(d) > _layer(m) and (m, d) not in COMMAND_LINE
  ]
  assert not upward, upward


def test_the_library_reads_no_config_module_and_no_mode_imports_another():
  outside = [f"{m} -> {d}" for m, deps in GRAPH.items() for d in deps & OUTSIDE]
  assert not outside, outside
  modes = [
    f"{m} -> {d}"
    for m, deps in GRAPH.items()
    if _part(m) == "modes"
    for d in deps
    if _part(d) == "modes" and d != "diffusion.modes"
  ]
  assert not modes, modes


def test_the_maths_imports_only_the_maths_and_no_framework_beyond_jax():
  for m, deps in GRAPH.items():
    if _part(m) in MATHS:
      inner = {_part(d) for d in deps if d in MODULES}
      assert inner <= MATHS, (m, inner - MATHS)
      assert not deps & {"flax", "orbax", "tensorflow_datasets", "ml_collections", "optax"}, m
  for m, deps in GRAPH.items():  # the networks know nothing of diffusion
    if _part(m) == "nets":
      assert {_part(d) for d in deps if d in MODULES} <= {"nets", ""}, m


def test_data_modules_depend_one_way_and_never_see_a_config_dict():
  modules = {m.split(".")[-1]: deps for m, deps in GRAPH.items() if m.startswith("diffusion.data.")}
  graph = {
    m: {d.split(".")[-1] for d in deps if d.startswith("diffusion.data.")}
    for m, deps in modules.items()
  }
  assert not graph["dataset"] and not graph["cache"] and not graph["images"]  # the bottom
  for source in ("folder", "npz", "sprites", "tfds_source"):
    assert "loader" not in graph[source] and not graph[source] & {"folder", "npz", "tfds_source"}
  crossing = {d for m, d in COMMAND_LINE if m.startswith("diffusion.data.")}
  assert all(
    _part(d) in ("data", "") for deps in modules.values() for d in deps - crossing if d in MODULES
  )
  assert not any("ml_collections" in deps for deps in modules.values())
  assert "ml_collections" not in GRAPH["diffusion.data"]
  assert set(data.__all__) == {
    "SOURCES",
    "DataSpec",
    "Dataset",
    "Prefetcher",
    "ShardDataset",
    "batch_at",
    "check_batch",
    "fingerprint",
    "holdout_indices",
    "load",
    "normalize",
    "to_uint8",
    "train_iterator",
    "write_cache",
  }
  assert all(hasattr(data, name) for name in data.__all__)
  assert sorted(data.SOURCES) == ["folder", "latents", "npz", "shards", "sprites", "tfds"]
