#!/usr/bin/env bash
# Run the product for real: the example Chainlit app behind chatgate.
#
#   scripts/demo.sh            # then open the printed URL; Ctrl-C stops both
#
# It creates a venv in target/demo/venv with the pinned Chainlit
# (examples/chainlit/requirements.txt), builds chatgate (`cargo build
# --release`), then starts Chainlit on 127.0.0.1:8080 and chatgate on
# 127.0.0.1:8000 through ./entrypoint.sh (the container's supervisor), which
# starts the backend first, waits until it answers, then starts chatgate.
#
# Needs: python3 with venv (Debian: apt-get install python3-venv), cargo, curl.
#
# Environment:
#   DEMO_LISTEN        chatgate's listen address [127.0.0.1:8000]; 0.0.0.0:8000
#                      to reach it from other machines
#   DEMO_BACKEND_PORT  Chainlit's port on 127.0.0.1 [8080]
#   DEMO_PROFILE       release | debug [release]
#   DEMO_NO_ENTRYPOINT=1  start the two processes directly instead of through
#                      entrypoint.sh
#   CHATGATE_*         passed to chatgate (the demo defaults LOG_FORMAT=text,
#                      SHUTDOWN_GRACE=5, ADMIN_LISTEN=127.0.0.1:9100 or off)
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
DEMO_DIR="$ROOT/target/demo"
VENV="$DEMO_DIR/venv"
APP="$ROOT/examples/chainlit/app.py"
APPROOT="$DEMO_DIR/app-root" # Chainlit's .chainlit/, .files/, chainlit.md go here
LISTEN=${DEMO_LISTEN:-127.0.0.1:8000}
# entrypoint.sh reads BACKEND_PORT too (its TCP fallback check).
export BACKEND_PORT=${DEMO_BACKEND_PORT:-8080}
PROFILE=${DEMO_PROFILE:-release}
PORT=${LISTEN##*:}
URL="http://127.0.0.1:$PORT"

pids=()

say() { printf 'demo: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null; }

# SIGTERM each process we started, wait a bounded time, then SIGKILL.
stop_all() {
    trap - INT TERM EXIT
    local pid deadline
    [ ${#pids[@]} -gt 0 ] || return 0
    say "stopping (pids ${pids[*]})"
    # Reverse order: chatgate (or the entrypoint) before the backend.
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        pid=${pids[i]}
        alive "$pid" || continue
        kill -TERM "$pid" 2>/dev/null
        # entrypoint.sh drains chatgate (grace 5 s) and then stops the backend.
        deadline=$((SECONDS + 20))
        while alive "$pid" && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
        if alive "$pid"; then
            say "pid $pid did not stop in 20 s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null
        fi
        wait "$pid" 2>/dev/null
    done
    pids=()
    say "stopped"
}
trap 'stop_all; exit 130' INT
trap 'stop_all; exit 143' TERM
trap stop_all EXIT

port_free() {
    ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

wait_http_200() { # url seconds
    local deadline=$((SECONDS + $2))
    while [ $SECONDS -lt $deadline ]; do
        [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$1")" = 200 ] && return 0
        for pid in "${pids[@]}"; do alive "$pid" || return 1; done
        sleep 0.5
    done
    return 1
}

# ---- prerequisites
command -v python3 >/dev/null || die "python3 is missing (Debian: apt-get install python3 python3-venv)"
python3 -c 'import ensurepip, venv' 2>/dev/null || die "python3 venv is missing (Debian: apt-get install python3-venv)"
command -v cargo >/dev/null || die "cargo is missing (https://rustup.rs)"
command -v curl >/dev/null || die "curl is missing (Debian: apt-get install curl)"
port_free "$PORT" || die "port $PORT is in use (set DEMO_LISTEN)"
port_free "$BACKEND_PORT" || die "port $BACKEND_PORT is in use (set DEMO_BACKEND_PORT)"

# ---- Chainlit in a venv (reinstalled only when the pin changes)
mkdir -p "$DEMO_DIR" "$APPROOT"
stamp=$(sha256sum examples/chainlit/requirements.txt | cut -c1-16)
if [ "$(cat "$VENV/.demo-stamp" 2>/dev/null)" != "$stamp" ]; then
    say "installing $(cat examples/chainlit/requirements.txt) into $VENV (about a minute)"
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV" || die "python3 -m venv failed"
    "$VENV/bin/pip" install -q --disable-pip-version-check -r examples/chainlit/requirements.txt ||
        die "pip install failed"
    echo "$stamp" >"$VENV/.demo-stamp"
fi

# ---- chatgate
if [ "$PROFILE" = release ]; then
    say "building chatgate (cargo build --release; the first build takes a few minutes)"
    cargo build --release || die "cargo build --release failed"
else
    cargo build || die "cargo build failed"
fi
CHATGATE="$ROOT/target/$PROFILE/chatgate"

# ---- run
BACKEND_CMD="cd '$APPROOT' && CHAINLIT_APP_ROOT='$APPROOT' exec '$VENV/bin/chainlit' run '$APP' --host 127.0.0.1 --port $BACKEND_PORT --headless"
export CHATGATE_LISTEN="$LISTEN"
export CHATGATE_BACKEND="http://127.0.0.1:$BACKEND_PORT"
export CHATGATE_SHUTDOWN_GRACE=${CHATGATE_SHUTDOWN_GRACE:-5}
export CHATGATE_LOG_FORMAT=${CHATGATE_LOG_FORMAT:-text}
# Metrics on loopback only (chatgate's default is 0.0.0.0:9100); off when 9100
# is taken, rather than failing the demo.
if [ -z "${CHATGATE_ADMIN_LISTEN:-}" ]; then
    if port_free 9100; then CHATGATE_ADMIN_LISTEN=127.0.0.1:9100; else CHATGATE_ADMIN_LISTEN=off; fi
fi
export CHATGATE_ADMIN_LISTEN
metrics_hint=""
[ "$CHATGATE_ADMIN_LISTEN" = off ] ||
    metrics_hint="curl -s http://127.0.0.1:${CHATGATE_ADMIN_LISTEN##*:}/monitor/metrics | head"

if [ -x "$ROOT/entrypoint.sh" ] && [ "${DEMO_NO_ENTRYPOINT:-}" != 1 ]; then
    say "starting Chainlit and chatgate through entrypoint.sh"
    # entrypoint.sh's interface (see its header): backend command, how to
    # tell it is up, which chatgate to start.
    BACKEND_CMD="$BACKEND_CMD" \
        BACKEND_HEALTH_URL="http://127.0.0.1:${BACKEND_PORT}/health" \
        BACKEND_HOST=127.0.0.1 \
        CHATGATE_BIN="$CHATGATE" \
        "$ROOT/entrypoint.sh" &
    pids+=($!)
else
    say "starting Chainlit on 127.0.0.1:$BACKEND_PORT"
    bash -c "$BACKEND_CMD" &
    pids+=($!)
    wait_http_200 "http://127.0.0.1:$BACKEND_PORT/health" 60 || die "Chainlit did not come up"
    say "starting chatgate on $LISTEN"
    "$CHATGATE" &
    pids+=($!)
fi

wait_http_200 "$URL/monitor/health" 90 || die "chatgate did not report healthy at $URL/monitor/health"
cat >&2 <<EOF

  chatgate is serving the example Chainlit app:

      $URL/

  Try:  curl -s $URL/monitor/health
        curl -si $URL/chat | head -3        (307 to /)
        ${metrics_hint}
  Type a message in the page: the reply streams back over a WebSocket.
  Ctrl-C stops both.

EOF

# Until Ctrl-C, or until a process we started exits on its own.
while true; do
    for pid in "${pids[@]}"; do
        if ! alive "$pid"; then
            wait "$pid" 2>/dev/null
            say "pid $pid exited on its own (status $?)"
            exit 1
        fi
    done
    sleep 1 &
    wait $! 2>/dev/null
done
