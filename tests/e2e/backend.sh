#!/usr/bin/env bash
# Start, stop or restart the example Chainlit backend used by the e2e tests.
#
#   tests/e2e/backend.sh start|stop|restart
#
# State lives in $E2E_STATE (set by run.sh): backend.pid, backend.log, and the
# settings run.sh wrote to backend.env (E2E_VENV, E2E_APP, E2E_APPROOT,
# E2E_BACKEND_PORT). The browser test calls `restart` through this script so
# that the process is always stopped by the PID this script recorded, never by
# name. Only loopback addresses are used.
set -euo pipefail

: "${E2E_STATE:?E2E_STATE must point at the e2e state directory}"
# shellcheck source=/dev/null
. "$E2E_STATE/backend.env"

PIDFILE="$E2E_STATE/backend.pid"
LOG="$E2E_STATE/backend.log"
HEALTH_URL="http://127.0.0.1:$E2E_BACKEND_PORT/health"

# A PID is ours and alive if /proc has it, it is not a zombie, and it is the
# chainlit we started (guards against PID reuse after it exited).
alive() {
    local pid=$1 state
    [ -r "/proc/$pid/stat" ] || return 1
    state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
    [ "$state" != "Z" ] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q chainlit
}

start() {
    if [ -s "$PIDFILE" ] && alive "$(cat "$PIDFILE")"; then
        echo "backend already running (pid $(cat "$PIDFILE"))" >&2
        return 0
    fi
    mkdir -p "$E2E_APPROOT"
    # CHAINLIT_APP_ROOT keeps .chainlit/, .files/ and chainlit.md out of the repo.
    (
        cd "$E2E_APPROOT"
        CHAINLIT_APP_ROOT="$E2E_APPROOT" exec "$E2E_VENV/bin/chainlit" run "$E2E_APP" \
            --host 127.0.0.1 --port "$E2E_BACKEND_PORT" --headless
    ) >>"$LOG" 2>&1 </dev/null &
    echo $! >"$PIDFILE"
    local pid=$! deadline=$((SECONDS + 60))
    while [ $SECONDS -lt $deadline ]; do
        if curl -fsS --max-time 2 "$HEALTH_URL" >/dev/null 2>&1; then
            echo "backend up (pid $pid, port $E2E_BACKEND_PORT)" >&2
            return 0
        fi
        if ! alive "$pid"; then
            echo "backend exited during start-up; last log lines:" >&2
            tail -20 "$LOG" >&2
            return 1
        fi
        sleep 0.3
    done
    echo "backend not healthy at $HEALTH_URL within 60 s" >&2
    return 1
}

# SIGTERM, a bounded wait, then SIGKILL: Chainlit can take 20 s or more to
# exit on SIGTERM while keep-alive connections are open.
stop() {
    [ -s "$PIDFILE" ] || return 0
    local pid deadline
    pid=$(cat "$PIDFILE")
    if alive "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true
        deadline=$((SECONDS + ${E2E_STOP_WAIT:-5}))
        while alive "$pid" && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
        if alive "$pid"; then
            kill -KILL "$pid" 2>/dev/null || true
            deadline=$((SECONDS + 5))
            while alive "$pid" && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
        fi
    fi
    rm -f "$PIDFILE"
    echo "backend stopped (pid $pid)" >&2
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    restart) stop && start ;;
    *) echo "usage: $0 start|stop|restart" >&2; exit 2 ;;
esac
