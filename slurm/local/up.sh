#!/usr/bin/env bash
# Brings up a private single-machine Slurm cluster in RUN_DIR: its own munged (own key and socket),
# one slurmctld and NNODES slurmd daemons node1..nodeN, all on 127.0.0.1 (Slurm's multiple-slurmd
# mode: every node name is this machine, each slurmd on its own port). Nothing outside RUN_DIR is
# written and no system service is touched; every daemon's PID is recorded in RUN_DIR/pids/ so
# slurm/local/down.sh stops exactly these processes.
#
#   bash slurm/local/up.sh RUN_DIR [NNODES=2]
#   source RUN_DIR/env.sh        # exports SLURM_CONF so sbatch/srun/squeue talk to this cluster
#   bash slurm/local/down.sh RUN_DIR
#
# Environment (optional): MDN_SLURM_CTLD_PORT (16817), MDN_SLURM_NODE_PORT_BASE (17000: nodeI
# listens on BASE+I), MDN_SLURM_CPUS (CPUs per node, default: the online CPUs), MDN_SLURM_UP_TIMEOUT (60 s).
# Needs root (slurmd runs jobs as the submitting user) and the packages from install.sh.
# RUN_DIR must be reachable by the munge user (e.g. under /tmp, not under a 0700 folder).
set -euo pipefail

run=${1:?usage: up.sh RUN_DIR [NNODES]}
nnodes=${2:-2}
ctld_port=${MDN_SLURM_CTLD_PORT:-16817}
port_base=${MDN_SLURM_NODE_PORT_BASE:-17000}
cpus=${MDN_SLURM_CPUS:-$(getconf _NPROCESSORS_ONLN)}  # not nproc: it answers OMP_NUM_THREADS when set
up_timeout=${MDN_SLURM_UP_TIMEOUT:-60}
me="slurm/local/up.sh"
die() { echo "$me: ERROR: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root: slurmd must be able to run jobs as the submitting user"
for b in slurmctld slurmd munged mungekey; do command -v "$b" >/dev/null || [ -x "/usr/sbin/$b" ] \
    || die "$b not found: run slurm/local/install.sh first"; done
export PATH="/usr/sbin:/usr/bin:$PATH"
[[ "$nnodes" =~ ^[1-9][0-9]*$ ]] || die "NNODES must be a positive integer, got '$nnodes'"

mkdir -p "$run"
run=$(cd "$run" && pwd)
[ -z "$(ls -A "$run" 2>/dev/null)" ] || die "RUN_DIR $run is not empty (a previous cluster? run down.sh and remove it)"
# A daemon from an earlier run still holding our ports would make this cluster unusable in
# confusing ways: refuse early and name the port.
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for p in "$ctld_port" $(seq $((port_base + 1)) $((port_base + nnodes))); do
    port_busy "$p" && die "port $p on 127.0.0.1 is in use (another Slurm daemon? see MDN_SLURM_CTLD_PORT/MDN_SLURM_NODE_PORT_BASE)"
done

chmod 0755 "$run"
mkdir -p "$run"/{state,log,pids,spool}
for i in $(seq 1 "$nnodes"); do mkdir -p "$run/spool/node$i"; done

# --- munge: a private daemon with its own key; munged refuses to run as root ("Logfile is
# insecure"), so it runs as the munge user on files it owns.
install -d -o munge -g munge -m 0755 "$run/munge"
mungekey --create --keyfile="$run/munge/munge.key" --force >/dev/null
chown munge:munge "$run/munge/munge.key"; chmod 0400 "$run/munge/munge.key"
sock="$run/munge/munge.socket"
setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged --foreground \
    --socket="$sock" --key-file="$run/munge/munge.key" --pid-file="$run/munge/munged.pid" \
    --log-file="$run/munge/munged.log" --seed-file="$run/munge/munged.seed" \
    </dev/null >"$run/log/munged.out" 2>&1 &
echo $! >"$run/pids/munged.pid"
ok=0
for _ in $(seq 1 50); do
    if munge -n -S "$sock" 2>/dev/null | unmunge -S "$sock" >/dev/null 2>&1; then ok=1; break; fi
    kill -0 "$(cat "$run/pids/munged.pid")" 2>/dev/null || break
    sleep 0.2
done
[ $ok = 1 ] || die "munged did not start: $(cat "$run/log/munged.out" "$run/munge/munged.log" 2>/dev/null | tail -5)"

# --- slurm.conf
host=$(hostname)
conf="$run/slurm.conf"
{
cat <<CONF
# Written by slurm/local/up.sh: a private test cluster on 127.0.0.1.
ClusterName=mdntest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job may start again only after the job credential expired (default 120 s).
AuthInfo=socket=$sock,cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
StateSaveLocation=$run/state
SlurmdSpoolDir=$run/spool/%n
SlurmctldPidFile=$run/slurmctld.pid
SlurmdPidFile=$run/slurmd-%n.pid
SlurmctldLogFile=$run/log/slurmctld.log
SlurmdLogFile=$run/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
CONF
for i in $(seq 1 "$nnodes"); do
    echo "NodeName=node$i NodeHostname=$host NodeAddr=127.0.0.1 Port=$((port_base + i)) CPUs=$cpus Sockets=1 CoresPerSocket=$cpus ThreadsPerCore=1 State=UNKNOWN"
done
echo "PartitionName=debug Nodes=node[1-$nnodes] Default=YES MaxTime=INFINITE State=UP"
} >"$conf"
cat >"$run/env.sh" <<ENV
# source me: point the Slurm client commands at the cluster in $run
export SLURM_CONF=$conf
ENV
export SLURM_CONF="$conf"

# --- daemons, in the foreground (-D) so that the recorded PID is the daemon itself
slurmctld -D -i -f "$conf" </dev/null >"$run/log/slurmctld.out" 2>&1 &
echo $! >"$run/pids/slurmctld.pid"
for i in $(seq 1 "$nnodes"); do
    slurmd -D -N "node$i" -f "$conf" </dev/null >"$run/log/slurmd-node$i.out" 2>&1 &
    echo $! >"$run/pids/slurmd-node$i.pid"
done

# --- wait until every node is idle
deadline=$((SECONDS + up_timeout))
while :; do
    for f in "$run"/pids/*.pid; do
        kill -0 "$(cat "$f")" 2>/dev/null || die "$(basename "$f" .pid) exited during start-up: $(tail -5 "$run/log/$(basename "$f" .pid).out" 2>/dev/null) $(tail -5 "$run/log/$(basename "$f" .pid).log" 2>/dev/null)"
    done
    idle=$(sinfo -h -N -o "%N %t" 2>/dev/null | awk '$2=="idle"' | wc -l)
    [ "$idle" -ge "$nnodes" ] && break
    [ $SECONDS -lt $deadline ] || die "nodes not idle after ${up_timeout}s: $(sinfo -N 2>&1 | tr '\n' ';') -- see $run/log"
    sleep 0.5
done
echo "$me: cluster up in $run: $nnodes nodes x $cpus CPUs, slurmctld on 127.0.0.1:$ctld_port (SLURM_CONF=$conf)"
