#!/usr/bin/env bash
# Stops the Slurm dev cluster that slurm/dev/start.sh started in STATE_DIR.
#
# Cancels the cluster's jobs first (slurmd leaves running job steps behind when it exits), then
# signals exactly the daemons listed in STATE_DIR/run/daemons, newest first, checking each one's
# PID and start time so that a PID since reused by another program is left alone. Nothing is
# looked up or killed by name. The state dir is kept; delete it to start afresh.
set -euo pipefail

log() { printf 'slurm-dev: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ $# -eq 1 && -n $1 ]] || die "usage: $0 STATE_DIR"
[[ -d $1 ]] || die "no such state dir: $1"
STATE=$(cd -- "$1" && pwd)
DAEMONS=$STATE/run/daemons
GRACE=${SLURM_DEV_STOP_TIMEOUT:-20}   # seconds each daemon gets after SIGTERM before SIGKILL
export SLURM_CONF=$STATE/etc/slurm.conf

if [[ ! -f $DAEMONS ]]; then
    log "nothing recorded as running in $STATE"
    exit 0
fi

# Same as in start.sh: the start time (field 22 of /proc/PID/stat) of a live, non-zombie PID.
start_time() {
    local stat fields
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    read -r -a fields <<<"${stat##*) }"
    [[ ${fields[0]} != Z ]] || return 1
    printf '%s\n' "${fields[19]}"
}
ours() { [[ $(start_time "$1" 2>/dev/null) == "$2" ]]; }

# Jobs first, while slurmctld and the slurmd still run to kill their steps.
if jobs=$(timeout 10 squeue --noheader --format=%A 2>/dev/null) && [[ -n $jobs ]]; then
    log "cancelling jobs: $(tr '\n' ' ' <<<"$jobs")"
    # shellcheck disable=SC2086  # one job ID per word
    timeout 10 scancel $jobs 2>/dev/null || true
    deadline=$((SECONDS + 15))
    # squeue lists only unfinished jobs (pending, running, completing) unless told otherwise.
    while [[ -n $(timeout 10 squeue --noheader --format=%A 2>/dev/null) ]] && ((SECONDS < deadline)); do
        sleep 0.5
    done
fi

# Newest first: the slurmd, slurmctld, slurmdbd, then MariaDB under it.
mapfile -t lines < <(tac -- "$DAEMONS")
for line in "${lines[@]}"; do
    read -r name pid started <<<"$line"
    if ! ours "$pid" "$started"; then
        continue
    fi
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + GRACE))
    while ours "$pid" "$started"; do
        if ((SECONDS >= deadline)); then
            log "$name (pid $pid) still running after ${GRACE}s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.5
            break
        fi
        sleep 0.1
    done
done

still=()
for line in "${lines[@]}"; do
    read -r name pid started <<<"$line"
    ours "$pid" "$started" && still+=("$name:$pid")
done
((${#still[@]} == 0)) || die "still running: ${still[*]}"
rm -f -- "$DAEMONS"
log "stopped $STATE"
