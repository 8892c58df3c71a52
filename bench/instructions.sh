#!/usr/bin/env bash
# Instructions per proxied request, counted by valgrind's callgrind (bench/NOTES.md, issue
# 12): deterministic where CPU time on a shared machine is not, so it settles A/B questions
# of a few percent. User-space instructions only; syscalls are counted by pair.sh COUNT=1.
#
#   bench/instructions.sh 'command with @PORT@ and @BACKEND@' [callgrind_annotate options]
#   bench/instructions.sh "target/release/chatgate --listen 127.0.0.1:@PORT@ --backend http://@BACKEND@ --admin-listen off"
#
# The proxy runs under callgrind on one CPU (so chatgate picks its current-thread runtime),
# is warmed up, then its counters are zeroed, loaded with wrk (8 connections, GET 2 KiB) for
# DUR seconds and dumped. Prints Ir per request, then the top functions (inclusive) when the
# binary has symbols. LOAD=ws counts per WebSocket echo round trip instead (ws-load, 8
# relays, 128-byte messages). Knobs: DUR=10, PORT_BASE=19480, KEEP=FILE to keep the dump,
# BACKEND_BIN (default: bench-backend beside the release build, else in target/release).
# Needs valgrind, wrk and a release build of bench-backend (and ws-load for LOAD=ws). Fails,
# naming the cause, when the backend does not come up, any measured response is a 4xx or 5xx
# (wrk's "Non-2xx or 3xx"), wrk saw socket errors, or ws-load saw errors: a count of error
# answers is not a count of proxied requests.
set -euo pipefail

COMMAND=$1
shift
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
DUR=${DUR:-10}
port=${PORT_BASE:-19480}
WORK=$(mktemp -d /tmp/chatgate-instr.XXXXXX)
KEEP_WORK=0
log() { printf '[instructions %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
# Process bookkeeping (STARTED, stop_pid, cleanup and the traps).
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

case ${LOAD:-http} in
http | ws) ;;
*)
    echo "LOAD=$LOAD: use http (the default) or ws" >&2
    exit 1
    ;;
esac
if [[ -n ${BACKEND_BIN:-} && ! -x $BACKEND_BIN ]]; then
    echo "BACKEND_BIN=$BACKEND_BIN is not an executable" >&2
    exit 1
fi
if [[ -z ${BACKEND_BIN:-} ]]; then
    BACKEND_BIN=$BIN/bench-backend
    [[ -x $BACKEND_BIN ]] || BACKEND_BIN=$ROOT/target/release/bench-backend
fi
if [[ ! -x $BACKEND_BIN ]]; then
    echo "no bench-backend at $BIN or $ROOT/target/release: cargo build --release -p chatgate-bench" >&2
    exit 1
fi
taskset -c 0 "$BACKEND_BIN" --listen "127.0.0.1:$port" >"$WORK/backend.log" 2>&1 &
STARTED+=($!)
if ! wait_http_200 "http://127.0.0.1:$port/page" 10; then
    echo "bench-backend did not answer on 127.0.0.1:$port; its log: $WORK/backend.log" >&2
    exit 1
fi
cmd=${COMMAND//@PORT@/$((port + 1))}
cmd=${cmd//@BACKEND@/127.0.0.1:$port}
# The command is split into words on purpose.
# shellcheck disable=SC2086
taskset -c 1 valgrind --tool=callgrind --callgrind-out-file="$WORK/out" $cmd >"$WORK/log" 2>"$WORK/valgrind" &
pid=$!
STARTED+=("$pid")
url=http://127.0.0.1:$((port + 1))/page
# Slow to start under valgrind.
if ! wait_http_200 "$url" 60; then
    echo "the proxy did not answer on $url under callgrind; its log: $WORK/valgrind" >&2
    exit 1
fi
if [[ ${LOAD:-http} == ws ]]; then
    # WebSocket echo: 8 relays, one 128-byte message in flight on each; a "request" is one
    # round trip (the proxy relays the message both ways).
    ws_url=ws://127.0.0.1:$((port + 1))/ws/echo
    ws_load=$(dirname "$BACKEND_BIN")/ws-load
    if [[ ! -x $ws_load ]]; then
        echo "no ws-load beside bench-backend ($ws_load): cargo build --release -p chatgate-bench" >&2
        exit 1
    fi
    # ws-load exits non-zero when it saw errors; its own line says which, reported below.
    taskset -c 0 "$ws_load" --url "$ws_url" --connections 8 --duration 2 >/dev/null || true
    callgrind_control -z "$pid" >/dev/null
    out=$(taskset -c 0 "$ws_load" --url "$ws_url" --connections 8 --duration "$DUR") || true
    callgrind_control -d "$pid" >/dev/null
    requests=$(sed -n 's/.*messages=\([0-9]*\).*/\1/p' <<<"$out")
    if ! grep -q 'errors=0' <<<"$out"; then
        echo "ws-load reported errors, so this is not a count of relayed messages: $out" >&2
        exit 1
    fi
else
    taskset -c 0 wrk -t1 -c8 -d2s "$url" >/dev/null
    callgrind_control -z "$pid" >/dev/null
    out=$(taskset -c 0 wrk -t1 -c8 -d"${DUR}s" "$url")
    callgrind_control -d "$pid" >/dev/null
    requests=$(awk '/requests in/ {print $1}' <<<"$out")
    if grep -q -e 'Non-2xx' -e 'Socket errors' <<<"$out"; then
        echo "some responses were errors, so this is not a count of proxied requests:" >&2
        echo "$out" >&2
        exit 1
    fi
fi
if [[ -z $requests || $requests == 0 ]]; then
    echo "no request was served under callgrind; its log: $WORK/valgrind" >&2
    cat "$WORK/valgrind" >&2
    exit 1
fi
# One dump: the one callgrind_control -d asked for (the zeroed counters since -z).
dump=$(find "$WORK" -name 'out.*' | sort | tail -1)
if [[ -n ${KEEP:-} ]]; then cp "$dump" "$KEEP"; fi
total=$(callgrind_annotate "$dump" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
unit=request
[[ ${LOAD:-http} == ws ]] && unit="round trip"
awk -v t="$total" -v q="$requests" -v u="$unit" 'BEGIN { printf "%d %ss, %.0f instructions per %s\n", q, u, t / q, u }'
# awk, not head: it reads to the end, so no SIGPIPE fails the script under pipefail.
callgrind_annotate --inclusive=yes "$@" "$dump" 2>/dev/null | sed -n '/file:function/,$p' | awk 'NR <= 60'
