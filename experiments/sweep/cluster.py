"""Cluster jobs of a sweep: a SLURM array job and a TPU-pod (gcloud) job, written from the
templates next to this file (slurm.sh, tpu_pod.sh: {{name}} placeholders, "#%" notes)."""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Mapping, Sequence
from typing import Any

from experiments.sweep.spec import REPO, Sweep, cli_args, local_path

TEMPLATES = os.path.dirname(os.path.abspath(__file__))


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
  with open(os.path.join(TEMPLATES, name)) as fh:
    return fh.read()


def slurm_script(
  sweep: Sweep,
  *,
  gpus_per_node: int = 8,
  tasks_per_node: int = 0,
  nodes: int = 1,
  time_limit: str = "24:00:00",
  cpus_per_task: int = 8,
  partition: str = "",
  max_concurrent: int = 0,
  setup: str = "",
  sbatch_args: Sequence[str] = (),
  python: str = "python",
) -> str:
  """The SLURM array job over the sweep (slurm.sh filled in): task i runs run i, one process per
  GPU via srun (`tasks_per_node`, default `gpus_per_node`, processes per node); training
  initialises jax.distributed from SLURM's environment. The job asks --gpus-per-node and every
  process sees all its node's GPUs (diffusion.parallel.slurm_local_device_ids picks its own);
  `gpus_per_node=0` writes a CPU job."""
  n = len(sweep.runs)
  if n == 0:
    raise ValueError("the sweep has no runs.")
  tasks_per_node = tasks_per_node or gpus_per_node
  if tasks_per_node < 1 or gpus_per_node < 0:
    raise ValueError("a CPU job (--gpus_per_node 0) needs --tasks_per_node N (N >= 1).")
  extra = [f"#SBATCH --partition={partition}"] if partition else []
  extra += [f"#SBATCH {a}" for a in sbatch_args]
  return render(
    _template("slurm.sh"),
    {
      "job_name": re.sub(r"[^A-Za-z0-9._+-]", "_", sweep.name),
      "array": f"0-{n - 1}" + (f"%{max_concurrent}" if max_concurrent else ""),
      "nodes": nodes,
      "tasks_per_node": tasks_per_node,
      "gpus": f"#SBATCH --gpus-per-node={gpus_per_node}" if gpus_per_node else "# (CPU tasks)",
      "cpus_per_task": cpus_per_task,
      "time": time_limit,
      "log_dir": shlex.quote(os.path.join(local_path(sweep.root), "slurm")),
      "extra_sbatch": "\n".join(extra),
      "repo": shlex.quote(REPO),
      "setup": setup or ":",
      "python": shlex.quote(python),
      "manifest": shlex.quote(local_path(sweep.manifest_path)),
      "modes": "train eval" if sweep.eval else "train",
      "num_runs": n,
      "config": sweep.config,
    },
  )


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
  """The TPU-pod job (tpu_pod.sh filled in): every worker of a pod runs one run at a time
  (`gcloud ... ssh --worker=all`); with several pods, run i goes to pod i % len(pods) and the
  pods work in parallel. Workers re-expand the sweep from the config, so no manifest is copied."""
  if not pods:
    raise ValueError("name at least one TPU pod (--tpu NAME[,NAME...]).")
  blocks = []
  base = shlex.join(cli_args(sweep, root))
  prefix = f"cd {remote_dir} && {setup + ' && ' if setup else ''}"
  # Training runs on every worker (one jax.distributed job); eval is single-process: worker 0.
  steps = (("train", "all"), ("eval", "0")) if sweep.eval else (("train", "all"),)
  for p, pod in enumerate(pods):
    lines = []
    for r in (r for r in sweep.runs if r.index % len(pods) == p):
      lines.append(f"  # run {r.index}: {r.name}")
      for mode, worker in steps:
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


def write_script(path: str, text: str) -> str:
  """Writes an executable script, creating folders; returns its path."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as fh:
    fh.write(text)
  os.chmod(path, 0o755)
  return path
