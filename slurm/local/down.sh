#!/usr/bin/env bash
# Stops the private Slurm cluster started by slurm/local/up.sh RUN_DIR: cancels its jobs, then
# stops exactly the daemons whose PIDs up.sh recorded (TERM, then KILL after a grace period).
#
#   bash slurm/local/down.sh RUN_DIR
set -uo pipefail
run=${1:?usage: down.sh RUN_DIR}
[ -d "$run/pids" ] || { echo "slurm/local/down.sh: no $run/pids: nothing to stop"; exit 0; }
export PATH="/usr/sbin:/usr/bin:$PATH"
export SLURM_CONF="$run/slurm.conf"

# Jobs first: slurmstepd and the job's processes outlive a killed slurmd, so let slurmd end them.
if [ -f "$run/pids/slurmctld.pid" ] && kill -0 "$(cat "$run/pids/slurmctld.pid")" 2>/dev/null; then
    if [ -n "$(squeue -h -o %i 2>/dev/null)" ]; then
        scancel --full $(squeue -h -o %i) 2>/dev/null
        for _ in $(seq 1 60); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.5; done
    fi
fi

stop() {  # stop PIDFILE...: TERM, wait up to 10 s, then KILL
    local pids=() f p
    for f in "$@"; do [ -f "$f" ] && pids+=("$(cat "$f")"); done
    [ ${#pids[@]} -gt 0 ] || return 0
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
    for _ in $(seq 1 100); do
        local alive=0
        for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
        [ $alive = 0 ] && break
        sleep 0.1
    done
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && { echo "slurm/local/down.sh: pid $p did not stop on TERM: KILL"; kill -KILL "$p"; }; done
    for f in "$@"; do rm -f "$f"; done
}
stop "$run"/pids/slurmd-*.pid
stop "$run/pids/slurmctld.pid"
stop "$run/pids/munged.pid"

# Last, anything still carrying this cluster's SLURM_CONF in its environment: the daemons exported
# it to slurmstepd and every job process, so this finds exactly what this cluster started, e.g.
# after the harness was killed and the daemons died before they could end their jobs.
sweep() {
    local sig=$1 p found=()
    for p in /proc/[0-9]*; do
        p=${p#/proc/}
        [ "$p" = $$ ] && continue
        { tr '\0' '\n' <"/proc/$p/environ"; } 2>/dev/null | grep -qxF "SLURM_CONF=$SLURM_CONF" && found+=("$p")
    done
    [ ${#found[@]} -gt 0 ] || return 1
    echo "slurm/local/down.sh: $sig to leftover processes of this cluster: ${found[*]}"
    kill "-$sig" "${found[@]}" 2>/dev/null
    return 0
}
if sweep TERM; then
    for _ in $(seq 1 20); do sleep 0.5; sweep 0 >/dev/null || break; done
    sweep KILL
fi
echo "slurm/local/down.sh: stopped the cluster in $run"
