#!/bin/bash
#% Template of the SLURM job that `python -m experiments.sweep --config ... --slurm` writes
#% (to <root>/<sweep>/slurm.sbatch): it fills in the {{name}} fields and drops these #% lines.
# SLURM array job for the sweep {{config}}: {{num_runs}} runs, array task i = run i of the manifest.
# Written by experiments/sweep/cluster.py. Each task trains its run with one process per GPU
# started by srun (launch.py calls jax.distributed.initialize() itself when the srun step has more
# than one task: SLURM_STEP_NUM_TASKS > 1), then, when the sweep has --eval, evaluates it in one
# process that sees the node's GPUs (the eval mode is single-process).
# GPUs: the job asks --gpus-per-node and srun binds none to tasks (--gpu-bind=none), so every task
# sees all of its node's GPUs and process SLURM_LOCALID drives GPU SLURM_LOCALID, the layout jax's
# SLURM detection assumes (--gpus-per-task would hide the others: CUDA_ERROR_INVALID_DEVICE).
# A task stopped by SIGTERM (sent 300 s before the time limit, by a preemption, or by
# `scancel --signal=TERM`) saves a checkpoint and exits 75; the task then requeues itself
# (scontrol requeue; SLURM holds a requeued job about 2 minutes) and resumes from that checkpoint
# in its next allocation. Resubmitting also resumes: finished steps are skipped.
#SBATCH --job-name={{job_name}}
#SBATCH --array={{array}}
#SBATCH --nodes={{nodes}}
#SBATCH --ntasks-per-node={{tasks_per_node}}
{{gpus}}
#SBATCH --cpus-per-task={{cpus_per_task}}
#SBATCH --time={{time}}
#SBATCH --signal=TERM@300
#SBATCH --requeue
#SBATCH --output={{log_dir}}/%A_%a.out
#SBATCH --open-mode=append
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
  RC=0
  if [ "$MODE" = train ]; then
    # Every task: one jax.distributed job; each sees all of its node's GPUs. --kill-on-bad-exit=0:
    # after SIGTERM every task saves and exits 75, and the first to exit must not kill the others
    # mid-exit (srun then reports 143, not 75, and the job is not requeued); a task that crashes
    # makes JAX's coordination service stop the others.
    eval "srun --kill-on-bad-exit=0 --gpu-bind=none $CMD" || RC=$?
  else
    eval "srun --nodes=1 --ntasks=1 $CMD" || RC=$?  # eval is single-process: one task
  fi
  if [ "$RC" = 75 ]; then  # stopped by SIGTERM after saving: resume in a new allocation
    echo "run $RUN: $MODE stopped after saving a checkpoint (exit 75); requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID" && exit 0
    exit 75
  fi
  [ "$RC" = 0 ] || exit "$RC"
done
