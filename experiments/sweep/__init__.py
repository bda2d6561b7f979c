"""Sweeps: a config's get_sweep() expanded into launch.py runs with deterministic workdirs, run
here, printed, or written as SLURM / TPU-pod jobs (`python -m experiments.sweep --help`).

  spec.py     Run, Sweep, expand, slug, the manifest (sweep.json), launch.py command lines
  state.py    trained / evaluated / status / pending_modes of a run, config drift
  local.py    LocalRunner: launch.py subprocesses on this machine
  cluster.py  the SLURM array job and the TPU-pod job, from slurm.sh and tpu_pod.sh
  cli.py      the command line

Imports no JAX and nothing from diffusion/ but diffusion.runlog; configs build their sweeps with
configs.common (product, grid, chain), never with this package.
"""

from experiments.sweep.cli import main
from experiments.sweep.cluster import render, slurm_script, tpu_script
from experiments.sweep.local import LocalRunner
from experiments.sweep.spec import (
  MANIFEST,
  MODES,
  REPO,
  Run,
  Sweep,
  command,
  expand,
  local_path,
  read_manifest,
  select,
  shell,
  slug,
  sweep_name,
  write_manifest,
)
from experiments.sweep.state import config_drift, evaluated, pending_modes, status, trained

__all__ = [
  "MANIFEST",
  "MODES",
  "REPO",
  "LocalRunner",
  "Run",
  "Sweep",
  "command",
  "config_drift",
  "evaluated",
  "expand",
  "local_path",
  "main",
  "pending_modes",
  "read_manifest",
  "render",
  "select",
  "shell",
  "slug",
  "slurm_script",
  "status",
  "sweep_name",
  "tpu_script",
  "trained",
  "write_manifest",
]
