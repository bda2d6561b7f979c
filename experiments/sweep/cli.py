"""Sweeps: a config's get_sweep() expanded into launch.py runs with deterministic workdirs.

Run locally (one after another, or N at once), print the command lines, or write cluster jobs:

  python -m experiments.sweep --config configs/ablations/schedules.py:tiny --root runs --eval
  python -m experiments.sweep --config configs/ablations/schedules.py --root runs --dry_run
  python -m experiments.sweep --config ... --root /shared/runs --eval --slurm [--dry_run]
  python -m experiments.sweep --config ... --root /mnt/runs --eval --tpu my-pod [--dry_run]

A config file may define `get_sweep()` (or `get_sweep(arg)`, with the arg of `file.py:arg`)
returning override dicts whose keys are dotted config paths, e.g.
`{"diffusion.schedule": "cosine", "diffusion.prediction": "v"}`; configs.common's `product`,
`grid` and `chain` build them. Run i of the sweep trains in `<root>/<config name>[-arg]/<slug of
its overrides>` (e.g. `runs/schedules-tiny/prediction=v,schedule=cosine,weighting=simple`): the
same overrides always give the same folder, whatever their order, so a rerun skips finished runs
and resumes interrupted ones. A relative --root is relative to the repository root. The sweep's
manifest, `<root>/<name>/sweep.json`, lists the runs; SLURM array tasks pick their run from it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence

from configs.common import parse_overrides
from diffusion import storage
from experiments.sweep import cluster, spec
from experiments.sweep.local import LocalRunner
from experiments.sweep.state import drift_note, pending_modes, status


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="python -m experiments.sweep",
    description="\n\n".join(__doc__.split("\n\n")[:2]),
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
    choices=spec.MODES,
    help="print the launch.py command of this mode for --index if it is the run's "
    "next step (else nothing); for the SLURM script",
  )
  act.add_argument(
    "--only",
    choices=spec.MODES,
    help="run only this step of each run (the TPU-pod job runs both on all workers)",
  )
  act.add_argument("--slurm", action="store_true", help="write (and sbatch) a SLURM array job")
  act.add_argument(
    "--tpu", metavar="NAME[,NAME]", help="write (and run) a gcloud job on these TPU pods"
  )
  sl = p.add_argument_group("cluster jobs (--slurm, --tpu)")
  sl.add_argument("--setup", default="", help="shell command before the runs (modules, venv)")
  sl.add_argument("--gpus_per_node", type=int, default=8, help="SLURM: GPUs per node (0: CPU job)")
  sl.add_argument(
    "--tasks_per_node", type=int, default=0, help="SLURM: processes per node (default: one per GPU)"
  )
  sl.add_argument("--nodes", type=int, default=1, help="SLURM: nodes per run")
  sl.add_argument("--time", default="24:00:00", help="SLURM: time limit per array task")
  sl.add_argument("--cpus_per_task", type=int, default=8, help="SLURM: CPUs per GPU process")
  sl.add_argument("--partition", default="", help="SLURM: partition")
  sl.add_argument("--max_concurrent", type=int, default=0, help="SLURM: array throttle (%%N)")
  sl.add_argument("--sbatch_arg", action="append", default=[], help="SLURM: extra #SBATCH line")
  sl.add_argument("--zone", default="us-central2-b", help="TPU: the pods' zone")
  sl.add_argument("--project", default="", help="TPU: gcloud project (default: gcloud's)")
  sl.add_argument("--remote_dir", default="~/diffusion", help="TPU: the repository on workers")
  p.add_argument("--debug", action="store_true", help="show tracebacks of user errors too")
  return p


class UserError(ValueError):
  """A sweep definition or command line to fix: one line on stderr, exit 2."""


# Exit codes, as launch.py's: every run done; a run failed; a user error; a run stopped by a
# signal (or not started because of one, or its workdir busy): rerun to resume.
DONE, FAILED, USER_ERROR, STOPPED = 0, 1, 2, 75


def _load(args: argparse.Namespace) -> spec.Sweep:
  if args.manifest:
    return spec.read_manifest(args.manifest)
  if not args.config:
    raise UserError("give --config path.py[:arg] (or --manifest sweep.json).")
  return spec.expand(args.config, args.root, common=parse_overrides(args.set), eval=args.eval)


def _next(sweep: spec.Sweep, runs: Sequence, mode: str) -> int:
  """Prints the command of `mode` for the one run if it is that run's next step (the SLURM
  script runs what it prints), else says on stderr why not."""
  if len(runs) != 1:
    raise UserError("--next needs --index with one run.")
  run = runs[0]
  todo = pending_modes(run, sweep.eval or mode == "eval")
  if todo and todo[0] == mode:
    print(spec.shell(spec.command(sweep, run, mode)))
  elif mode in todo:  # eval before training finished (e.g. stopped at the time limit)
    print(f"run {run.index}: {mode} waits for {todo[0]} to finish", file=sys.stderr)
  else:
    print(f"run {run.index}: {mode} already finished", file=sys.stderr)
  return 0


def _submit(sweep: spec.Sweep, name: str, text: str, runner: str, needs: str, dry_run: bool) -> int:
  """Writes the manifest and the job script <sweep root>/<name> (with a gs:// root, the script
  goes to ~/.diffusion-jobs/<sweep>/ here), then runs `runner path` when the program `needs` is
  on this machine; with `dry_run` prints the script and writes nothing."""
  folder = spec.local_path(sweep.root)
  if storage.is_remote(folder):
    folder = os.path.join(os.path.expanduser("~"), ".diffusion-jobs", sweep.name)
  path = os.path.join(folder, name)
  if dry_run:
    print(text)
    print(
      f"# would write {spec.local_path(sweep.manifest_path)} and {path}, then run: "
      f"{runner} {shlex.quote(path)}"
    )
    return 0
  spec.write_manifest(sweep)
  cluster.write_script(path, text)
  if shutil.which(needs) is None:
    print(f"wrote {path}; {needs} is not on this machine: run `{runner} {shlex.quote(path)}`.")
    return 0
  return subprocess.call([runner, path])


def main(argv: Sequence[str] | None = None) -> int:
  """The CLI (see the module docstring); returns the exit code (DONE, FAILED, USER_ERROR or
  STOPPED). A user error is one line on stderr without a traceback unless --debug."""
  args = _parser().parse_args(argv)
  old = signal.signal(signal.SIGTERM, signal.default_int_handler)  # before the runner's: Ctrl-C
  try:
    return _main(args)
  except (ValueError, TypeError, KeyError, IndexError, FileNotFoundError) as e:
    if args.debug:
      raise
    text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    print(f"error: {text} (--debug shows the traceback)", file=sys.stderr)
    return USER_ERROR
  except KeyboardInterrupt:
    print("interrupted; rerun the same command to resume.", file=sys.stderr)
    return STOPPED
  finally:
    signal.signal(signal.SIGTERM, old)


def _main(args: argparse.Namespace) -> int:
  sweep = _load(args)
  runs = spec.select(sweep.runs, args.index)
  if args.next:
    return _next(sweep, runs, args.next)
  if args.slurm:
    if storage.is_remote(sweep.root):
      raise UserError("a SLURM sweep needs a --root on the cluster's shared filesystem.")
    text = cluster.slurm_script(
      sweep,
      gpus_per_node=args.gpus_per_node,
      tasks_per_node=args.tasks_per_node,
      nodes=args.nodes,
      time_limit=args.time,
      cpus_per_task=args.cpus_per_task,
      partition=args.partition,
      max_concurrent=args.max_concurrent,
      setup=args.setup,
      sbatch_args=args.sbatch_arg,
    )
    if not args.dry_run:  # sbatch's --output folder
      os.makedirs(os.path.join(spec.local_path(sweep.root), "slurm"), exist_ok=True)
    return _submit(sweep, "slurm.sbatch", text, "sbatch", "sbatch", args.dry_run)
  if args.tpu:
    text = cluster.tpu_script(
      sweep,
      args.root,
      args.tpu.split(","),
      zone=args.zone,
      project=args.project,
      remote_dir=args.remote_dir,
      setup=args.setup,
    )
    return _submit(sweep, "tpu_pod.sh", text, "bash", "gcloud", args.dry_run)
  if args.dry_run:
    print(f"# sweep {sweep.name}: {len(sweep.runs)} runs in {sweep.root}")
    for r in runs:
      print(f"# [{r.index}] {r.name}: {status(r, sweep.eval)}{drift_note(sweep, r)}")
      for mode in pending_modes(r, sweep.eval):
        print(spec.shell(spec.command(sweep, r, mode, python="python")))
    return 0
  if args.manifest is None and args.index is None:
    spec.write_manifest(sweep)  # workers of a pod running one --index each leave it alone
  results = LocalRunner(sweep, args.parallel, only=args.only).run(runs)
  ok = [r for r, what in results if what.startswith(("ran", "skipped"))]
  failed = [r for r, what in results if " failed " in f" {what} "]
  print(f"sweep {sweep.name}: {len(ok)}/{len(results)} runs ok")
  for r, what in results:
    print(f"  [{r.index}] {r.name}: {what}")
  return FAILED if failed else STOPPED if len(ok) < len(results) else DONE
