#!/usr/bin/env bash
# A local Ray cluster for trying and testing launcher=ray and fmtrain tune: a head and, optionally,
# a second emulated node, each a `ray start --block` process whose PID is recorded and stopped by PID
# (never `ray stop`, which stops every Ray on the machine).
#
#   ray-cluster/dev-cluster.sh up [--nodes 2] [--cpus 2] [--netns NAME] [--dashboard 8265]
#   eval "$(ray-cluster/dev-cluster.sh env)"     # FMTRAIN_RAY_ADDRESS=127.0.0.1:PORT, RAY_* settings
#   fmtrain train launcher=ray launcher.address=$FMTRAIN_RAY_ADDRESS
#   fmtrain train launcher=ray launcher.submit=jobs launcher.address=$RAY_ADDRESS   # with --dashboard
#   ray-cluster/dev-cluster.sh down
#
# Ray binds the machine's external address unless it runs in a network namespace that has only
# loopback: --netns NAME creates one (root) and starts the nodes in it; run fmtrain in it too
# (ip netns exec NAME fmtrain ...). The second node listens on 127.0.0.2, so Ray sees two nodes.
# --dashboard PORT starts the dashboard on 127.0.0.1:PORT, which the Ray Jobs API needs (the head
# then takes ~12 s to start and ~200 MiB more). Jobs run `python` from the nodes' PATH, which starts
# with the directory of the ray command used here, so they find the environment fmtrain is in.
# Environment: FMTRAIN_RAY_HOME (state, default ~/.local/state/fmtrain-ray), FMTRAIN_RAY_PORT (6390).
set -euo pipefail

STATE="${FMTRAIN_RAY_HOME:-$HOME/.local/state/fmtrain-ray}"
PORT="${FMTRAIN_RAY_PORT:-6390}"
RAY="${RAY:-$(command -v ray || echo "$(dirname "$(command -v python3)")/ray")}"
export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
# No idle worker per CPU started for each new driver: fmtrain's actors and trials get workers of their own (their
# runtime env), so those stayed idle (launch/ray.py init_options does the same for a Ray it starts).
export RAY_prestart_worker_first_driver=0
PATH="$(dirname "$RAY"):$PATH"

die() { echo "ray dev-cluster: $*" >&2; exit 1; }
pid_alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }

in_ns() {  # run "$@" in the namespace, if there is one (exec: the PID of a background call is Ray's)
    local ns; ns=$(cat "$STATE/netns" 2>/dev/null || true)
    if [ -n "$ns" ]; then exec ip netns exec "$ns" "$@"; else exec "$@"; fi
}

cmd_up() {
    local nodes=1 cpus=2 netns="" dashboard=""
    while [ $# -gt 0 ]; do
        case "$1" in
            --nodes) nodes=$2; shift 2 ;;
            --cpus) cpus=$2; shift 2 ;;
            --netns) netns=$2; shift 2 ;;
            --dashboard) dashboard=$2; shift 2 ;;
            *) die "unknown option $1 (usage: up [--nodes N] [--cpus C] [--netns NAME] [--dashboard PORT])" ;;
        esac
    done
    local dashboard_flags=(--include-dashboard=false)
    [ -n "$dashboard" ] && dashboard_flags=(--include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$dashboard")
    [ -x "$RAY" ] || die "no ray command; pip install 'fmtrain[ray]'"
    if [ -f "$STATE/pids/head" ] && pid_alive "$(cat "$STATE/pids/head")"; then die "already up under $STATE"; fi
    # Ray's socket paths must stay under 108 bytes: its temp folder lives in a short path.
    mkdir -p "$STATE/pids" "$STATE/logs"
    local tmp; tmp=$(mktemp -d /tmp/fmray-XXXXXX)
    echo "$tmp" >"$STATE/tmp"
    : >"$STATE/netns"
    echo "$dashboard" >"$STATE/dashboard"
    if [ -n "$netns" ]; then
        ip netns add "$netns" || die "cannot create network namespace $netns (needs root)"
        ip netns exec "$netns" ip link set lo up
        echo "$netns" >"$STATE/netns"
    fi
    (in_ns "$RAY" start --block --head --node-ip-address=127.0.0.1 --port="$PORT" --num-cpus="$cpus" \
        "${dashboard_flags[@]}" --temp-dir="$tmp") >"$STATE/logs/head.log" 2>&1 &
    echo $! >"$STATE/pids/head"
    for _ in $(seq 300); do
        (in_ns "$RAY" status --address="127.0.0.1:$PORT") >/dev/null 2>&1 && break
        pid_alive "$(cat "$STATE/pids/head")" || die "the head exited; see $STATE/logs/head.log"
        sleep 1  # a `ray status` costs ~0.7 CPU-s
    done
    for k in $(seq 2 "$nodes"); do
        (in_ns "$RAY" start --block --address="127.0.0.1:$PORT" --node-ip-address="127.0.0.$k" --num-cpus="$cpus") \
            >"$STATE/logs/node$k.log" 2>&1 &
        echo $! >"$STATE/pids/node$k"
    done
    for _ in $(seq 300); do
        [ "$( (in_ns "$RAY" status --address="127.0.0.1:$PORT") 2>/dev/null | grep -c ' node_')" -ge "$nodes" ] && break
        sleep 1
    done
    if [ -n "$dashboard" ]; then  # the Jobs API answers once the dashboard's job agent is up
        for _ in $(seq 300); do
            (in_ns "$RAY" job list --address="http://127.0.0.1:$dashboard") >/dev/null 2>&1 && break
            sleep 0.2
        done
    fi
    echo "ray dev-cluster: up, $nodes node(s) x $cpus CPUs at 127.0.0.1:$PORT${dashboard:+, dashboard at http://127.0.0.1:$dashboard}${netns:+ in network namespace $netns}" >&2
}

cmd_down() {
    [ -d "$STATE/pids" ] || { echo "ray dev-cluster: nothing to stop" >&2; return 0; }
    for file in "$STATE"/pids/node* "$STATE/pids/head"; do
        [ -e "$file" ] || continue
        local pid; pid=$(cat "$file")
        if pid_alive "$pid"; then
            # `ray start --block` stops the node's processes on SIGINT (it ignores SIGTERM).
            kill -INT "$pid" 2>/dev/null || true
            for _ in $(seq 300); do pid_alive "$pid" || break; sleep 0.1; done
            pid_alive "$pid" && { echo "ray dev-cluster: $pid ignored SIGINT for 30 s: SIGKILL" >&2; kill -KILL "$pid" 2>/dev/null || true; }
        fi
        rm -f "$file"
    done
    local ns; ns=$(cat "$STATE/netns" 2>/dev/null || true)
    [ -n "$ns" ] && ip netns delete "$ns" 2>/dev/null || true
    : >"$STATE/netns"
    local tmp; tmp=$(cat "$STATE/tmp" 2>/dev/null || true)
    [ -n "$tmp" ] && rm -rf "$tmp"
    echo "ray dev-cluster: down" >&2
}

cmd_env() {
    printf 'export FMTRAIN_RAY_ADDRESS=127.0.0.1:%s\n' "$PORT"
    printf 'export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=%s\n' "$RAY_AUTH_MODE"
    local dashboard; dashboard=$(cat "$STATE/dashboard" 2>/dev/null || true)
    [ -n "$dashboard" ] && printf 'export RAY_ADDRESS=http://127.0.0.1:%s\n' "$dashboard"
    return 0
}

case "${1:-}" in
    up) shift; cmd_up "$@" ;;
    down) cmd_down ;;
    env) cmd_env ;;
    *) echo "usage: $0 up [--nodes N] [--cpus C] [--netns NAME] [--dashboard PORT] | down | env" >&2; exit 2 ;;
esac
