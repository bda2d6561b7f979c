#!/bin/bash
#% Template of the TPU-pod job that `python -m experiments.sweep --config ... --tpu NAME[,...]`
#% writes (to <root>/<sweep>/tpu_pod.sh): it fills in the {{name}} fields and drops these #% lines.
# TPU-pod job for the sweep {{config}} ({{name}}, {{num_runs}} runs) on pod(s): {{pods}}.
# Written by experiments/sweep/cluster.py. On every worker of a pod (--worker=all) it starts one
# detached job (setsid nohup, stdin closed: a dropped ssh connection or a closed laptop leaves it
# running) that trains the pod's runs one after another and, for an --eval sweep, evaluates each
# on all workers too (a multi-host slice starts libtpu only with every worker). launch.py
# initialises jax.distributed from the TPU VM's metadata (jax's own detection;
# DIFFUSION_DISTRIBUTED=on|off overrides it). Several pods work in parallel.
#   bash tpu_pod.sh          start the jobs (unless running), then wait for them
#   bash tpu_pod.sh wait     wait again (e.g. after this machine lost its connection)
#   bash tpu_pod.sh status   the tail of every worker's log
#   bash tpu_pod.sh stop     SIGTERM the jobs: training saves a checkpoint (rerun to resume)
# Logs: {{log_dir}}/<pod>.<worker host>.log. Rerunning skips finished steps and resumes
# interrupted ones. The workers need the repository at {{remote_dir}}.
set -uo pipefail
GCLOUD=${GCLOUD:-gcloud}
POLL=${POLL:-60}  # seconds between looks at the workers while waiting
PODS=({{pods}})
# Per pod, the command every worker runs: start the job, is it done, its result, its log, stop it.
declare -A START DONE RESULT STATUS STOP
{{commands}}

on_pod() {  # on_pod POD COMMAND: COMMAND on every worker of POD
  "$GCLOUD" compute tpus tpu-vm ssh "$1" --zone={{zone}}{{project_flag}} --worker=all \
    --command="$2"
}

wait_all() {  # until every worker of every pod has written its exit status; then report it
  local failed=0
  for POD in "${PODS[@]}"; do
    until on_pod "$POD" "${DONE[$POD]}" > /dev/null 2>&1; do sleep "$POLL"; done
    if on_pod "$POD" "${RESULT[$POD]}"; then
      echo "[$(date +%H:%M:%S)] pod $POD: done"
    else
      echo "[$(date +%H:%M:%S)] pod $POD: failed or stopped (bash $0 status)" >&2
      failed=1
    fi
  done
  echo "sweep {{name}}: done$([ "$failed" = 0 ] || echo ', with failures (see above)')"
  return "$failed"
}

case "${1:-run}" in
  run)
    for POD in "${PODS[@]}"; do
      echo "[$(date +%H:%M:%S)] pod $POD: starting its runs on every worker"
      on_pod "$POD" "${START[$POD]}" || exit 1
    done
    wait_all ;;
  wait) wait_all ;;
  status) for POD in "${PODS[@]}"; do on_pod "$POD" "${STATUS[$POD]}"; done ;;
  stop) for POD in "${PODS[@]}"; do on_pod "$POD" "${STOP[$POD]}"; done ;;
  *) echo "usage: bash $0 [wait|status|stop]" >&2; exit 2 ;;
esac
