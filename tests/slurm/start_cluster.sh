#!/usr/bin/env bash
# A local Slurm cluster for the tests: munge + slurmctld + two logical nodes (node1, node2) on this
# machine, all talking over 127.0.0.1. Needs root and Debian's packages
#   apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge
# (services do not start by themselves in a container, so this script starts them).
#
#   tests/slurm/start_cluster.sh [DIR]     start (idempotent); prints the line `export SLURM_CONF=DIR/slurm.conf`
#   tests/slurm/start_cluster.sh --stop [DIR]
#
# DIR (default /tmp/fastafd-slurm) holds the config, state, spool folders and daemon logs.
set -euo pipefail

STOP=0
if [[ "${1:-}" == "--stop" ]]; then STOP=1; shift; fi
DIR=${1:-${FASTAFD_SLURM_DIR:-/tmp/fastafd-slurm}}
CONF=$DIR/slurm.conf

stop() {
    for f in "$DIR"/slurmd-node*.pid "$DIR"/slurmctld.pid; do
        [[ -f $f ]] && kill "$(cat "$f")" 2>/dev/null || true
        rm -f "$f"
    done
}
if (( STOP )); then stop; exit 0; fi

for exe in slurmctld slurmd sbatch squeue scontrol munged; do
    command -v "$exe" >/dev/null || [[ -x /usr/sbin/$exe ]] || { echo "start_cluster: $exe not installed (apt-get install slurmctld slurmd slurm-client munge)" >&2; exit 3; }
done
[[ $(id -u) == 0 ]] || { echo "start_cluster: must run as root (SlurmUser=root)" >&2; exit 3; }
export PATH=$PATH:/usr/sbin

HOST=$(hostname -s)
CPUS=$(nproc)
mkdir -p "$DIR"/state "$DIR"/spool/node1 "$DIR"/spool/node2
cat > "$CONF" <<CONF
ClusterName=fastafd-test
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=16817
SlurmdPort=17001
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
KillWait=10
MinJobAge=600
JobRequeue=1
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
NodeName=node[1-2] NodeHostname=$HOST NodeAddr=127.0.0.1 Port=17001-17002 CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
export SLURM_CONF=$CONF

# munge: as the munge user, with a key
if ! pgrep -u munge -x munged >/dev/null; then
    [[ -s /etc/munge/munge.key ]] || { (command -v mungekey >/dev/null && mungekey --create) || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2>/dev/null; }
    chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge; chown munge:munge /run/munge /var/log/munge /var/lib/munge
    runuser -u munge -- /usr/sbin/munged
fi

stop  # a restart with this config
/usr/sbin/slurmctld -f "$CONF" -i
for n in node1 node2; do /usr/sbin/slurmd -f "$CONF" -N "$n" 2>/dev/null; done

for _ in $(seq 100); do
    if [[ $(sinfo -h -o '%t' -p debug 2>/dev/null | sort -u | tr -d '\n') == idle ]]; then
        echo "export SLURM_CONF=$CONF"
        exit 0
    fi
    sleep 0.2
done
echo "start_cluster: nodes did not become idle; see $DIR/*.log" >&2
sinfo >&2 || true
exit 1
