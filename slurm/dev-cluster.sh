#!/usr/bin/env bash
# A real Slurm cluster on this machine, as plain processes under one state directory.
#
#   slurm/dev-cluster.sh up [--nodes N]     # munged, MariaDB, slurmdbd, slurmctld, one slurmd per node
#   eval "$(slurm/dev-cluster.sh env)"      # point this shell's sbatch/squeue/sacct at it
#   slurm/dev-cluster.sh status             # the daemons and `sinfo`
#   slurm/dev-cluster.sh down               # cancel its jobs, stop every daemon it started, by PID
#   slurm/dev-cluster.sh install            # only install the Debian packages (CI does this first)
#
# Nodes are emulated: each slurmd runs in its own UTS + mount namespace with hostname nodeK and a
# private /etc/hosts (node1..nodeN -> 127.0.0.1), so MASTER_ADDR=node1 resolves inside jobs. The
# real /etc/hosts is never touched. Accounting (slurmdbd + MariaDB) is on: job states come from
# sacct, as on a production cluster. Everything listens on 127.0.0.1 (slurmctld also on 0.0.0.0:
# Slurm 22.05 cannot be told otherwise), on ports from FMTRAIN_SLURM_PORT (default 16800) upwards.
#
# Environment: FMTRAIN_SLURM_HOME (state directory, default ~/.local/state/fmtrain-slurm),
# FMTRAIN_SLURM_PORT. Needs root (slurmd starts jobs as their users) and Debian's slurm-wlm packages,
# which it installs with apt-get when they are missing.
set -euo pipefail

STATE="${FMTRAIN_SLURM_HOME:-$HOME/.local/state/fmtrain-slurm}"
PORT_BASE="${FMTRAIN_SLURM_PORT:-16800}"
CLUSTER="fmtrain-dev"
PACKAGES=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server)

die() { echo "dev-cluster: $*" >&2; exit 1; }
say() { echo "dev-cluster: $*" >&2; }

ensure_packages() {
    local missing=()
    for tool in slurmctld slurmd slurmdbd sbatch munged mariadbd mariadb-install-db; do
        command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || missing+=("$tool")
    done
    [ ${#missing[@]} -eq 0 ] && return
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
        die "missing ${missing[*]}; install the Debian packages: sudo apt-get install ${PACKAGES[*]}"
    fi
    say "installing ${PACKAGES[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null \
        || { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null; }
}

pid_alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }

# Start "$@" in the background, remember its PID under pids/NAME.
start() {
    local name=$1; shift
    "$@" >>"$STATE/log/$name.out" 2>&1 &
    echo $! >"$STATE/pids/$name"
}

stop_pid() {
    local name=$1 pid
    pid=$(cat "$STATE/pids/$name" 2>/dev/null || true)
    if pid_alive "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 100); do pid_alive "$pid" || break; sleep 0.1; done
        pid_alive "$pid" && { say "$name ($pid) ignored SIGTERM for 10 s: SIGKILL"; kill -KILL "$pid" 2>/dev/null || true; }
    fi
    rm -f "$STATE/pids/$name"
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local seconds=$1 what=$2; shift 2
    for _ in $(seq $((seconds * 10))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
    die "$what did not come up in ${seconds}s; see $STATE/log/"
}

write_configs() {
    local nodes=$1 host
    host=$(hostname)
    local ctld_port=$PORT_BASE dbd_port=$((PORT_BASE + 1)) db_port=$((PORT_BASE + 2))
    local socket="$STATE/munge/munge.socket.2"
    {
        printf '127.0.0.1 localhost %s\n' "$host"
        for k in $(seq "$nodes"); do printf '127.0.0.1 node%d\n' "$k"; done
    } >"$STATE/etc/hosts"
    cat >"$STATE/etc/slurm.conf" <<EOF
# Written by slurm/dev-cluster.sh; rewritten on every "up".
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$socket,cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,bf_interval=1,sched_interval=2
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=10
InactiveLimit=0
MinJobAge=300
Waittime=0
MailProg=/bin/true
# Job ids (and so fmtrain's rendezvous ports, derived from them) differ between clusters on one machine.
FirstJobId=$((PORT_BASE + 1))
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$dbd_port
AccountingStoragePass=$socket
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
EOF
    for k in $(seq "$nodes"); do
        echo "NodeName=node$k NodeAddr=127.0.0.1 NodeHostname=node$k Port=$((PORT_BASE + 10 + k)) CPUs=4 RealMemory=8000 State=UNKNOWN" \
            >>"$STATE/etc/slurm.conf"
    done
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO" >>"$STATE/etc/slurm.conf"
    cat >"$STATE/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$socket
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$dbd_port
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$db_port
StorageUser=root
StorageLoc=slurm_acct_db
PidFile=$STATE/run/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
EOF
    chmod 600 "$STATE/etc/slurmdbd.conf"
    cat >"$STATE/etc/my.cnf" <<EOF
[mysqld]
datadir=$STATE/mysql
socket=$STATE/run/mysqld.sock
pid-file=$STATE/run/mysqld.pid
port=$db_port
bind-address=127.0.0.1
user=root
skip-grant-tables
skip-name-resolve
innodb_buffer_pool_size=64M
log-error=$STATE/log/mariadb.log
EOF
}

cmd_up() {
    local nodes=2
    while [ $# -gt 0 ]; do
        case "$1" in
            --nodes) nodes=$2; shift 2 ;;
            --nodes=*) nodes=${1#--nodes=}; shift ;;
            *) die "unknown option $1 (usage: up [--nodes N])" ;;
        esac
    done
    [[ "$nodes" =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, not $nodes"
    [ "$(id -u)" -eq 0 ] || die "needs root: slurmd runs jobs as their users (run it in a container or VM of your own)"
    if [ -f "$STATE/pids/slurmctld" ] && pid_alive "$(cat "$STATE/pids/slurmctld")"; then
        die "already up under $STATE (run: $0 down)"
    fi
    ensure_packages
    mkdir -p "$STATE"/{etc,log,pids,run,ctld,munge,mysql}
    for k in $(seq "$nodes"); do mkdir -p "$STATE/spool/node$k"; done
    rm -rf "$STATE/ctld"/* "$STATE"/spool/*/*  # a fresh controller state; accounting keeps job history
    chmod 755 "$STATE/munge"
    write_configs "$nodes"
    echo "$nodes" >"$STATE/nodes"

    [ -f "$STATE/munge/munge.key" ] || { dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none; }
    chmod 600 "$STATE/munge/munge.key"
    start munged munged -F --force --socket="$STATE/munge/munge.socket.2" --key-file="$STATE/munge/munge.key" \
        --pid-file="$STATE/run/munged.pid" --log-file="$STATE/log/munged.log" --seed-file="$STATE/munge/seed"
    wait_for 10 munged test -S "$STATE/munge/munge.socket.2"

    if [ ! -d "$STATE/mysql/mysql" ]; then
        mariadb-install-db --defaults-file="$STATE/etc/my.cnf" --user=root --auth-root-authentication-method=normal \
            >"$STATE/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed; see $STATE/log/mariadb-install.log"
    fi
    start mariadbd mariadbd --defaults-file="$STATE/etc/my.cnf"
    wait_for 30 MariaDB test -S "$STATE/run/mysqld.sock"

    export SLURM_CONF="$STATE/etc/slurm.conf"
    start slurmdbd slurmdbd -D
    wait_for 30 slurmdbd bash -c "exec 3<>/dev/tcp/127.0.0.1/$((PORT_BASE + 1))"
    start slurmctld slurmctld -D -i -f "$SLURM_CONF"
    wait_for 30 slurmctld scontrol ping
    for k in $(seq "$nodes"); do
        # Its own hostname and /etc/hosts; unshare execs, so the PID recorded is slurmd's.
        start "slurmd-node$k" unshare --uts --mount bash -c \
            "hostname node$k && mount --bind '$STATE/etc/hosts' /etc/hosts && exec slurmd -D -N node$k -f '$SLURM_CONF'"
    done
    wait_for 60 "$nodes node(s)" bash -c "[ \"\$(sinfo -h -N -t idle -o %N | sort -u | wc -l)\" -ge $nodes ]"
    say "up: $nodes node(s), state in $STATE; now: eval \"\$($0 env)\""
}

cmd_down() {
    [ -d "$STATE/pids" ] || { say "nothing to stop under $STATE"; return 0; }
    export SLURM_CONF="$STATE/etc/slurm.conf"
    if [ -f "$STATE/pids/slurmctld" ] && pid_alive "$(cat "$STATE/pids/slurmctld")"; then
        # Jobs first, so their processes end through Slurm (all jobs here are this cluster's).
        local jobs
        jobs=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ' || true)
        if [ -n "${jobs// /}" ]; then
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            for _ in $(seq 150); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.1; done
        fi
    fi
    for name in $(ls "$STATE/pids" | grep '^slurmd-' || true); do stop_pid "$name"; done
    for name in slurmctld slurmdbd mariadbd munged; do stop_pid "$name"; done
    say "down"
}

cmd_env() {
    [ -f "$STATE/etc/slurm.conf" ] || die "no cluster under $STATE (run: $0 up)"
    printf 'export SLURM_CONF=%q\n' "$STATE/etc/slurm.conf"
    printf 'export FMTRAIN_SLURM_HOME=%q\n' "$STATE"
}

cmd_status() {
    [ -d "$STATE/pids" ] || die "no cluster under $STATE"
    for file in "$STATE"/pids/*; do
        [ -e "$file" ] || continue
        local pid; pid=$(cat "$file")
        if pid_alive "$pid"; then echo "$(basename "$file") $pid running"; else echo "$(basename "$file") $pid dead"; fi
    done
    SLURM_CONF="$STATE/etc/slurm.conf" sinfo || true
}

case "${1:-}" in
    up) shift; cmd_up "$@" ;;
    down) cmd_down ;;
    env) cmd_env ;;
    status) cmd_status ;;
    install) ensure_packages ;;
    *) echo "usage: $0 up [--nodes N] | down | env | status | install" >&2; exit 2 ;;
esac
