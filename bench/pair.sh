#!/usr/bin/env bash
# Paired A/B of proxy commands on GET 2 KiB (bench/NOTES.md, issue 12): each round starts every
# command fresh on PROXY_CPUS, loads it with wrk from LOAD_CPUS and reports CPU per request
# (user and sys from /proc/PID/stat). Rounds alternate, so machine drift hits all alike.
# LOAD=ws: WebSocket echo instead (ws-load, 64 relays, 128-byte messages), CPU per message.
#
#   bench/pair.sh ROUNDS 'name=command with @PORT@ and @BACKEND@' ...
#   bench/pair.sh 5 "new=target/release/chatgate --listen 127.0.0.1:@PORT@ --backend http://@BACKEND@" \
#                   "floor=target/release/hyper-floor --listen 127.0.0.1:@PORT@ --backend @BACKEND@" nginx
#
# `nginx` alone is nginx from bench/conf/nginx.conf.in as one process (one worker, no master);
# `haproxy` alone is HAProxy from bench/conf/haproxy.cfg.in (one thread per CPU it may use).
# Knobs: DUR=3 seconds per measured run, PROXY_CPUS=1, LOAD_CPUS=0, PORT_BASE=19100,
# COUNT=1 to add the proxy's syscalls and context switches per request (perf stat; steadier
# than CPU time on a noisy machine; tracing every syscall slows the proxy, so compare CPU
# times only between runs with the same COUNT).
# Needs a release build of the bench tools (cargo build --release -p chatgate-bench) and wrk.
set -euo pipefail

case ${LOAD:-http} in
http | ws) ;;
*)
    echo "LOAD=$LOAD: use http (the default) or ws" >&2
    exit 1
    ;;
esac

ROUNDS=$1
shift
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
DUR=${DUR:-3}
PROXY_CPUS=${PROXY_CPUS:-1}
LOAD_CPUS=${LOAD_CPUS:-0}
port=${PORT_BASE:-19100}
BACKEND=127.0.0.1:$((port - 20))
WORK=$(mktemp -d /tmp/chatgate-pair.XXXXXX)
KEEP_WORK=0
log() { printf '[pair %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
# Process bookkeeping (STARTED, stop_pid, cleanup and the traps).
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

taskset -c "$LOAD_CPUS" "$BIN/bench-backend" --listen "$BACKEND" >/dev/null 2>&1 &
STARTED+=($!)

start_nginx() {
    local dir=$WORK/nginx-$1
    mkdir -p "$dir/logs"
    sed -e "s#@PREFIX@#$dir#g" -e "s/@PORT@/$1/g" -e "s/@BACKEND_PORT@/${BACKEND##*:}/g" \
        -e "s/@WORKER_CONNECTIONS@/4096/g" -e "s/@WORKER_PROCESSES@/1/g" -e "s/@RLIMIT_NOFILE@/8192/g" \
        "$ROOT/bench/conf/nginx.conf.in" >"$dir/nginx.conf"
    exec taskset -c "$PROXY_CPUS" nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/logs/error.log" \
        -g 'daemon off; master_process off;'
}

start_haproxy() {
    local cfg=$WORK/haproxy-$1.cfg
    sed -e "s/@PORT@/$1/g" -e "s/@BACKEND_PORT@/${BACKEND##*:}/g" -e "s/@MAXCONN@/4096/g" \
        "$ROOT/bench/conf/haproxy.cfg.in" >"$cfg"
    exec taskset -c "$PROXY_CPUS" haproxy -f "$cfg" -db
}

# The measured load on port $1 for DUR seconds (and a 1 s warm-up when $2 is "warm"):
# prints "COUNT RATE", requests or messages and their rate per second.
load() {
    local secs=$DUR out
    [[ $2 == warm ]] && secs=1
    if [[ ${LOAD:-http} == ws ]]; then
        out=$(taskset -c "$LOAD_CPUS" "$BIN/ws-load" --url "ws://127.0.0.1:$1/ws/echo" --connections 64 \
            --duration "$secs") || true
        grep -q 'errors=0' <<<"$out" || { echo "ws-load reported errors on port $1: $out" >&2; exit 1; }
        [[ $2 == warm ]] || sed -n 's/.*messages=\([0-9]*\).*msgs_per_s=\([0-9.]*\).*/\1 \2/p' <<<"$out"
    else
        out=$(taskset -c "$LOAD_CPUS" wrk -t1 -c64 -d"${secs}s" "http://127.0.0.1:$1/page")
        if grep -q -e 'Non-2xx' -e 'Socket errors' <<<"$out"; then
            echo "wrk saw errors on port $1: $out" >&2
            exit 1
        fi
        [[ $2 == warm ]] || awk '/requests in/ {q = $1} /Requests\/sec/ {r = $2} END {print q, r}' <<<"$out"
    fi
}
UNIT=req
[[ ${LOAD:-http} == ws ]] && UNIT=msg

cpu() { awk '{print $14, $15}' "/proc/$1/stat"; }
TICK_US=$((1000000 / $(getconf CLK_TCK)))

for round in $(seq 1 "$ROUNDS"); do
    for spec in "$@"; do
        port=$((port + 1))
        if [[ $spec == nginx ]]; then
            name=nginx
            start_nginx "$port" >"$WORK/$port.log" 2>&1 &
        elif [[ $spec == haproxy ]]; then
            name=haproxy
            start_haproxy "$port" >"$WORK/$port.log" 2>&1 &
        else
            name=${spec%%=*}
            cmd=${spec#*=}
            cmd=${cmd//@PORT@/$port}
            cmd=${cmd//@BACKEND@/$BACKEND}
            # The command is split into words on purpose.
            # shellcheck disable=SC2086
            taskset -c "$PROXY_CPUS" $cmd >"$WORK/$port.log" 2>&1 &
        fi
        pid=$!
        STARTED+=("$pid")
        for _ in $(seq 1 100); do
            curl -s -o /dev/null "http://127.0.0.1:$port/page" && break
            sleep 0.05
        done
        load "$port" warm
        if [[ ${COUNT:-0} == 1 ]]; then
            perf stat -x, -e raw_syscalls:sys_enter,context-switches -p "$pid" -o "$WORK/perf" &
            perf_pid=$!
            STARTED+=("$perf_pid")
            sleep 0.1
        fi
        read -r u0 s0 < <(cpu "$pid")
        # A command substitution, so that a failed load stops the script here (set -e).
        measured=$(load "$port" measured)
        read -r requests rps <<<"$measured"
        [[ -n ${requests:-} && $requests != 0 ]] || { echo "$name round $round: no load measured" >&2; exit 1; }
        read -r u1 s1 < <(cpu "$pid")
        counts=""
        if [[ ${COUNT:-0} == 1 ]]; then
            kill -INT "$perf_pid" 2>/dev/null || true
            wait "$perf_pid" 2>/dev/null || true
            forget_pid "$perf_pid"
            [[ -s $WORK/perf ]] || { echo "perf stat could not count (COUNT=1 needs perf and tracepoints)" >&2; exit 1; }
            counts=$(awk -F, -v q="$requests" -v unit="$UNIT" \
                '/sys_enter/ {s = $1} /context-switches/ {c = $1} END {printf "  syscalls %.2f  switches %.3f /%s", s / q, c / q, unit}' "$WORK/perf")
        fi
        awk -v n="$name" -v r="$round" -v rps="$rps" -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v q="$requests" -v t="$TICK_US" \
            -v c="$counts" -v unit="$UNIT" 'BEGIN { printf "%-14s round %d: %8.0f %s/s  user %5.2f  sys %5.2f  total %5.2f us/%s%s\n", n, r, rps, unit, u * t / q, s * t / q, (u + s) * t / q, unit, c }'
        stop_pid "$pid"
    done
done
