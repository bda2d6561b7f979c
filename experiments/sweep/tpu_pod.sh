#!/bin/bash
#% Template of the TPU-pod job that `python -m experiments.sweep --config ... --tpu NAME[,...]`
#% writes (to <root>/<sweep>/tpu_pod.sh): it fills in the {{name}} fields and drops these #% lines.
# TPU-pod job for the sweep {{config}} ({{name}}, {{num_runs}} runs) on pod(s): {{pods}}.
# Written by experiments/sweep/cluster.py. A run trains with one command on every worker of a pod
# at once (--worker=all; launch.py calls jax.distributed.initialize() itself on a multi-worker
# pod), then, for an --eval sweep, evaluates on worker 0 (the eval mode is single-process). A pod
# takes its runs one after another; several pods work in parallel. The workers need the repository
# at the remote directory and the runs' root on a filesystem they all share. Rerunning this script
# skips finished steps and resumes interrupted ones.
set -uo pipefail
GCLOUD=${GCLOUD:-gcloud}
FAILED=0
PIDS=()

run_on() {  # run_on POD WORKER RUN_INDEX MODE REMOTE_COMMAND
  echo "[$(date +%H:%M:%S)] pod $1 (worker $2): run $3 $4"
  if ! "$GCLOUD" compute tpus tpu-vm ssh "$1" --zone={{zone}}{{project_flag}} --worker="$2" \
      --command="$5"; then
    echo "pod $1: run $3 $4 failed" >&2
    return 1
  fi
}

{{runs}}
for PID in "${PIDS[@]}"; do
  wait "$PID" || FAILED=1
done
echo "sweep {{name}}: done$([ "$FAILED" = 0 ] || echo ', with failures (see above)')"
exit "$FAILED"
