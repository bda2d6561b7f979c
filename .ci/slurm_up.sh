#!/usr/bin/env bash
# A one-node SLURM on this machine for tests/test_slurm_real.py: installs Debian's slurm-wlm and
# munge if missing, writes /etc/slurm/slurm.conf (node "localhost", this machine's CPUs, process
# tracking without cgroups), starts munged, slurmctld and slurmd, and waits for the node to be
# idle. Idempotent: rerun it after a reboot or when the test says SLURM is not running. Root (or
# sudo) is needed. Stop it with: .ci/slurm_up.sh --stop
set -euo pipefail
if [ "$(id -u)" != 0 ]; then
  exec sudo -n "$0" "$@" || { echo "slurm_up.sh: run as root (or with sudo)" >&2; exit 1; }
fi
CONF=/etc/slurm/slurm.conf
STATE=/var/spool/slurmctld SPOOL=/var/spool/slurmd LOGS=/var/log/slurm

stop() {  # the daemons this script started, by their pid files; waits until they have exited
  for f in /run/slurmd.pid /run/slurmctld.pid; do
    [ -s "$f" ] || continue
    pid=$(cat "$f")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    rm -f "$f"
  done
}
if [ "${1:-}" = --stop ]; then stop; exit 0; fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurm-wlm munge
fi

# At least 2 CPUs (the test's job runs 2 tasks); config_overrides lets slurmd accept more CPUs
# than the machine has.
CPUS=$(nproc)
[ "$CPUS" -ge 2 ] || CPUS=2
mkdir -p "$STATE" "$SPOOL" "$LOGS" /etc/slurm
cat > "$CONF.new" <<EOF
# Written by .ci/slurm_up.sh: one node, no cgroups, no accounting.
ClusterName=ci
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job waits this long before it starts again (default 120 s).
AuthInfo=cred_expire=5
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
StateSaveLocation=$STATE
SlurmdSpoolDir=$SPOOL
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
KillWait=5
MinJobAge=600
NodeName=localhost NodeHostname=localhost NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
if ! cmp -s "$CONF.new" "$CONF"; then  # a new or changed config: restart the daemons
  mv "$CONF.new" "$CONF"
  stop
else
  rm "$CONF.new"
fi

# munge: the package made /etc/munge/munge.key; the daemon runs as the munge user.
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  mkdir -p /run/munge && chown munge:munge /run/munge
  runuser -u munge -- /usr/sbin/munged
fi
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
alive /run/slurmctld.pid || slurmctld
alive /run/slurmd.pid || slurmd -N localhost

for _ in $(seq 60); do
  state=$(sinfo -h -n localhost -o %T 2>/dev/null || true)
  case "$state" in
    idle* | mixed* | allocated*) echo "slurm_up.sh: SLURM is up (node localhost: $state)"; exit 0 ;;
    down* | drain*) scontrol update nodename=localhost state=resume 2>/dev/null || true ;;
  esac
  sleep 0.5
done
echo "slurm_up.sh: the node did not come up (state: ${state:-none}); see $LOGS/" >&2
exit 1
