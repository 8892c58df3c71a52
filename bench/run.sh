#!/usr/bin/env bash
# chatgate vs nginx vs HAProxy, side by side (issue 6). One command:
#
#   bench/run.sh            # ~10-12 min; writes bench/RESULTS.md
#
# Installs nginx-light, haproxy and wrk if missing, builds chatgate and the bench tools
# (cargo build --release), starts the fixture backend, and for each target (direct, chatgate,
# chatgate with RUST_LOG=warn, nginx, HAProxy) measures GET 2 KiB, GET 64 KiB, WebSocket echo,
# 5,000 idle WebSockets, proxy CPU per request/message and start-up time, REPEATS times.
# Everything listens on 127.0.0.1 only; everything started is stopped by PID on exit or Ctrl-C.
#
# Knobs (environment):
#   REPEATS=3 DURATION=10 WARMUP=2   repeats per target, seconds per measured run / warm-up
#   IDLE_CONNS=5000                  idle WebSockets held through each proxy
#   PROXY_CPUS=1 LOAD_CPUS=0         CPUs (comma-separated numbers) for proxy / load + backend
#   PORT_BASE=18000                  backend on PORT_BASE+80, proxies on PORT_BASE+100*repeat+i
#   TARGETS="direct chatgate chatgate-warn nginx haproxy"
#                                    also: chatgate-before (needs BEFORE_BIN), hyper-floor
#                                    (the least a proxy on hyper and tokio-tungstenite does)
#   BEFORE_BIN=/path/to/chatgate     an older chatgate build, as target chatgate-before (A/B)
#   NGINX_WORKERS=auto               nginx worker_processes
#   OUT=bench/RESULTS.md KEEP_WORK=0 report path; 1 keeps the temp dir (wrk outputs, logs)
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$BENCH_DIR")
REPEATS=${REPEATS:-3}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
IDLE_CONNS=${IDLE_CONNS:-5000}
PROXY_CPUS=${PROXY_CPUS:-1}
LOAD_CPUS=${LOAD_CPUS:-0}
PORT_BASE=${PORT_BASE:-18000}
TARGETS=${TARGETS:-direct chatgate chatgate-warn nginx haproxy}
OUT=${OUT:-$BENCH_DIR/RESULTS.md}
KEEP_WORK=${KEEP_WORK:-0}
NGINX_WORKERS=${NGINX_WORKERS:-auto}

WORK=$(mktemp -d /tmp/chatgate-bench.XXXXXX)
RAW=$WORK/raw.tsv
META=$WORK/meta.tsv
WARNINGS=$WORK/warnings.md
: >"$RAW"
: >"$META"
: >"$WARNINGS"

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
warn() {
    log "WARNING: $*"
    printf -- '- %s\n' "$*" >>"$WARNINGS"
}
record() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$RAW"; }
meta() { printf '%s\t%s\n' "$1" "$2" >>"$META"; }

# Process bookkeeping (STARTED, stop_pid, cleanup and the traps).
# shellcheck source=bench/lib.sh
source "$BENCH_DIR/lib.sh"

# ---------------------------------------------------------------------------------------
# Tools.
install_tools() {
    local missing=()
    command -v nginx >/dev/null || missing+=(nginx-light)
    command -v haproxy >/dev/null || missing+=(haproxy)
    command -v wrk >/dev/null || missing+=(wrk)
    command -v ps >/dev/null || missing+=(procps)
    command -v taskset >/dev/null && command -v flock >/dev/null || missing+=(util-linux)
    command -v ss >/dev/null || missing+=(iproute2)
    if ((${#missing[@]} == 0)); then
        log "nginx, haproxy, wrk, ps, taskset, ss present"
        return
    fi
    log "installing ${missing[*]}"
    local sudo=""
    [[ $(id -u) == 0 ]] || sudo=sudo
    # Keep the packages' init scripts from starting system-wide nginx/haproxy daemons.
    local policy=/usr/sbin/policy-rc.d added_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
        $sudo chmod +x "$policy"
        added_policy=1
    fi
    $sudo apt-get update
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y "${missing[@]}" ||
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y "${missing[@]/nginx-light/nginx}"
    ((added_policy)) && $sudo rm -f "$policy"
    return 0
}

install_tools

# Two benchmark runs on the same CPUs spoil each other's figures: take turns.
LOCK=${TMPDIR:-/tmp}/chatgate-bench.lock
exec 9>"$LOCK"
if ! flock -n 9; then
    log "another bench/run.sh holds $LOCK; waiting for it (up to 30 min)"
    flock -w 1800 9 || { log "gave up waiting for $LOCK"; exit 1; }
fi

# Each relayed idle WebSocket holds two descriptors in the proxy.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE=$(ulimit -n)
if [[ $NOFILE != unlimited ]] && ((NOFILE < 2 * IDLE_CONNS + 1000)); then
    IDLE_CONNS=$(((NOFILE - 1000) / 2))
    warn "open-file limit is $NOFILE; idle test reduced to $IDLE_CONNS connections"
fi

log "building bench tools and chatgate (cargo build --release)"
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=$TARGET_DIR/release
(cd "$ROOT" && cargo build --release -p chatgate-bench)
CHATGATE=""
CHATGATE_MISSING=""
CHATGATE_SERVED=0
if (cd "$ROOT" && cargo build --release -p chatgate) >"$WORK/chatgate-build.log" 2>&1; then
    CHATGATE=$BIN/chatgate
else
    CHATGATE_MISSING="not built"
    warn "chatgate did not build (cargo build --release -p chatgate); its columns are n/a"
    tail -n 20 "$WORK/chatgate-build.log" >&2 || true
fi

# The revision the chatgate binary was built from (src/ may change while the run goes on).
GIT_REV=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ -n $(git -C "$ROOT" status --porcelain -- src Cargo.toml 2>/dev/null) ]]; then
    GIT_REV="$GIT_REV + uncommitted changes in src/"
fi

# ---------------------------------------------------------------------------------------
# Measurement helpers.
CLK_TCK=$(getconf CLK_TCK)

# The process and its direct children (nginx master + workers).
tree_pids() {
    echo "$1"
    ps -o pid= --ppid "$1" 2>/dev/null || true
}

# User+system CPU seconds of a process tree, from /proc/PID/stat (fields 14 and 15).
cpu_seconds() {
    local total=0 pid ticks
    for pid in $(tree_pids "$1"); do
        ticks=$(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0)
        total=$((total + ticks))
    done
    awk -v t="$total" -v hz="$CLK_TCK" 'BEGIN { printf "%.4f", t / hz }'
}

# Busy ticks (everything but idle and iowait) of the proxy CPUs, from /proc/stat; with the
# proxy's own CPU time this tells how much other processes took from it during a run.
busy_ticks() {
    awk -v cpus=",$PROXY_CPUS," '$1 ~ /^cpu[0-9]+$/ {
        n = substr($1, 4)
        if (index(cpus, "," n ",")) busy += $2 + $3 + $4 + $7 + $8 + $9
    } END { print busy + 0 }' /proc/stat
}

# Percentage of the proxy CPUs' time that went to other processes between two samples.
noise_pct() {
    local busy0=$1 busy1=$2 proxy0=${3:-0} proxy1=${4:-0} seconds=$5
    local ncpu
    ncpu=$(tr ',' '\n' <<<"$PROXY_CPUS" | grep -c .)
    awk -v b0="$busy0" -v b1="$busy1" -v p0="$proxy0" -v p1="$proxy1" -v s="$seconds" \
        -v hz="$CLK_TCK" -v n="$ncpu" 'BEGIN {
        other = (b1 - b0) / hz - (p1 - p0)
        if (other < 0) other = 0
        printf "%.1f", other * 100 / (s * n)
    }'
}

# Resident set of a process tree in KiB, from /proc/PID/status.
rss_kib() {
    local total=0 pid kib
    for pid in $(tree_pids "$1"); do
        kib=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
        total=$((total + ${kib:-0}))
    done
    echo "$total"
}

# wrk latency ("412.00us", "2.05ms", "1.20s") in milliseconds.
to_ms() {
    awk -v v="$1" 'BEGIN {
        n = v + 0
        if (v ~ /us$/) n /= 1000; else if (v ~ /ms$/) n = n; else if (v ~ /m$/) n *= 60000; else if (v ~ /s$/) n *= 1000
        printf "%.4f", n
    }'
}

port_free() { [[ -z $(ss -Htln "sport = :$1" 2>/dev/null) ]]; }

# Starts a server under the startup-time wrapper; sets SERVER_PID (the server itself) and
# SERVER_WRAPPER. Returns 1 if it did not answer GET /page within the timeout.
start_server() {
    local name=$1 port=$2 cpus=$3
    shift 3
    local dir=$WORK/$name
    mkdir -p "$dir"
    rm -f "$dir/pid" "$dir/startup"
    if ! port_free "$port"; then
        warn "port $port is busy; $name skipped"
        return 1
    fi
    taskset -c "$LOAD_CPUS" "$BIN/startup-time" --addr "127.0.0.1:$port" --path /page \
        --pid-file "$dir/pid" --result-file "$dir/startup" --log-file "$dir/server.log" \
        -- taskset -c "$cpus" "$@" &
    SERVER_WRAPPER=$!
    STARTED+=("$SERVER_WRAPPER")
    for _ in $(seq 1 300); do
        [[ -s $dir/startup ]] && break
        sleep 0.1
    done
    SERVER_PID=$(cat "$dir/pid" 2>/dev/null || echo "")
    [[ -n $SERVER_PID ]] && STARTED+=("$SERVER_PID")
    if [[ ! -s $dir/startup || $(cat "$dir/startup") == timeout ]]; then
        warn "$name did not serve GET /page on 127.0.0.1:$port (log: $(tail -n 3 "$dir/server.log" 2>/dev/null | tr '\n' ' '))"
        stop_server
        return 1
    fi
    return 0
}

stop_server() {
    [[ -n ${SERVER_PID:-} ]] && stop_pid "$SERVER_PID"
    [[ -n ${SERVER_WRAPPER:-} ]] && { stop_pid "$SERVER_WRAPPER"; wait "$SERVER_WRAPPER" 2>/dev/null || true; }
    SERVER_PID=""
    SERVER_WRAPPER=""
}

# One wrk load: $1 target, $2 metric prefix, $3 connections, $4 URL, $5 body KiB,
# $6 proxy PID ("" for direct).
wrk_load() {
    local target=$1 prefix=$2 conns=$3 url=$4 kib=$5 pid=$6
    local out=$WORK/$target-$prefix-$REPEAT.wrk
    taskset -c "$LOAD_CPUS" wrk -t1 -c"$conns" -d"${WARMUP}s" "$url" >/dev/null
    local cpu0=0 cpu1=0 busy0 busy1
    [[ -n $pid ]] && cpu0=$(cpu_seconds "$pid")
    busy0=$(busy_ticks)
    taskset -c "$LOAD_CPUS" wrk -t1 -c"$conns" -d"${DURATION}s" --latency "$url" >"$out"
    busy1=$(busy_ticks)
    [[ -n $pid ]] && cpu1=$(cpu_seconds "$pid")
    record "$target" noise_pct "$(noise_pct "$busy0" "$busy1" "$cpu0" "$cpu1" "$DURATION")"
    local rps requests p50 p99
    rps=$(awk '/^Requests\/sec:/ {print $2}' "$out")
    requests=$(awk '/ requests in / {print $1}' "$out")
    p50=$(to_ms "$(awk '$1 == "50%" {print $2}' "$out")")
    p99=$(to_ms "$(awk '$1 == "99%" {print $2}' "$out")")
    if grep -qE 'Non-2xx|Socket errors' "$out"; then
        warn "$target $prefix repeat $REPEAT: $(grep -E 'Non-2xx|Socket errors' "$out" | tr -s ' ' | tr '\n' ' ')"
    fi
    record "$target" "${prefix}_rps" "$rps"
    record "$target" "${prefix}_p50_ms" "$p50"
    record "$target" "${prefix}_p99_ms" "$p99"
    if ((kib > 2)); then
        record "$target" "${prefix}_mibs" "$(awk -v r="$rps" -v k="$kib" 'BEGIN { printf "%.1f", r * k / 1024 }')"
    fi
    if [[ -n $pid ]]; then
        record "$target" "${prefix}_cpu_us" "$(awk -v a="$cpu0" -v b="$cpu1" -v n="$requests" 'BEGIN { printf "%.3f", (b - a) * 1e6 / n }')"
        record "$target" "${prefix}_cpu_pct" "$(awk -v a="$cpu0" -v b="$cpu1" -v d="$DURATION" 'BEGIN { printf "%.1f", (b - a) * 100 / d }')"
    fi
    log "  $target $prefix: $rps req/s, p50 ${p50} ms, p99 ${p99} ms"
}

ws_load() {
    local target=$1 url=$2 pid=$3
    if ! taskset -c "$LOAD_CPUS" "$BIN/ws-load" --url "$url" --probe 2>>"$WORK/$target-ws.err"; then
        local reason="relay not built"
        [[ $target == chatgate* || $target == hyper-floor ]] || reason="no WebSocket relay"
        for metric in ws_mps ws_p50_us ws_p99_us ws_cpu_us; do record "$target" "$metric" "NA:$reason"; done
        log "  $target ws: no echo through the proxy ($reason)"
        return
    fi
    taskset -c "$LOAD_CPUS" "$BIN/ws-load" --url "$url" --connections 64 --duration "$WARMUP" >/dev/null
    local out=$WORK/$target-ws-$REPEAT.out cpu0=0 cpu1=0 busy0 busy1
    [[ -n $pid ]] && cpu0=$(cpu_seconds "$pid")
    busy0=$(busy_ticks)
    if ! taskset -c "$LOAD_CPUS" "$BIN/ws-load" --url "$url" --connections 64 --duration "$DURATION" >"$out" 2>>"$WORK/$target-ws.err"; then
        warn "$target ws repeat $REPEAT: ws-load reported errors ($(tail -n 1 "$WORK/$target-ws.err"))"
    fi
    busy1=$(busy_ticks)
    [[ -n $pid ]] && cpu1=$(cpu_seconds "$pid")
    record "$target" noise_pct "$(noise_pct "$busy0" "$busy1" "$cpu0" "$cpu1" "$DURATION")"
    local line messages
    line=$(cat "$out")
    field() { sed -n "s/.*\b$1=\([^ ]*\).*/\1/p" <<<"$line"; }
    messages=$(field messages)
    record "$target" ws_mps "$(field msgs_per_s)"
    record "$target" ws_p50_us "$(field p50_us)"
    record "$target" ws_p99_us "$(field p99_us)"
    if [[ -n $pid ]]; then
        record "$target" ws_cpu_us "$(awk -v a="$cpu0" -v b="$cpu1" -v n="$messages" 'BEGIN { printf "%.3f", (b - a) * 1e6 / n }')"
    fi
    log "  $target ws: $(field msgs_per_s) msg/s, p50 $(field p50_us) us, p99 $(field p99_us) us"
}

idle_load() {
    local target=$1 url=$2 pid=$3
    if ! taskset -c "$LOAD_CPUS" "$BIN/ws-load" --url "$url" --probe 2>/dev/null; then
        record "$target" idle_kib "NA:relay not built"
        return
    fi
    local out=$WORK/$target-idle-$REPEAT.out before after idle_pid
    sleep 1
    before=$(rss_kib "$pid")
    taskset -c "$LOAD_CPUS" "$BIN/ws-idle" --url "$url" --connections "$IDLE_CONNS" --hold 120 >"$out" 2>>"$WORK/$target-idle.err" &
    idle_pid=$!
    STARTED+=("$idle_pid")
    for _ in $(seq 1 600); do
        grep -q '^ready' "$out" 2>/dev/null && break
        kill -0 "$idle_pid" 2>/dev/null || break
        sleep 0.1
    done
    sleep 1
    after=$(rss_kib "$pid")
    stop_pid "$idle_pid"
    wait "$idle_pid" 2>/dev/null || true
    local connected
    connected=$(sed -n 's/^ready connected=\([0-9]*\).*/\1/p' "$out")
    if [[ -z $connected || $connected == 0 ]]; then
        record "$target" idle_kib "NA:no connections held"
        warn "$target idle repeat $REPEAT: no connections held ($(tail -n 1 "$WORK/$target-idle.err" 2>/dev/null))"
        return
    fi
    if ((connected < IDLE_CONNS)); then
        warn "$target idle repeat $REPEAT: only $connected of $IDLE_CONNS connections opened"
    fi
    record "$target" idle_kib "$(awk -v a="$before" -v b="$after" -v n="$connected" 'BEGIN { printf "%.3f", (b - a) / n }')"
    log "  $target idle: $before -> $after KiB RSS for $connected connections"
    # Let the proxy close the upstream sides before the next target starts.
    sleep 1
}

# ---------------------------------------------------------------------------------------
# Targets. Each gets its own port per repeat so no TIME_WAIT or slow exit gets in the way.
target_index() {
    case $1 in
        direct) echo 0 ;; chatgate) echo 1 ;; chatgate-warn) echo 2 ;; nginx) echo 3 ;; haproxy) echo 4 ;;
        chatgate-before) echo 5 ;; hyper-floor) echo 6 ;;
        *) echo 9 ;;
    esac
}

start_target() {
    local target=$1 port=$2
    case $target in
        chatgate | chatgate-warn)
            if [[ -z $CHATGATE ]]; then
                return 1
            fi
            local level=info
            [[ $target == chatgate-warn ]] && level=warn
            # Default logging as users run it: JSON access log on stdout, sent to a file.
            RUST_LOG=$level start_server "$target" "$port" "$PROXY_CPUS" \
                "$CHATGATE" --listen "127.0.0.1:$port" --backend "http://127.0.0.1:$BACKEND_PORT" --admin-listen 127.0.0.1:0
            ;;
        chatgate-before)
            if [[ -z ${BEFORE_BIN:-} || ! -x $BEFORE_BIN ]]; then
                return 1
            fi
            RUST_LOG=info start_server "$target" "$port" "$PROXY_CPUS" \
                "$BEFORE_BIN" --listen "127.0.0.1:$port" --backend "http://127.0.0.1:$BACKEND_PORT" --admin-listen 127.0.0.1:0
            ;;
        hyper-floor)
            start_server "$target" "$port" "$PROXY_CPUS" \
                "$BIN/hyper-floor" --listen "127.0.0.1:$port" --backend "127.0.0.1:$BACKEND_PORT"
            ;;
        nginx)
            local prefix=$WORK/nginx-$REPEAT
            mkdir -p "$prefix/logs"
            sed -e "s#@PREFIX@#$prefix#g" -e "s/@PORT@/$port/g" -e "s/@BACKEND_PORT@/$BACKEND_PORT/g" \
                -e "s/@WORKER_CONNECTIONS@/$((2 * IDLE_CONNS + 1024))/g" \
                -e "s/@WORKER_PROCESSES@/$NGINX_WORKERS/g" \
                -e "s/@RLIMIT_NOFILE@/$((2 * IDLE_CONNS + 2048))/g" \
                "$BENCH_DIR/conf/nginx.conf.in" >"$prefix/nginx.conf"
            start_server "$target" "$port" "$PROXY_CPUS" \
                nginx -p "$prefix" -c "$prefix/nginx.conf" -e "$prefix/logs/error.log" -g 'daemon off;'
            ;;
        haproxy)
            local cfg=$WORK/haproxy-$REPEAT.cfg
            sed -e "s/@PORT@/$port/g" -e "s/@BACKEND_PORT@/$BACKEND_PORT/g" \
                -e "s/@MAXCONN@/$((IDLE_CONNS + 1000))/g" \
                "$BENCH_DIR/conf/haproxy.cfg.in" >"$cfg"
            start_server "$target" "$port" "$PROXY_CPUS" haproxy -f "$cfg" -db
            ;;
        *) return 1 ;;
    esac
}

# ---------------------------------------------------------------------------------------
# Run.
LOAD_AT_START=$(cut -d' ' -f1-3 /proc/loadavg)
# shellcheck disable=SC2009 # pgrep refuses patterns longer than a process name
BUSY_AT_START=$(ps -eo comm= | grep -cE '^(rustc|cc1|cc1plus|ld|ld\.lld|cargo|clang)$' || true)

# Something else (a soak, a test) may hold the default ports: move the whole block.
for _ in 1 2 3 4 5; do
    port_free $((PORT_BASE + 80)) && port_free $((PORT_BASE + 101)) && break
    log "port $((PORT_BASE + 80)) or $((PORT_BASE + 101)) is busy; trying PORT_BASE=$((PORT_BASE + 1000))"
    PORT_BASE=$((PORT_BASE + 1000))
done
BACKEND_PORT=$((PORT_BASE + 80))
REPEAT=0
log "starting bench-backend on 127.0.0.1:$BACKEND_PORT (CPUs $LOAD_CPUS)"
start_server backend "$BACKEND_PORT" "$LOAD_CPUS" "$BIN/bench-backend" --listen "127.0.0.1:$BACKEND_PORT" ||
    { log "backend did not start"; exit 1; }
SERVER_PID=""
SERVER_WRAPPER=""

read -r -a TARGET_LIST <<<"$TARGETS"
for REPEAT in $(seq 1 "$REPEATS"); do
    # Rotate the order each repeat so drift in machine load does not favour one target.
    n=${#TARGET_LIST[@]}
    for ((k = 0; k < n; k++)); do
        target=${TARGET_LIST[(k + REPEAT - 1) % n]}
        log "repeat $REPEAT/$REPEATS: $target"
        if [[ $target == direct ]]; then
            port=$BACKEND_PORT
            pid=""
        else
            port=$((PORT_BASE + 100 * REPEAT + $(target_index "$target")))
            if ! start_target "$target" "$port"; then
                reason="not serving"
                [[ $target == chatgate* && -n $CHATGATE_MISSING ]] && reason=$CHATGATE_MISSING
                for metric in get2k_rps big_rps ws_mps idle_kib startup_ms; do record "$target" "$metric" "NA:$reason"; done
                continue
            fi
            pid=$SERVER_PID
            [[ $target == chatgate* ]] && CHATGATE_SERVED=1
            record "$target" startup_ms "$(cat "$WORK/$target/startup")"
        fi
        wrk_load "$target" get2k 64 "http://127.0.0.1:$port/page" 2 "$pid"
        wrk_load "$target" big 16 "http://127.0.0.1:$port/big" 64 "$pid"
        ws_load "$target" "ws://127.0.0.1:$port/ws/echo" "$pid"
        [[ -n $pid ]] && idle_load "$target" "ws://127.0.0.1:$port/ws/idle" "$pid"
        [[ $target != direct ]] && stop_server
    done
done

# Binary sizes.
size_mib() { awk -v b="$(stat -Lc %s "$1")" 'BEGIN { printf "%.3f", b / 1048576 }'; }
((CHATGATE_SERVED)) && record chatgate binary_mib "$(size_mib "$CHATGATE")"
record nginx binary_mib "$(size_mib "$(command -v nginx)")"
record haproxy binary_mib "$(size_mib "$(command -v haproxy)")"

# ---------------------------------------------------------------------------------------
# Report.
LOAD_AT_END=$(cut -d' ' -f1-3 /proc/loadavg)
# shellcheck disable=SC2009 # pgrep refuses patterns longer than a process name
BUSY_AT_END=$(ps -eo comm= | grep -cE '^(rustc|cc1|cc1plus|ld|ld\.lld|cargo|clang)$' || true)
meta date "$(date -u +'%Y-%m-%d %H:%M UTC')"
meta repeats "$REPEATS"
meta machine "$(nproc) CPUs, $(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo), kernel $(uname -r)"
meta versions "$(nginx -v 2>&1 | sed 's/^nginx version: //'), $(haproxy -v | head -n 1 | awk '{print "HAProxy " $3}'), $(wrk -v 2>&1 | head -n 1 | awk '{print $1, $2}'), $(rustc -V | awk '{print $1, $2}'), chatgate $GIT_REV"
meta pinning "proxies on CPU $PROXY_CPUS; wrk, ws-load, ws-idle and bench-backend share CPU $LOAD_CPUS (taskset). nginx worker_processes $NGINX_WORKERS (auto counts online CPUs, not the affinity mask: $(nproc) workers on the pinned CPU), HAProxy nbthread default and chatgate's tokio runtime (both follow the affinity mask: one thread per pinned CPU)"
meta method "wrk -t1 with --latency, ${DURATION} s per run after a ${WARMUP} s warm-up; WS echo: 128-byte text messages, one in flight per connection, ${DURATION} s; idle: $IDLE_CONNS WebSockets, (RSS after - RSS before) / connections, RSS summed over the proxy's processes; CPU: utime+stime from /proc/PID/stat around the measured run, divided by requests or echoed messages (a message is one round trip: the proxy relays it both ways); start-up: spawn to first 200 for GET /page through the proxy, polled every 1 ms; binary: file size (nginx and HAProxy are dynamically linked)"
meta logging "chatgate: default (RUST_LOG=info, JSON to stdout redirected to a file); chatgate-warn: RUST_LOG=warn; nginx: default combined access log to a file; HAProxy: option httplog to stdout redirected to a file"
meta "machine load" "load average $LOAD_AT_START at start, $LOAD_AT_END at end; compiler processes running: $BUSY_AT_START at start, $BUSY_AT_END at end (other builds share these 2 CPUs, so figures from a busy machine are noisy)"

# Access logs written (sanity check that logging was on, as configured).
for target in chatgate nginx haproxy; do
    case $target in
        nginx) f=$WORK/nginx-1/logs/access.log ;;
        *) f=$WORK/$target/server.log ;;
    esac
    [[ -f $f ]] && meta "access log lines, $target (last repeat's file)" "$(wc -l <"$f")"
done
if [[ -f $WORK/nginx-1/logs/error.log ]] && grep -q 'buffered to a temporary file' "$WORK/nginx-1/logs/error.log"; then
    warn "nginx buffered some upstream responses to temporary files (default proxy_buffering)"
fi

mkdir -p "$(dirname "$OUT")"
{
    "$BIN/bench-report" --raw "$RAW" --meta "$META"
    if [[ -s $WARNINGS ]]; then
        printf '## Warnings from this run\n\n'
        cat "$WARNINGS"
        printf '\n'
    fi
} >"$OUT.tmp"
mv "$OUT.tmp" "$OUT"
RAW_OUT=$(dirname "$OUT")/raw-latest.tsv
cp "$RAW" "$RAW_OUT"
log "wrote $OUT (raw figures in $RAW_OUT)"
