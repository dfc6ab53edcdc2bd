#!/usr/bin/env bash
# Stop what scripts/cluster/slurm-up.sh started: cancel jobs, shut slurmctld/slurmd down, stop our munged.
# Environment: SECO_SLURM_DIR (default /tmp/seco-slurm); SECO_SLURM_KEEP=1 keeps the directory (logs).
set -uo pipefail

DIR=${SECO_SLURM_DIR:-/tmp/seco-slurm}
PATH=$PATH:/usr/sbin:/sbin
log() { echo "slurm-down: $*" >&2; }
[ -f "$DIR/slurm.conf" ] || { log "nothing in $DIR"; exit 0; }
export SLURM_CONF=$DIR/slurm.conf

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
stop_pid() {  # stop_pid PIDFILE: TERM, up to 10 s, then KILL
    alive "$1" || return 0
    local pid; pid=$(cat "$1")
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null
}

if alive "$DIR/slurmctld.pid"; then
    jobs=$(squeue -h -o %i 2>/dev/null || true)
    if [ -n "$jobs" ]; then
        log "cancelling jobs: $(echo $jobs)"
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null
        for _ in $(seq 300); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.2; done
    fi
    scontrol shutdown 2>/dev/null
    for _ in $(seq 100); do alive "$DIR/slurmctld.pid" || alive "$DIR/slurmd.pid" || break; sleep 0.1; done
fi
stop_pid "$DIR/slurmd.pid"
stop_pid "$DIR/slurmctld.pid"
stop_pid "$DIR/munged.pid"   # only exists when slurm-up.sh started munged itself
rm -f "$DIR"/{slurmctld,slurmd,munged}.pid
if [ "${SECO_SLURM_KEEP:-0}" = 1 ]; then log "stopped; logs kept in $DIR/log"; else rm -rf "$DIR"; log "stopped"; fi
