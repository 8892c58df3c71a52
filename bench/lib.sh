# Process bookkeeping shared by the bench scripts (sourced, not run).
# Every long-running process a script starts goes into STARTED; cleanup stops exactly those
# PIDs (and the direct children they had, e.g. nginx's workers), never anything by name.
# The sourcing script defines log, WORK and KEEP_WORK first.
# shellcheck shell=bash

STARTED=()

stop_pid() {
    local pid=$1 children
    if ! kill -0 "$pid" 2>/dev/null; then
        forget_pid "$pid"
        return 0
    fi
    children=$(ps -o pid= --ppid "$pid" 2>/dev/null || true)
    kill -TERM "$pid" 2>/dev/null || true
    # Up to 25 s: chatgate drains for up to its --shutdown-grace (20 s).
    for _ in $(seq 1 250); do
        kill -0 "$pid" 2>/dev/null || break
        # A zombie is gone for our purposes; its parent reaps it.
        [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) == Z ]] && break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null && [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) != Z ]]; then
        kill -KILL "$pid" 2>/dev/null || true
    fi
    for child in $children; do
        kill -KILL "$child" 2>/dev/null || true
    done
    forget_pid "$pid"
}

# Drops a stopped PID from STARTED so a later reuse of the number is never signalled.
forget_pid() {
    local keep=() p
    for p in "${STARTED[@]}"; do
        [[ $p == "$1" ]] || keep+=("$p")
    done
    STARTED=("${keep[@]}")
}

# Waits until URL answers 200, for up to SECONDS; fails when it never does.
wait_http_200() { # url seconds
    local deadline=$((SECONDS + $2))
    while ((SECONDS < deadline)); do
        [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$1") == 200 ]] && return 0
        sleep 0.2
    done
    return 1
}

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    local i
    for ((i = ${#STARTED[@]} - 1; i >= 0; i--)); do
        stop_pid "${STARTED[i]}"
    done
    wait 2>/dev/null || true
    if [[ $KEEP_WORK == 1 || $status != 0 ]]; then
        log "raw outputs and logs kept in $WORK"
    else
        rm -rf "$WORK"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'log interrupted; exit 130' INT TERM
