#!/usr/bin/env bash
# A local Slurm cluster for the tests: munge + slurmctld + two logical nodes (node1, node2) on this
# machine, all talking over 127.0.0.1. Needs root and Debian's packages
#   apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge
# (services do not start by themselves in a container, so this script starts them).
#
#   tests/slurm/start_cluster.sh [DIR]     start (idempotent); prints the line `export SLURM_CONF=DIR/slurm.conf`
#   tests/slurm/start_cluster.sh --stop [DIR]
#
# DIR (default /tmp/fastafd-slurm) holds the config, state, spool folders and daemon logs. Each DIR is
# its own cluster on its own ports, so several can run on one machine (beside other Slurm daemons):
# the controller's and the two nodes' ports are picked free (in 10000-19999, below the 20000+ rendezvous
# ports of slurm/train.sbatch) and kept in DIR/ports for a restart of the same DIR; FASTAFD_SLURM_PORTS
# ="CTLD NODE1 NODE2" forces them. A port that is taken, or that a daemon cannot bind, stops the script
# with one line naming the port and the daemon (exit 4), not a timeout later.
set -euo pipefail

STOP=0
if [[ "${1:-}" == "--stop" ]]; then STOP=1; shift; fi
DIR=${1:-${FASTAFD_SLURM_DIR:-/tmp/fastafd-slurm}}
CONF=$DIR/slurm.conf

stop() {  # this DIR's daemons, and wait (10 s at most) until they are gone, so that their ports are free
    local pids=()
    for f in "$DIR"/slurmd-node*.pid "$DIR"/slurmctld.pid; do
        [[ -s $f ]] && pids+=("$(cat "$f")") && kill "${pids[-1]}" 2>/dev/null || true
        rm -f "$f"
    done
    for _ in $(seq 50); do
        local alive=0
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        (( alive )) || return 0
        sleep 0.2
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
stop  # a restart of this DIR: its own daemons go first, so that its ports are free again

# free_ports N [PORT ...]: the given ports if each can be bound now, else N free ones; exit 1 naming a taken given port
free_ports() {
    python3 - "$@" <<'PY'
import random, socket, sys
n, given = int(sys.argv[1]), [int(p) for p in sys.argv[2:]]
def free(port):
    s = socket.socket()
    try:
        s.bind(("", port))
        return True
    except OSError:
        return False
    finally:
        s.close()
if given:
    taken = [p for p in given if not free(p)]
    if taken:
        print(taken[0])
        sys.exit(1)
    print(*given)
    sys.exit(0)
picked = []
for port in random.sample(range(10000, 20000), 2000):
    if port not in picked and free(port):
        picked.append(port)
        if len(picked) == n:
            break
print(*picked)
PY
}
port_in_use() {  # port_in_use PORT WHAT
    echo "start_cluster: port $1 ($2) is in use by another process (\`ss -ltnp 'sport = :$1'\` shows which): stop it, or pass other ports in FASTAFD_SLURM_PORTS=\"CTLD NODE1 NODE2\" (unset: picked free)" >&2
    exit 4
}
if [[ -n ${FASTAFD_SLURM_PORTS:-} ]]; then
    read -r -a want <<<"$FASTAFD_SLURM_PORTS"
    (( ${#want[@]} == 3 )) || { echo "start_cluster: FASTAFD_SLURM_PORTS=\"$FASTAFD_SLURM_PORTS\" must be three ports: CTLD NODE1 NODE2" >&2; exit 2; }
    if ! ports=$(free_ports 3 "${want[@]}"); then
        what=SlurmctldPort; [[ $ports == "${want[1]}" ]] && what="node1's Port"; [[ $ports == "${want[2]}" ]] && what="node2's Port"
        port_in_use "$ports" "$what"
    fi
elif [[ -s $DIR/ports ]] && ports=$(free_ports 3 $(cat "$DIR/ports")); then
    :  # the ports this DIR had before, still free
else
    ports=$(free_ports 3)
fi
read -r CTLD_PORT NODE1_PORT NODE2_PORT <<<"$ports"
echo "$CTLD_PORT $NODE1_PORT $NODE2_PORT" >"$DIR/ports"

cat > "$CONF" <<CONF
ClusterName=fastafd-test
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
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
NodeName=node1 NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$NODE1_PORT CPUs=$CPUS State=UNKNOWN
NodeName=node2 NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$NODE2_PORT CPUs=$CPUS State=UNKNOWN
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

# bound: DAEMON LOG PIDFILE PORT WHAT: wait until the daemon listens on PORT; a bind error in its log, or its
# death, is one line naming the port (instead of nodes that never become idle)
bound() {
    local name=$1 log=$2 pidfile=$3 port=$4 what=$5
    for _ in $(seq 150); do
        if grep -qsE "Address already in use|[Uu]nable to bind" "$log"; then port_in_use "$port" "$what, $name: see $log"; fi
        if [[ -s $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null && ! free_ports 1 "$port" >/dev/null; then return 0; fi  # bound, by it
        sleep 0.2
    done
    echo "start_cluster: $name did not listen on port $port ($what) within 30 s: see $log" >&2
    tail -5 "$log" >&2 2>/dev/null || true
    exit 4
}
rm -f "$DIR"/slurmctld.log "$DIR"/slurmd-node*.log  # this start's errors only
/usr/sbin/slurmctld -f "$CONF" -i
bound slurmctld "$DIR/slurmctld.log" "$DIR/slurmctld.pid" "$CTLD_PORT" SlurmctldPort
/usr/sbin/slurmd -f "$CONF" -N node1 2>/dev/null || true
bound "slurmd node1" "$DIR/slurmd-node1.log" "$DIR/slurmd-node1.pid" "$NODE1_PORT" "node1's Port"
/usr/sbin/slurmd -f "$CONF" -N node2 2>/dev/null || true
bound "slurmd node2" "$DIR/slurmd-node2.log" "$DIR/slurmd-node2.pid" "$NODE2_PORT" "node2's Port"

for _ in $(seq 150); do
    if [[ $(sinfo -h -o '%t' -p debug 2>/dev/null | sort -u | tr -d '\n') == idle ]]; then
        echo "export SLURM_CONF=$CONF"
        exit 0
    fi
    sleep 0.2
done
echo "start_cluster: nodes did not become idle within 30 s; see $DIR/*.log" >&2
sinfo >&2 || true
exit 1
