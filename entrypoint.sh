#!/usr/bin/env bash
# entrypoint.sh: run the Chainlit backend and chatgate in one container and supervise both.
#
#  1. Start the backend (BACKEND_CMD) and wait, with bounded attempts, until it answers:
#     GET BACKEND_HEALTH_URL (Chainlit >= 2.10 serves /health), or a TCP connect to
#     BACKEND_HOST:BACKEND_PORT when that is empty or python3 is missing.
#  2. Start chatgate (CHATGATE_BIN, arguments of this script passed on), so it never serves
#     before its backend can answer.
#  3. Supervise, not exec: if either exits on its own, stop the other and exit non-zero.
#     On SIGTERM/SIGINT stop chatgate first (it turns readiness to 503 and closes WebSockets
#     with 1001 while the backend is still up), then the backend; each wait is bounded and ends
#     in SIGKILL, all inside Azure Container Apps' 30 s termination grace period.
#
# Each child runs in its own session (setsid), so a stop reaches its whole process group and a
# Ctrl-C on a terminal reaches only this script, which decides the order. Under tini (the
# image's PID 1) this script is the only process tini signals; tini reaps anything left over.
#
# Several workers: with CHATGATE_WORKERS other than 1 (a number, or auto: one per CPU),
# chatgate starts and supervises the Chainlit processes itself (WORKER_CMD, `{port}` being each
# worker's port from CHATGATE_WORKER_PORT_BASE, 8081 on): it waits for their health, restarts
# one that exits, keeps every chat on its worker, and stops them after its own drain. This
# script then starts only chatgate and supervises it; steps 1 and 2 above do not apply.
#
# Environment (defaults in brackets):
#   BACKEND_CMD            backend command, run by bash
#                          [chainlit run app.py --host 127.0.0.1 --port 8080 --headless]
#   BACKEND_HEALTH_URL     [http://127.0.0.1:8080/health]; empty: TCP check only
#   BACKEND_HOST           [127.0.0.1]  BACKEND_PORT [8080]   (TCP check)
#   BACKEND_WAIT_ATTEMPTS  [60]         BACKEND_WAIT_INTERVAL [1] seconds between attempts
#   BACKEND_STOP_TIMEOUT   seconds the backend gets after SIGTERM before SIGKILL [5]
#   CHATGATE_BIN           [chatgate]
#   CHATGATE_STOP_TIMEOUT  seconds chatgate gets after SIGTERM before SIGKILL
#                          [CHATGATE_SHUTDOWN_DELAY + CHATGATE_SHUTDOWN_GRACE + 2, i.e. 22;
#                          with workers + CHATGATE_WORKER_STOP_TIMEOUT (5), i.e. 27]
#   CHATGATE_WORKERS       [1] Chainlit processes; other than 1: chatgate supervises them
#   WORKER_CMD             worker command, run by bash, `{port}` replaced by chatgate
#                          [chainlit run app.py --host 127.0.0.1 --port {port} --headless]
# chatgate reads its own CHATGATE_* settings (CHATGATE_LISTEN, CHATGATE_BACKEND, ...).
#
# Exit status: 0 after a requested stop in which chatgate exited cleanly; otherwise non-zero
# (the status of the process that died, or 1; 127 when chatgate is not found).

set -uo pipefail

BACKEND_CMD=${BACKEND_CMD:-chainlit run app.py --host 127.0.0.1 --port 8080 --headless}
BACKEND_HEALTH_URL=${BACKEND_HEALTH_URL-http://127.0.0.1:8080/health}
BACKEND_HOST=${BACKEND_HOST:-127.0.0.1}
BACKEND_PORT=${BACKEND_PORT:-8080}
BACKEND_WAIT_ATTEMPTS=${BACKEND_WAIT_ATTEMPTS:-60}
BACKEND_WAIT_INTERVAL=${BACKEND_WAIT_INTERVAL:-1}
BACKEND_STOP_TIMEOUT=${BACKEND_STOP_TIMEOUT:-5}
CHATGATE_BIN=${CHATGATE_BIN:-chatgate}
CHATGATE_STOP_TIMEOUT=${CHATGATE_STOP_TIMEOUT:-}
CHATGATE_WORKERS=${CHATGATE_WORKERS:-1}
WORKER_CMD=${WORKER_CMD:-"chainlit run app.py --host 127.0.0.1 --port {port} --headless"}

backend_pid=""
chatgate_pid=""
stop_signal=""

log() {
    printf 'entrypoint: %s\n' "$*" >&2
}

die() {
    local status=$1
    shift
    log "error: $*"
    exit "$status"
}

is_uint() {
    [[ $1 =~ ^[0-9]+$ ]]
}

is_number() {
    [[ $1 =~ ^[0-9]+([.][0-9]+)?$ ]]
}

# Whether chatgate supervises the workers (CHATGATE_WORKERS other than 1).
workers_mode() {
    [[ $CHATGATE_WORKERS != 1 ]]
}

# chatgate's own drain time (CHATGATE_SHUTDOWN_DELAY + CHATGATE_SHUTDOWN_GRACE, in seconds,
# with or without an "s") plus 2 s; 22 s when they are unset or not plain seconds. With
# workers, plus the time chatgate gives them after its drain (CHATGATE_WORKER_STOP_TIMEOUT, 5).
default_chatgate_stop_timeout() {
    local delay=${CHATGATE_SHUTDOWN_DELAY:-0} grace=${CHATGATE_SHUTDOWN_GRACE:-20}
    local workers_stop=${CHATGATE_WORKER_STOP_TIMEOUT:-5} extra=0
    delay=${delay%s}
    grace=${grace%s}
    workers_stop=${workers_stop%s}
    if workers_mode; then
        is_uint "$workers_stop" && extra=$((10#$workers_stop)) || extra=5
    fi
    if is_uint "$delay" && is_uint "$grace"; then
        echo $((10#$delay + 10#$grace + 2 + extra))
    else
        echo $((22 + extra))
    fi
}

validate_settings() {
    if ! is_uint "$BACKEND_WAIT_ATTEMPTS" || ((BACKEND_WAIT_ATTEMPTS == 0)); then
        die 2 "BACKEND_WAIT_ATTEMPTS must be a positive integer, got '$BACKEND_WAIT_ATTEMPTS'"
    fi
    [[ -n $CHATGATE_STOP_TIMEOUT ]] || CHATGATE_STOP_TIMEOUT=$(default_chatgate_stop_timeout)
    is_number "$BACKEND_WAIT_INTERVAL" ||
        die 2 "BACKEND_WAIT_INTERVAL must be a number of seconds, got '$BACKEND_WAIT_INTERVAL'"
    is_uint "$BACKEND_STOP_TIMEOUT" ||
        die 2 "BACKEND_STOP_TIMEOUT must be whole seconds, got '$BACKEND_STOP_TIMEOUT'"
    is_uint "$CHATGATE_STOP_TIMEOUT" ||
        die 2 "CHATGATE_STOP_TIMEOUT must be whole seconds, got '$CHATGATE_STOP_TIMEOUT'"
    is_uint "$BACKEND_PORT" ||
        die 2 "BACKEND_PORT must be a port number, got '$BACKEND_PORT'"
    [[ $CHATGATE_WORKERS == auto ]] || { is_uint "$CHATGATE_WORKERS" && ((10#$CHATGATE_WORKERS > 0)); } ||
        die 2 "CHATGATE_WORKERS must be a positive number or auto, got '$CHATGATE_WORKERS'"
    command -v "$CHATGATE_BIN" >/dev/null 2>&1 ||
        die 127 "chatgate not found: CHATGATE_BIN='$CHATGATE_BIN' is not an executable or on PATH"
}

# Start "$@" in a new session so its pid is also its process-group id. setsid(1) only forks
# when the caller leads a process group, which a background job of a script never does.
spawn() {
    if command -v setsid >/dev/null 2>&1; then
        setsid "$@" &
    else
        "$@" &
    fi
}

alive() {
    [[ -n $1 ]] && kill -0 "$1" 2>/dev/null
}

# Signal the child's process group, or the child alone when it has none of its own.
signal_group() {
    local sig=$1 pid=$2
    kill "-$sig" -- "-$pid" 2>/dev/null || kill "-$sig" "$pid" 2>/dev/null || true
}

# stop_child NAME PID TIMEOUT: SIGTERM, wait up to TIMEOUT seconds, then SIGKILL the group.
# Bash reaps background children as they exit, so `kill -0` turns false once one is gone.
# Returns the child's exit status, or 137 when it had to be killed.
stop_child() {
    local name=$1 pid=$2 timeout=$3 ticks status
    [[ -n $pid ]] || return 0
    if alive "$pid"; then
        log "stopping $name (pid $pid), up to ${timeout}s"
        signal_group TERM "$pid"
        ticks=$((10#$timeout * 10))
        while alive "$pid" && ((ticks > 0)); do
            sleep 0.1
            ticks=$((ticks - 1))
        done
        if alive "$pid"; then
            log "$name did not exit within ${timeout}s: sending SIGKILL"
            signal_group KILL "$pid"
            wait "$pid" 2>/dev/null
            return 137
        fi
    fi
    wait "$pid" 2>/dev/null
    status=$?
    # Anything the child left behind in its group (workers, reloaders) goes too.
    signal_group KILL "$pid"
    log "$name exited with status $status"
    return "$status"
}

on_signal() {
    # The first signal starts the ordered stop; later ones must not restart it.
    [[ -n $stop_signal ]] || stop_signal=$1
}

# Does the backend answer? HTTP when BACKEND_HEALTH_URL is set and python3 exists (no curl in
# the image), else a TCP connect through bash's /dev/tcp. Both bounded by a 2 s timeout.
backend_answers() {
    if [[ -n $BACKEND_HEALTH_URL ]] && command -v python3 >/dev/null 2>&1; then
        python3 - "$BACKEND_HEALTH_URL" <<'PY' 2>/dev/null
import sys, urllib.error, urllib.request
# No proxy: the backend is local, whatever http_proxy the environment carries.
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    with opener.open(sys.argv[1], timeout=2) as response:
        sys.exit(0 if 200 <= response.status < 300 else 1)
except urllib.error.HTTPError as error:
    # 404: the server is up but has no health route (Chainlit < 2.10); it answers, so it is up.
    sys.exit(0 if error.code == 404 else 1)
except Exception:
    sys.exit(1)
PY
    else
        # shellcheck disable=SC2016 # $1/$2 expand in the inner shell, on purpose.
        timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$BACKEND_HOST" "$BACKEND_PORT" 2>/dev/null
    fi
}

wait_for_backend() {
    local attempt target
    if [[ -n $BACKEND_HEALTH_URL ]] && command -v python3 >/dev/null 2>&1; then
        target=$BACKEND_HEALTH_URL
    else
        target="tcp://$BACKEND_HOST:$BACKEND_PORT"
    fi
    for ((attempt = 1; attempt <= BACKEND_WAIT_ATTEMPTS; attempt++)); do
        if [[ -n $stop_signal ]]; then
            return 2
        fi
        if ! alive "$backend_pid"; then
            wait "$backend_pid" 2>/dev/null
            log "error: backend exited with status $? before answering at $target"
            return 1
        fi
        if backend_answers; then
            log "backend answers at $target (attempt $attempt/$BACKEND_WAIT_ATTEMPTS)"
            return 0
        fi
        log "waiting for backend at $target (attempt $attempt/$BACKEND_WAIT_ATTEMPTS)"
        # A background sleep lets a SIGTERM interrupt the wait instead of queueing behind it.
        sleep "$BACKEND_WAIT_INTERVAL" &
        wait "$!" 2>/dev/null
    done
    log "error: backend did not answer at $target after $BACKEND_WAIT_ATTEMPTS attempts" \
        "(${BACKEND_WAIT_INTERVAL}s apart); check BACKEND_CMD and the backend's log above"
    return 1
}

# Ordered stop after SIGTERM/SIGINT: chatgate drains while the backend still serves.
graceful_stop() {
    local chatgate_status=0
    log "received SIG$stop_signal: stopping chatgate first, then the backend"
    stop_child chatgate "$chatgate_pid" "$CHATGATE_STOP_TIMEOUT"
    chatgate_status=$?
    stop_child backend "$backend_pid" "$BACKEND_STOP_TIMEOUT"
    if ((chatgate_status != 0)); then
        log "chatgate did not stop cleanly (status $chatgate_status)"
        exit 1
    fi
    log "stopped"
    exit 0
}

# Workers mode: chatgate starts, supervises and stops the Chainlit workers; this script
# supervises chatgate alone. Its exit is the script's: 0 after a requested stop that ended
# cleanly, else non-zero.
run_with_workers() {
    local status
    log "starting chatgate with CHATGATE_WORKERS=$CHATGATE_WORKERS, worker command: $WORKER_CMD"
    spawn "$CHATGATE_BIN" "$@" -- bash -c "exec $WORKER_CMD"
    chatgate_pid=$!
    log "supervising chatgate (pid $chatgate_pid), which supervises the workers"
    while true; do
        if [[ -n $stop_signal ]]; then
            log "received SIG$stop_signal: stopping chatgate (it drains, then stops its workers)"
            stop_child chatgate "$chatgate_pid" "$CHATGATE_STOP_TIMEOUT"
            status=$?
            if ((status != 0)); then
                log "chatgate did not stop cleanly (status $status)"
                exit 1
            fi
            log "stopped"
            exit 0
        fi
        wait "$chatgate_pid"
        status=$?
        if [[ -z $stop_signal ]] && ! alive "$chatgate_pid"; then
            log "error: chatgate (pid $chatgate_pid) exited on its own with status $status"
            signal_group KILL "$chatgate_pid"
            exit $((status == 0 ? 1 : status))
        fi
    done
}

main() {
    local status exited_pid
    trap 'on_signal TERM' TERM
    trap 'on_signal INT' INT

    validate_settings

    if workers_mode; then
        run_with_workers "$@"
    fi

    log "starting backend: $BACKEND_CMD"
    spawn bash -c "$BACKEND_CMD"
    backend_pid=$!

    wait_for_backend
    status=$?
    if ((status == 2)); then
        log "received SIG$stop_signal while waiting for the backend"
        stop_child backend "$backend_pid" "$BACKEND_STOP_TIMEOUT"
        exit 0
    elif ((status != 0)); then
        stop_child backend "$backend_pid" "$BACKEND_STOP_TIMEOUT"
        exit 1
    fi

    log "starting chatgate: $CHATGATE_BIN${*:+ $*}"
    spawn "$CHATGATE_BIN" "$@"
    chatgate_pid=$!
    log "supervising backend (pid $backend_pid) and chatgate (pid $chatgate_pid)"

    while true; do
        if [[ -n $stop_signal ]]; then
            graceful_stop
        fi
        exited_pid=""
        # Returns when either child exits, or early (status > 128) when a trapped signal arrives.
        wait -n -p exited_pid "$backend_pid" "$chatgate_pid"
        status=$?
        if [[ -n $stop_signal ]]; then
            graceful_stop
        fi
        if [[ $exited_pid == "$backend_pid" ]] || ! alive "$backend_pid"; then
            log "error: backend (pid $backend_pid) exited on its own with status $status; stopping chatgate"
            stop_child chatgate "$chatgate_pid" "$CHATGATE_STOP_TIMEOUT"
            signal_group KILL "$backend_pid"
            exit $((status == 0 ? 1 : status))
        fi
        if [[ $exited_pid == "$chatgate_pid" ]] || ! alive "$chatgate_pid"; then
            log "error: chatgate (pid $chatgate_pid) exited on its own with status $status; stopping the backend"
            stop_child backend "$backend_pid" "$BACKEND_STOP_TIMEOUT"
            signal_group KILL "$chatgate_pid"
            exit $((status == 0 ? 1 : status))
        fi
    done
}

main "$@"
