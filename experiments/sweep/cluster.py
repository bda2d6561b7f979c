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
  """The TPU-pod job (tpu_pod.sh filled in): on every worker of each pod, one detached job
  (setsid nohup, stdin closed, output to a log) runs the pod's runs one after another, training
  then (--eval) evaluating each on all workers. With several pods, run i goes to pod
  i % len(pods) and the pods work in parallel. Workers re-expand the sweep from the config, so
  no manifest is copied. Logs go to <root>/<sweep>/tpu_logs (the shared filesystem), or to
  ~/.diffusion-jobs/<sweep> on each worker when the root is a gs:// path."""
  if not pods:
    raise ValueError("name at least one TPU pod (--tpu NAME[,NAME...]).")
  base = shlex.join(cli_args(sweep, root))
  jobs = f"$HOME/.diffusion-jobs/{shlex.quote(sweep.name)}"  # per worker: pid and exit status
  logs = (
    jobs if root.startswith("gs://") else shlex.quote(os.path.join(root, sweep.name, "tpu_logs"))
  )
  modes = ("train", "eval") if sweep.eval else ("train",)
  arrays: dict[str, list[str]] = {k: [] for k in ("START", "DONE", "RESULT", "STATUS", "STOP")}
  for p, pod in enumerate(pods):
    pid, status, log = f"{jobs}/{pod}.pid", f"{jobs}/{pod}.exit", f'{logs}/{pod}."$(hostname)".log'
    steps = [
      " && ".join(
        f"{python} -m experiments.sweep {base} --index {r.index} --only {m}" for m in modes
      )
      for r in sweep.runs
      if r.index % len(pods) == p
    ]
    body = "; ".join(
      [
        "trap '' HUP",  # nohup's, kept for the children that reset it
        f"trap 'echo 143 > {status}; exit 143' TERM",  # bash stop: the trainers save first
        f"{{ {setup or ':'}; }} || {{ echo 1 > {status}; exit 1; }}",
        "rc=0",
        *(f"{{ {s}; }} || rc=1" for s in steps),
        f"echo $rc > {status}",
      ]
    )
    arrays["START"].append(
      f"mkdir -p {jobs} {logs} && cd {remote_dir} && "
      f'if [ -s {pid} ] && kill -0 "$(cat {pid})" 2>/dev/null; '
      f'then echo "$(hostname): already running"; '
      f"else rm -f {status}; setsid nohup bash -c {shlex.quote(body)} > {log} 2>&1 < /dev/null & "
      f'echo $! > {pid}; echo "$(hostname): started, log {log}"; fi'
    )
    arrays["DONE"].append(f"test -e {status}")
    arrays["RESULT"].append(f'exit "$(cat {status})"')
    arrays["STATUS"].append(f"tail -n 20 {log}")
    arrays["STOP"].append(f'kill -TERM -- -"$(cat {pid})"')
  declare = [
    f"{name}[{pod}]={shlex.quote(cmd)}"
    for name, cmds in arrays.items()
    for pod, cmd in zip(pods, cmds, strict=True)
  ]
  return render(
    _template("tpu_pod.sh"),
    {
      "name": sweep.name,
      "num_runs": len(sweep.runs),
      "pods": " ".join(shlex.quote(p) for p in pods),
      "zone": zone,
      "project_flag": f" --project={shlex.quote(project)}" if project else "",
      "commands": "\n".join(declare),
      "config": sweep.config,
      "log_dir": logs,
      "remote_dir": remote_dir,
    },
  )


def write_script(path: str, text: str) -> str:
  """Writes an executable script, creating folders; returns its path."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as fh:
    fh.write(text)
  os.chmod(path, 0o755)
  return path
