#!/bin/bash
#% Template of the SLURM job that `python -m experiments.sweep --config ... --slurm` writes
#% (to <root>/<sweep>/slurm.sbatch): it fills in the {{name}} fields and drops these #% lines.
# SLURM array job for the sweep {{config}}: {{num_runs}} runs, array task i = run i of the manifest.
# Written by experiments/sweep/cluster.py. Each task trains its run with one process per GPU
# started by srun (launch.py calls jax.distributed.initialize() itself when the srun step has more
# than one task: SLURM_STEP_NUM_TASKS > 1), then, when the sweep has --eval, evaluates it in one
# process on one GPU (the eval mode is single-process).
# Resubmitting resumes: finished steps are skipped, interrupted ones resume from their newest
# checkpoint (SIGTERM before the time limit saves one).
#SBATCH --job-name={{job_name}}
#SBATCH --array={{array}}
#SBATCH --nodes={{nodes}}
#SBATCH --ntasks-per-node={{gpus_per_node}}
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task={{cpus_per_task}}
#SBATCH --time={{time}}
#SBATCH --signal=TERM@300
#SBATCH --requeue
#SBATCH --output={{log_dir}}/%A_%a.out
{{extra_sbatch}}
set -euo pipefail
cd {{repo}}
{{setup}}
PYTHON=${PYTHON:-{{python}}}
MANIFEST={{manifest}}
RUN=${SLURM_ARRAY_TASK_ID:?submit with sbatch: the array task id picks the run}
for MODE in {{modes}}; do
  # The command of this step if it is the run's next one, else nothing (and the reason on
  # stderr). Decided once, here, so that every srun task runs the same thing.
  CMD=$("$PYTHON" -m experiments.sweep --manifest "$MANIFEST" --index "$RUN" --next "$MODE")
  [ -n "$CMD" ] || continue
  echo "run $RUN: $MODE: $CMD"
  if [ "$MODE" = train ]; then
    eval "srun --kill-on-bad-exit=1 $CMD"  # every task: one jax.distributed job
  else
    eval "srun --nodes=1 --ntasks=1 $CMD"  # eval is single-process: one task, one GPU
  fi
done
