#!/usr/bin/env bash
# Start a private one-node Slurm (munged + slurmctld + slurmd) on this machine, for tests and CI.
#
#   eval "$(scripts/cluster/slurm-up.sh)"      # prints `export SLURM_CONF=...`; also in $SECO_SLURM_DIR/env
#   sbatch ...; squeue; ...
#   scripts/cluster/slurm-down.sh
#
# Installs Debian's slurm-wlm and munge if slurmctld is missing (root, or sudo). Leaves /etc/slurm alone:
# everything (slurm.conf, state, spool, logs, pids) lives in $SECO_SLURM_DIR (default /tmp/seco-slurm).
# Reuses a munged that already answers. Needs root for slurmd (it runs jobs as their submitter).
# Environment: SECO_SLURM_DIR, SECO_SLURM_CPUS (CPUs the node advertises; default: the real count),
# SECO_SLURM_KILLWAIT (seconds between TERM and KILL on cancel/requeue; default 60).
set -euo pipefail

DIR=${SECO_SLURM_DIR:-/tmp/seco-slurm}
log() { echo "slurm-up: $*" >&2; }
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
as_root() { $SUDO "$@"; }

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    log "installing slurm-wlm and munge"
    export DEBIAN_FRONTEND=noninteractive
    apt_log=$(mktemp)
    if ! { as_root apt-get install -y -qq --no-install-recommends slurm-wlm munge ||
        { as_root apt-get update -qq && as_root apt-get install -y -qq --no-install-recommends slurm-wlm munge; }; } \
        >"$apt_log" 2>&1; then
        cat "$apt_log" >&2
        exit 1
    fi
    rm -f "$apt_log"
fi
PATH=$PATH:/usr/sbin:/sbin

if [ -f "$DIR/slurmctld.pid" ] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null; then
    log "already running in $DIR"
    echo "export SLURM_CONF=$DIR/slurm.conf"
    exit 0
fi
mkdir -p "$DIR"/{state,spool,log}

# ---- munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    if [ ! -s /etc/munge/munge.key ]; then
        as_root mungekey --create >&2
        as_root chown munge:munge /etc/munge/munge.key
        as_root chmod 400 /etc/munge/munge.key
    fi
    as_root mkdir -p /run/munge /var/log/munge /var/lib/munge
    as_root chown munge:munge /run/munge /var/log/munge /var/lib/munge
    # munged -F stays in the foreground: its pid is the one to TERM in slurm-down.sh.
    $SUDO setsid setpriv --reuid=munge --regid=munge --init-groups munged -F \
        >"$DIR/log/munged.log" 2>&1 </dev/null &
    echo $! >"$DIR/munged.pid"
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n | unmunge >/dev/null || { log "munged did not start: $(cat "$DIR/log/munged.log")"; exit 1; }
fi

# ---- slurm.conf
HOST=$(hostname -s)
NODE=$(slurmd -C | head -n1)   # NodeName=<host> CPUs=.. Boards=.. SocketsPerBoard=.. CoresPerSocket=.. ...
if [ -n "${SECO_SLURM_CPUS:-}" ]; then
    # Advertise more CPUs than there are (tests that oversubscribe a 2-core machine on purpose).
    NODE="NodeName=$HOST CPUs=$SECO_SLURM_CPUS $(grep -o 'RealMemory=[0-9]*' <<<"$NODE")"
fi
cat >"$DIR/slurm.conf" <<EOF
# Written by scripts/cluster/slurm-up.sh: a private one-node cluster for tests.
ClusterName=seco
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Credential lifetime: also how long a requeued job waits before it may start again (default 120 s).
AuthInfo=cred_expire=${SECO_SLURM_CRED_EXPIRE:-5}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.log
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
JobRequeue=1
MinJobAge=3600
KillWait=${SECO_SLURM_KILLWAIT:-60}
SchedulerType=sched/backfill
# Look at pending jobs every second (defaults: 60 s / 30 s), so a requeued job restarts as soon as it may.
SchedulerParameters=sched_interval=1,bf_interval=1
SlurmctldPort=${SECO_SLURMCTLD_PORT:-6817}
SlurmdPort=${SECO_SLURMD_PORT:-6818}
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
$NODE State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF=$DIR/slurm.conf
echo "export SLURM_CONF=$SLURM_CONF" >"$DIR/env"

# ---- daemons (-D: foreground, so $! is the daemon; setsid: out of the caller's process group)
setsid slurmctld -D -i >"$DIR/log/slurmctld.out" 2>&1 </dev/null &
echo $! >"$DIR/slurmctld.pid"
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.1; done
setsid slurmd -D >"$DIR/log/slurmd.out" 2>&1 </dev/null &
echo $! >"$DIR/slurmd.pid"

for _ in $(seq 300); do
    state=$(sinfo -h -n "$HOST" -o %T 2>/dev/null || true)
    [ "$state" = idle ] && break
    sleep 0.1
done
if [ "$state" != idle ]; then
    log "node state is '$state', not idle; logs in $DIR/log"
    tail -n 20 "$DIR"/log/slurmctld.log "$DIR"/log/slurmd.log >&2 || true
    exit 1
fi
log "node $HOST idle ($(sinfo -h -o '%c CPUs') ); SLURM_CONF=$SLURM_CONF"
echo "export SLURM_CONF=$SLURM_CONF"
