#!/usr/bin/env bash
# Starts the Slurm dev cluster in STATE_DIR: MariaDB, slurmdbd, slurmctld and two slurmd (nodes
# n1 and n2 on loopback), all as root, every file they write inside STATE_DIR.
#
#   eval "$(slurm/dev/start.sh /tmp/slurm-dev)"     # sets SLURM_CONF for sbatch, srun, sacct, ...
#   slurm/dev/stop.sh /tmp/slurm-dev
#
# stdout carries only the `export` line(s) to eval; progress and errors go to stderr.
# Run again on a running cluster, it checks the nodes and prints the same line (no restart).
#
# Environment knobs (defaults in brackets):
#   SLURM_DEV_PORT_BASE [17000]  ports: slurmd n1, n2 = BASE+1, BASE+2; MariaDB = BASE+6;
#                                slurmctld = BASE+7; slurmdbd = BASE+9
#   SLURM_DEV_CPUS [nproc]       CPUs of each node
#   SLURM_DEV_GPUS [8]           GPUs each node declares (none exists; 0 if STATE_DIR has spaces)
#   SLURM_DEV_MIN_JOB_AGE [10]   seconds a finished job stays visible to squeue/scontrol
#   SLURM_DEV_TIMEOUT [60]       seconds to wait for each daemon
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
NODES=(n1 n2)

log() { printf 'slurm-dev: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Once a daemon has started, any failure stops the ones started so far (the logs stay).
STARTED=
on_exit() {
    local rc=$?
    ((rc != 0)) && [[ -n $STARTED ]] || return 0
    log "start failed (exit $rc); stopping what was started; logs in $LOGS"
    "$HERE/stop.sh" "$STATE" || true
}
trap on_exit EXIT

[[ $# -eq 1 && -n $1 ]] || die "usage: $0 STATE_DIR"
[[ $(id -u) -eq 0 ]] || die "the dev cluster runs its daemons as root; run as root"
case $1 in *'"'* | *$'\n'*) die "STATE_DIR must not contain a double quote or a newline: $1" ;; esac

mkdir -p -- "$1"
STATE=$(cd -- "$1" && pwd)
# slurmd's step sockets (spool/NODE/NODE_JOB.STEP) and MariaDB's socket are AF_UNIX paths,
# which are cut at 107 bytes.
((${#STATE} <= 60)) || die "STATE_DIR is ${#STATE} characters long; use one of at most 60: $STATE"

BASE=${SLURM_DEV_PORT_BASE:-17000}
SLURMD_PORT_1=$((BASE + 1))
SLURMD_PORT_2=$((BASE + 2))
DB_PORT=$((BASE + 6))
CTLD_PORT=$((BASE + 7))
DBD_PORT=$((BASE + 9))
TIMEOUT=${SLURM_DEV_TIMEOUT:-60}

ETC=$STATE/etc
RUN=$STATE/run
LOGS=$STATE/log
DAEMONS=$RUN/daemons   # one line per started daemon: NAME PID START_TIME (see stop.sh)
export SLURM_CONF=$ETC/slurm.conf

for tool in slurmctld slurmd slurmdbd sinfo sacctmgr mariadbd mariadb-install-db mariadb; do
    command -v "$tool" >/dev/null || die "$tool not found: run slurm/dev/install.sh as root first"
done
for node in "${NODES[@]}"; do
    getent hosts "$node" >/dev/null || die "host name $node does not resolve: run slurm/dev/install.sh"
done

# Field 22 of /proc/PID/stat is the start time in clock ticks after boot: with the PID it names
# one process, so a PID reused by another program later is never mistaken for ours. The command
# name (field 2) may contain spaces, so split after its closing parenthesis.
start_time() {
    local stat fields
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    read -r -a fields <<<"${stat##*) }"
    [[ ${fields[0]} != Z ]] || return 1   # a zombie has exited already
    printf '%s\n' "${fields[19]}"
}

alive_count() {
    local name pid started n=0
    [[ -f $DAEMONS ]] || { echo 0; return; }
    while read -r name pid started; do
        [[ $(start_time "$pid" 2>/dev/null) == "$started" ]] && n=$((n + 1))
    done <"$DAEMONS"
    echo "$n"
}

print_env() { printf 'export SLURM_CONF=%q\n' "$SLURM_CONF"; }

# Waits until "$@" succeeds, up to TIMEOUT seconds; on timeout names the log to read.
wait_for() {
    local what=$1 logfile=$2
    shift 2
    local deadline=$((SECONDS + TIMEOUT))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || die "$what not up after ${TIMEOUT}s; see $logfile"
        sleep 0.2
    done
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Both nodes registered and usable: idle, or running jobs when start.sh finds the cluster up.
nodes_ready() {
    local states
    states=$(sinfo --noheader --Node --partition=dev --format='%N %t' 2>/dev/null) || return 1
    [[ $(grep -cE '^n[12] (idle|mix|alloc|comp)$' <<<"$states") -eq 2 ]]
}

# Records a daemon that wrote PIDFILE, once the file holds a live PID.
record() {
    local name=$1 pidfile=$2 pid started
    wait_for "$name (pid file $pidfile)" "$LOGS/$name.log" test -s "$pidfile"
    pid=$(<"$pidfile")
    started=$(start_time "$pid") || die "$name exited right after starting; see $LOGS/$name.log"
    printf '%s %s %s\n' "$name" "$pid" "$started" >>"$DAEMONS"
}

# --- already running? --------------------------------------------------------------------------
if [[ -f $DAEMONS ]]; then
    running=$(alive_count)
    expected=$(wc -l <"$DAEMONS")
    if ((running == expected && expected == 3 + ${#NODES[@]})); then
        wait_for "nodes n1, n2 (in sinfo)" "$LOGS/slurmctld.log" nodes_ready
        log "already running in $STATE"
        print_env
        exit 0
    elif ((running > 0)); then
        die "$running of $expected daemons of $STATE are running; run slurm/dev/stop.sh '$STATE' first"
    fi
    rm -f -- "$DAEMONS"
fi

busy=()
for port in "$SLURMD_PORT_1" "$SLURMD_PORT_2" "$DB_PORT" "$CTLD_PORT" "$DBD_PORT"; do
    port_open "$port" && busy+=("$port")
done
((${#busy[@]} == 0)) || die "ports ${busy[*]} are in use; pick other ports with SLURM_DEV_PORT_BASE"

rm -f -- "$RUN"/*.pid   # stale ones would be read as the new daemons' PIDs

# --- configuration -----------------------------------------------------------------------------
mkdir -p -- "$ETC" "$RUN" "$LOGS" "$STATE/ctld" "$STATE/db" "${NODES[@]/#/$STATE/spool/}"

memory_mb=$(($(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024))
# Replacement strings are quoted so that bash 5.2 leaves an '&' in a path alone.
render() {
    local text
    text=$(<"$HERE/$1.in")
    text=${text//@STATE@/"$STATE"}
    text=${text//@CTLD_PORT@/"$CTLD_PORT"}
    text=${text//@DBD_PORT@/"$DBD_PORT"}
    text=${text//@DB_PORT@/"$DB_PORT"}
    text=${text//@SLURMD_PORT_1@/"$SLURMD_PORT_1"}
    text=${text//@SLURMD_PORT_2@/"$SLURMD_PORT_2"}
    text=${text//@CPUS@/"${SLURM_DEV_CPUS:-$(nproc)}"}
    text=${text//@NODE_GRES@/"$NODE_GRES"}
    text=${text//@MEMORY_MB@/"$memory_mb"}
    text=${text//@MIN_JOB_AGE@/"${SLURM_DEV_MIN_JOB_AGE:-10}"}
    ( umask 077 && printf '%s\n' "$text" >"$ETC/$1" )
}
# Fake GPUs: slurmd wants a device file per GPU and takes a character device; /dev/null will do.
# gres.conf splits File= at spaces, so a state dir with spaces gets no GPUs.
if [[ $STATE == *[[:space:]]* ]]; then
    [[ ${SLURM_DEV_GPUS:-0} == 0 ]] || die "SLURM_DEV_GPUS needs a STATE_DIR without spaces (gres.conf cannot quote)"
    log "STATE_DIR has spaces: the nodes declare no GPUs"
fi
GPUS=${SLURM_DEV_GPUS:-8}
[[ $STATE == *[[:space:]]* ]] && GPUS=0
NODE_GRES=
{
    echo "# Written by slurm/dev/start.sh: $GPUS fake GPUs per node (symlinks to /dev/null)."
    echo "AutoDetect=off"
    if ((GPUS > 0)); then
        mkdir -p -- "$STATE/dev"
        for ((i = 0; i < GPUS; i++)); do ln -sfn /dev/null "$STATE/dev/nvidia$i"; done
        echo "NodeName=n[1-2] Name=gpu File=$STATE/dev/nvidia[0-$((GPUS - 1))]"
        NODE_GRES="Gres=gpu:$GPUS "
    fi
} >"$ETC/gres.conf"
render slurm.conf
render slurmdbd.conf
chmod 644 -- "$ETC/slurm.conf"

# --- MariaDB -----------------------------------------------------------------------------------
sock=$RUN/mariadb.sock
if [[ ! -d $STATE/db/mysql ]]; then
    log "initialising MariaDB in $STATE/db"
    # mariadb-install-db leaves its paths unquoted: hand it a symlink whose path has no spaces.
    link_dir=$(mktemp -d)
    ln -s -- "$STATE/db" "$link_dir/db"
    mariadb-install-db --no-defaults --user=root --datadir="$link_dir/db" --skip-test-db \
        >"$LOGS/mariadb-install.log" 2>&1 || { rm -rf -- "$link_dir"; die "mariadb-install-db failed; see $LOGS/mariadb-install.log"; }
    rm -rf -- "$link_dir"
fi
log "starting MariaDB on 127.0.0.1:$DB_PORT"
# --no-defaults: nothing from /etc/mysql. Durability is traded for speed; this is a test database.
setsid mariadbd --no-defaults --user=root --datadir="$STATE/db" --socket="$sock" \
    --port="$DB_PORT" --bind-address=127.0.0.1 --pid-file="$RUN/mariadb.pid" \
    --log-error="$LOGS/mariadb.log" --skip-name-resolve --skip-log-bin \
    --innodb-buffer-pool-size=64M --innodb-log-file-size=16M --innodb-flush-log-at-trx-commit=0 \
    --innodb-doublewrite=0 --innodb-lock-wait-timeout=900 \
    </dev/null >>"$LOGS/mariadb.log" 2>&1 &
# mariadbd does not fork (and setsid, not a group leader here, execs in place): $! is its PID.
STARTED=1
started=$(start_time "$!") || die "MariaDB exited right after starting; see $LOGS/mariadb.log"
printf 'mariadb %s %s\n' "$!" "$started" >>"$DAEMONS"
wait_for "MariaDB" "$LOGS/mariadb.log" mariadb --no-defaults --socket="$sock" -e 'SELECT 1'
mariadb --no-defaults --socket="$sock" <<'SQL' || die "creating the slurm database user failed"
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
SQL

# --- Slurm daemons -----------------------------------------------------------------------------
log "starting slurmdbd on port $DBD_PORT"
slurmdbd </dev/null >>"$LOGS/slurmdbd.log" 2>&1 || die "slurmdbd failed; see $LOGS/slurmdbd.log"
record slurmdbd "$RUN/slurmdbd.pid"
wait_for "slurmdbd" "$LOGS/slurmdbd.log" port_open "$DBD_PORT"

log "starting slurmctld on port $CTLD_PORT"
slurmctld -f "$SLURM_CONF" -i </dev/null >>"$LOGS/slurmctld.log" 2>&1 ||
    die "slurmctld failed; see $LOGS/slurmctld.log"
record slurmctld "$RUN/slurmctld.pid"

for node in "${NODES[@]}"; do
    log "starting slurmd $node"
    slurmd -f "$SLURM_CONF" -N "$node" </dev/null >>"$LOGS/slurmd-$node.log" 2>&1 ||
        die "slurmd $node failed; see $LOGS/slurmd-$node.log"
    record "slurmd-$node" "$RUN/slurmd-$node.pid"
done

wait_for "nodes n1, n2 (idle in sinfo)" "$LOGS/slurmctld.log and $LOGS/slurmd-*.log" nodes_ready
log "cluster up in $STATE (partition dev, nodes n1 n2)"
print_env
