#!/usr/bin/env bash
# End-to-end tests: chatgate in front of a real Chainlit (examples/chainlit),
# exercised by a python-socketio client, plain HTTP, and Debian's Chromium.
#
#   tests/e2e/run.sh            # ends with "N passed, M failed"; exit 1 if M > 0
#
# On a fresh Debian machine it installs what it needs: chromium, python3-venv,
# nodejs/npm, curl (apt, only when missing), a venv in target/e2e/venv with
# tests/e2e/requirements.txt, and tests/e2e/node_modules (playwright-core
# only: it drives /usr/bin/chromium, no browser download). It runs
# `cargo build` and tests target/debug/chatgate.
#
# Only loopback is used. It starts Chainlit and chatgate on free 127.0.0.1
# ports and stops exactly those processes, by PID (SIGTERM, bounded wait,
# SIGKILL). Logs and screenshots: target/e2e/run/.
#
# Environment:
#   E2E_DIRECT=1          test bare Chainlit (no chatgate); chatgate-only checks SKIP
#   E2E_CHATGATE_BIN      chatgate binary to test instead (no cargo build)
#   E2E_NO_BUILD=1        test target/debug/chatgate as it is (no cargo build)
#   E2E_CHATGATE_ARGS     extra chatgate arguments, e.g. "--auth-stub off" (proves
#                         the tests can fail)
#   E2E_ALLOWED_ORIGINS   chatgate's --allowed-origins [its own origin]; "" = any
#   E2E_IDLE_SECONDS      idle period of the heartbeat test [30]
#   E2E_APT=always        run apt-get update/install even if nothing is missing
#   E2E_NO_WORKERS=1      skip the several-workers part (two supervised Chainlit
#                         workers, then two Chainlits behind --backend a,b)
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT" || exit 2
E2E_DIR="$ROOT/target/e2e"
STATE="$E2E_DIR/run"
VENV="$E2E_DIR/venv"
HERE="$ROOT/tests/e2e"
CHATGATE_BIN=${E2E_CHATGATE_BIN:-$ROOT/target/debug/chatgate}
IDLE_SECONDS=${E2E_IDLE_SECONDS:-30}
DIRECT=${E2E_DIRECT:-0}

RESULTS="$STATE/results.txt"
chatgate_pid=""
idle_pid=""
chat_gate_pid=""
workers_gate_pid=""
external_states=()

say() { printf 'e2e: %s\n' "$*" >&2; }

# ---------------------------------------------------------------- processes

alive() { # pid: ours, running, not a zombie
    local state
    [ -r "/proc/$1/stat" ] || return 1
    state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
    [ "$state" != "Z" ]
}

stop_pid() { # pid name wait-seconds: SIGTERM, bounded wait, SIGKILL
    local pid=$1 name=$2 deadline
    [ -n "$pid" ] || return 0
    if alive "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true
        deadline=$((SECONDS + $3))
        while alive "$pid" && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
        if alive "$pid"; then
            say "$name (pid $pid) still running after ${3}s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    trap - EXIT INT TERM
    stop_pid "$idle_pid" "idle test" 2
    stop_pid "${chat_gate_pid:-}" "rate-limited chatgate" 10
    stop_pid "$chatgate_pid" chatgate 10
    # chatgate stops the workers it supervises after its own drain.
    stop_pid "$workers_gate_pid" "chatgate (workers)" 30
    [ -f "$STATE/backend.env" ] && E2E_STATE="$STATE" "$HERE/backend.sh" stop 2>>"$STATE/backend.log"
    local state
    for state in "${external_states[@]}"; do
        E2E_STATE="$state" "$HERE/backend.sh" stop 2>>"$state/backend.log"
    done
}

summary() {
    local passed failed
    passed=$(grep -c '^PASS ' "$RESULTS" 2>/dev/null)
    failed=$(grep -c '^FAIL ' "$RESULTS" 2>/dev/null)
    cleanup
    echo "${passed:-0} passed, ${failed:-0} failed"
    if [ "${failed:-0}" -gt 0 ] || [ "${passed:-0}" -eq 0 ]; then exit 1; fi
    exit 0
}

# A setup step failed: record it as a failure and end with the summary line.
abort() {
    echo "FAIL e2e_setup: $*" | tee -a "$RESULTS"
    summary
}

# Run one test program with a time limit; its PASS/FAIL/SKIP lines go to the
# results. A program that dies without reporting a failure counts as one.
run_tests() { # name seconds cmd...
    local name=$1 limit=$2 out="$STATE/$1.out" status
    shift 2
    timeout --kill-after=10 "$limit" "$@" >"$out" 2>"$STATE/$name.err"
    status=$?
    record "$name" "$status" "$out"
}

record() { # name status outfile
    cat "$3"
    grep -E '^(PASS|FAIL|SKIP) ' "$3" >>"$RESULTS"
    if [ "$2" -ne 0 ] && ! grep -q '^FAIL ' "$3"; then
        echo "FAIL $1: exited with status $2 (see target/e2e/run/$1.err)" | tee -a "$RESULTS"
    fi
}

free_port() {
    "$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# The first of two consecutive free ports (for --worker-port-base).
free_port_pair() {
    "$VENV/bin/python" - <<'EOF'
import socket
for _ in range(100):
    a = socket.socket(); a.bind(("127.0.0.1", 0)); port = a.getsockname()[1]
    b = socket.socket()
    try:
        b.bind(("127.0.0.1", port + 1))
    except OSError:
        continue
    finally:
        a.close(); b.close()
    print(port)
    break
EOF
}

# Both workers of the chatgate at $1 reachable (its /monitor/health says so).
wait_workers_up() { # base-url seconds pid-to-watch
    local deadline=$((SECONDS + $2))
    while [ $SECONDS -lt $deadline ]; do
        curl -s --max-time 2 "$1/monitor/health" | grep -q '"workers_up":2' && return 0
        [ -n "${3:-}" ] && ! alive "$3" && return 1
        sleep 0.3
    done
    return 1
}

wait_http_200() { # url seconds pid-to-watch
    local deadline=$((SECONDS + $2))
    while [ $SECONDS -lt $deadline ]; do
        [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$1")" = 200 ] && return 0
        [ -n "${3:-}" ] && ! alive "$3" && return 1
        sleep 0.2
    done
    return 1
}

# ---------------------------------------------------------------- setup

install_system_packages() {
    local need=()
    [ -x /usr/bin/chromium ] || need+=(chromium)
    command -v python3 >/dev/null || need+=(python3)
    python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
    command -v node >/dev/null || need+=(nodejs)
    command -v npm >/dev/null || need+=(npm)
    command -v curl >/dev/null || need+=(curl)
    if [ ${#need[@]} -eq 0 ] && [ "${E2E_APT:-}" != always ]; then return 0; fi
    [ ${#need[@]} -eq 0 ] && need=(chromium)
    local sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(sudo -n)
    say "installing with apt: ${need[*]}"
    if ! { "${sudo[@]}" apt-get update -q &&
        DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q --no-install-recommends \
            "${need[@]}"; } >"$STATE/apt.log" 2>&1; then
        abort "apt-get install ${need[*]} failed (see target/e2e/run/apt.log)"
    fi
}

stamp_of() { cat "$@" | sha256sum | cut -c1-16; }

install_python_deps() {
    local stamp
    stamp=$(stamp_of "$HERE/requirements.txt" "$ROOT/examples/chainlit/requirements.txt")
    if [ "$(cat "$VENV/.e2e-stamp" 2>/dev/null)" = "$stamp" ]; then return 0; fi
    say "creating venv $VENV (pinned Chainlit, python-socketio client)"
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV" >"$STATE/pip.log" 2>&1 ||
        abort "python3 -m venv failed (see target/e2e/run/pip.log)"
    (cd "$HERE" && "$VENV/bin/pip" install -q --disable-pip-version-check -r requirements.txt) \
        >>"$STATE/pip.log" 2>&1 || abort "pip install failed (see target/e2e/run/pip.log)"
    echo "$stamp" >"$VENV/.e2e-stamp"
}

install_node_deps() {
    local stamp
    stamp=$(stamp_of "$HERE/package-lock.json")
    if [ "$(cat "$HERE/node_modules/.e2e-stamp" 2>/dev/null)" = "$stamp" ]; then return 0; fi
    say "npm ci in tests/e2e (playwright-core, no browser download)"
    (cd "$HERE" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund) \
        >"$STATE/npm.log" 2>&1 || abort "npm ci failed (see target/e2e/run/npm.log)"
    echo "$stamp" >"$HERE/node_modules/.e2e-stamp"
}

# A fresh app root per run, outside the repo (Chainlit writes .chainlit/,
# .files/ and chainlit.md there). Its config says default_theme = "light", so
# a dark UI through chatgate proves chatgate's /auth/config stub is in effect.
prepare_app_root() {
    "$VENV/bin/python" - "$1" <<'EOF' || abort "could not write the Chainlit config"
import os, sys
root = sys.argv[1]
os.makedirs(os.path.join(root, ".chainlit"), exist_ok=True)
os.chdir(root)
os.environ["CHAINLIT_APP_ROOT"] = root
from chainlit.config import DEFAULT_CONFIG_STR
old = '# default_theme = "dark"'
assert old in DEFAULT_CONFIG_STR, "Chainlit's config template changed"
with open(os.path.join(root, ".chainlit", "config.toml"), "w") as f:
    f.write(DEFAULT_CONFIG_STR.replace(old, 'default_theme = "light"'))
EOF
}

# ---------------------------------------------------------------- main

rm -rf "$STATE"
mkdir -p "$STATE"
: >"$RESULTS"
trap 'echo "FAIL e2e_interrupted: interrupted" >>"$RESULTS"; summary' INT TERM
trap cleanup EXIT
started=$SECONDS

install_system_packages
install_python_deps
install_node_deps

# `cargo build` (the dev profile the unit tests use) is a no-op when the
# binary is current, and keeps the suite from testing a stale one.
if [ "$DIRECT" != 1 ] && [ -z "${E2E_CHATGATE_BIN:-}" ] && [ "${E2E_NO_BUILD:-}" != 1 ]; then
    say "cargo build"
    cargo build >"$STATE/cargo.log" 2>&1 || abort "cargo build failed (see target/e2e/run/cargo.log)"
fi
[ "$DIRECT" = 1 ] || [ -x "$CHATGATE_BIN" ] || abort "no chatgate binary at $CHATGATE_BIN"

BACKEND_PORT=$(free_port) || abort "no free port"
APPROOT="$STATE/approot"
prepare_app_root "$APPROOT"
cat >"$STATE/backend.env" <<EOF
E2E_VENV='$VENV'
E2E_APP='$ROOT/examples/chainlit/app.py'
E2E_APPROOT='$APPROOT'
E2E_BACKEND_PORT='$BACKEND_PORT'
EOF
export E2E_STATE="$STATE"
"$HERE/backend.sh" start 2>>"$STATE/backend.log" || abort "Chainlit did not start (see target/e2e/run/backend.log)"

if [ "$DIRECT" = 1 ]; then
    BASE="http://127.0.0.1:$BACKEND_PORT"
    say "E2E_DIRECT=1: testing bare Chainlit at $BASE"
else
    GATE_PORT=$(free_port) || abort "no free port"
    BASE="http://127.0.0.1:$GATE_PORT"
    # Production-like: only our own origin may open Socket.IO sessions, so the
    # browser's real Origin headers are checked against the allow-list.
    ALLOWED_ORIGINS=${E2E_ALLOWED_ORIGINS-$BASE}
    # shellcheck disable=SC2086 # E2E_CHATGATE_ARGS is a list of words on purpose
    "$CHATGATE_BIN" --listen "127.0.0.1:$GATE_PORT" --backend "http://127.0.0.1:$BACKEND_PORT" \
        --admin-listen 127.0.0.1:0 --shutdown-grace 5 --allowed-origins "$ALLOWED_ORIGINS" \
        ${E2E_CHATGATE_ARGS:-} >"$STATE/chatgate.log" 2>&1 </dev/null &
    chatgate_pid=$!
    wait_http_200 "$BASE/monitor/live" 30 "$chatgate_pid" ||
        abort "chatgate did not answer $BASE/monitor/live; its log ends: $(tail -c 400 "$STATE/chatgate.log" | tr '\n' ' ')"
    say "chatgate (pid $chatgate_pid) at $BASE -> Chainlit on port $BACKEND_PORT"
fi

http_flags=()
[ "$DIRECT" = 1 ] && http_flags=(--direct)
[ -n "${ALLOWED_ORIGINS:-}" ] && http_flags+=(--allowed-origins "$ALLOWED_ORIGINS")

# The idle-connection test takes E2E_IDLE_SECONDS: run it alongside the
# others, and let it finish before the browser test restarts the backend.
timeout --kill-after=10 $((IDLE_SECONDS + 60)) "$VENV/bin/python" "$HERE/socketio_test.py" --url "$BASE" \
    --idle-seconds "$IDLE_SECONDS" --only socketio_idle_connection_survives_ping_interval \
    >"$STATE/socketio_idle.out" 2>"$STATE/socketio_idle.err" &
idle_pid=$!

run_tests http 60 "$VENV/bin/python" "$HERE/http_test.py" --url "$BASE" "${http_flags[@]}"
run_tests socketio 60 "$VENV/bin/python" "$HERE/socketio_test.py" --url "$BASE" \
    --only socketio_polling_handshake_upgrades_and_streams_reply --only socketio_websocket_only_streams_reply

wait "$idle_pid"
record socketio_idle $? "$STATE/socketio_idle.out"
idle_pid=""

E2E_BASE_URL="$BASE" E2E_OUT="$STATE" E2E_DIRECT="$DIRECT" E2E_BACKEND_CTL="$HERE/backend.sh" \
    run_tests browser 300 node "$HERE/browser_test.mjs"

# The chat-aware edge (issue 14): chatgates of its own in front of the same Chainlit.
if [ "$DIRECT" != 1 ]; then
    run_tests chat_edge 120 "$VENV/bin/python" "$HERE/chat_edge_test.py" \
        --chatgate "$CHATGATE_BIN" --backend-port "$BACKEND_PORT"
    CHAT_PORT=$(free_port) || abort "no free port"
    "$CHATGATE_BIN" --listen "127.0.0.1:$CHAT_PORT" --backend "http://127.0.0.1:$BACKEND_PORT" \
        --admin-listen off --chat-rate-limit 3/minute >"$STATE/chatgate-chat.log" 2>&1 </dev/null &
    chat_gate_pid=$!
    if wait_http_200 "http://127.0.0.1:$CHAT_PORT/monitor/health" 30 "$chat_gate_pid"; then
        E2E_CHAT_URL="http://127.0.0.1:$CHAT_PORT" E2E_OUT="$STATE" \
            run_tests chat_edge_browser 120 node "$HERE/chat_edge_browser.mjs"
    else
        echo "FAIL chat_edge_browser: the rate-limited chatgate did not start" | tee -a "$RESULTS"
    fi
    stop_pid "$chat_gate_pid" "rate-limited chatgate" 10
    chat_gate_pid=""
fi

# ---------------------------------------------------------------- workers
# Several Chainlit processes behind one chatgate, each chat kept on its own.

# Supervised: chatgate starts two Chainlit workers from one app directory (each
# gets its own app root under it: .chatgate/worker-<i>/, its own .files).
run_supervised_workers() {
    local app="$STATE/workers-app" port base url pids pid left=()
    prepare_app_root "$app"
    ln -sf "$ROOT/examples/chainlit/app.py" "$app/app.py"
    port=$(free_port) || abort "no free port"
    base=$(free_port_pair) || abort "no two free ports"
    url="http://127.0.0.1:$port"
    "$CHATGATE_BIN" --listen "127.0.0.1:$port" --admin-listen 127.0.0.1:0 --shutdown-grace 5 \
        --allowed-origins "$url" --health-interval 1 --workers 2 --worker-port-base "$base" \
        --worker-app-dir "$app" --worker-stop-timeout 10 --log-format json \
        -- "$VENV/bin/chainlit" run app.py --host 127.0.0.1 --port '{port}' --headless \
        >"$STATE/chatgate-workers.log" 2>&1 </dev/null &
    workers_gate_pid=$!
    wait_workers_up "$url" 90 "$workers_gate_pid" ||
        abort "the supervised workers did not come up; chatgate's log ends: $(tail -c 600 "$STATE/chatgate-workers.log" | tr '\n' ' ')"
    say "chatgate (pid $workers_gate_pid) at $url supervising 2 Chainlit workers (ports $base, $((base + 1)))"

    run_tests workers 240 "$VENV/bin/python" "$HERE/workers_test.py" --url "$url" --mode supervised
    # The last test stopped a worker: chatgate restarts it; the browser test wants both.
    wait_workers_up "$url" 60 "$workers_gate_pid" || abort "a supervised worker did not come back"
    E2E_BASE_URL="$url" E2E_OUT="$STATE" run_tests browser_workers 240 node "$HERE/browser_workers.mjs"

    # Every worker chatgate ever started must be gone once chatgate has stopped.
    pids=$(grep -o '"message":"worker started","worker":[0-9]*,"pid":[0-9]*' "$STATE/chatgate-workers.log" |
        sed 's/.*"pid"://')
    stop_pid "$workers_gate_pid" "chatgate (workers)" 30
    workers_gate_pid=""
    for pid in $pids; do alive "$pid" && left+=("$pid"); done
    if [ -z "$pids" ]; then
        echo "FAIL e2e_workers_stop_with_chatgate: no 'worker started' line in the log" | tee -a "$RESULTS"
    elif [ ${#left[@]} -gt 0 ]; then
        echo "FAIL e2e_workers_stop_with_chatgate: still running after chatgate stopped: ${left[*]}" | tee -a "$RESULTS"
    else
        echo "PASS e2e_workers_stop_with_chatgate ($(echo "$pids" | wc -w) worker processes over the run, none left)" |
            tee -a "$RESULTS"
    fi
}

# Started elsewhere: two Chainlits this script starts, chatgate --backend a,b.
run_external_workers() {
    local i state port url backends=() pids=()
    for i in 0 1; do
        state="$STATE/external-$i"
        mkdir -p "$state"
        prepare_app_root "$state/approot"
        port=$(free_port) || abort "no free port"
        cat >"$state/backend.env" <<EOF
E2E_VENV='$VENV'
E2E_APP='$ROOT/examples/chainlit/app.py'
E2E_APPROOT='$state/approot'
E2E_BACKEND_PORT='$port'
EOF
        external_states+=("$state")
        E2E_STATE="$state" "$HERE/backend.sh" start 2>>"$state/backend.log" ||
            abort "external Chainlit $i did not start (see target/e2e/run/external-$i/backend.log)"
        backends+=("http://127.0.0.1:$port")
        pids+=(--pid "$(cat "$state/backend.pid")")
    done
    port=$(free_port) || abort "no free port"
    url="http://127.0.0.1:$port"
    "$CHATGATE_BIN" --listen "127.0.0.1:$port" --admin-listen 127.0.0.1:0 --shutdown-grace 5 \
        --allowed-origins "$url" --health-interval 1 --backend "$(IFS=,; echo "${backends[*]}")" \
        >"$STATE/chatgate-external.log" 2>&1 </dev/null &
    workers_gate_pid=$!
    wait_workers_up "$url" 60 "$workers_gate_pid" || abort "chatgate --backend a,b did not see both workers"
    say "chatgate (pid $workers_gate_pid) at $url -> --backend ${backends[*]}"
    run_tests workers_external 180 "$VENV/bin/python" "$HERE/workers_test.py" --url "$url" \
        --mode external "${pids[@]}"
    stop_pid "$workers_gate_pid" "chatgate (external workers)" 15
    workers_gate_pid=""
}

if [ "$DIRECT" != 1 ] && [ "${E2E_NO_WORKERS:-}" != 1 ]; then
    # The single-backend part is done: its Chainlit and chatgate are not needed any more.
    E2E_STATE="$STATE" "$HERE/backend.sh" stop 2>>"$STATE/backend.log"
    stop_pid "$chatgate_pid" chatgate 10
    chatgate_pid=""
    run_supervised_workers
    run_external_workers
fi

say "done in $((SECONDS - started)) s; logs and screenshots in target/e2e/run/"
summary

