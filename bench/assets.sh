#!/usr/bin/env bash
# Page loads against a real Chainlit, direct versus through chatgate's asset cache (issue 16).
# One command:
#
#   bench/assets.sh            # ~2-3 min; writes bench/ASSETS.md
#
# Starts the example Chainlit app (examples/chainlit, in the e2e tests' venv, created if
# missing) and a release chatgate in front of it, on free loopback ports. For each target
# (direct, then chatgate): one python-socketio chat (bench/assets_chat.py) sends a message
# every 200 ms throughout; after BASELINE seconds of chat alone, ROUNDS rounds of LOADS
# concurrent fresh page loads (curl: GET / then the bundle /assets/index-*.js, both with
# Accept-Encoding: gzip, br; no client cache), a round starting every PACE seconds or as
# soon as the previous one ends when that takes longer: both targets get the same offered
# load. Records each page load's
# time, the chat's reply latency (first token, whole reply) alone and during the loads, and
# the CPU time (utime+stime from /proc/<pid>/stat) Chainlit and chatgate spent per page load
# (the chat's own share, measured over the baseline, subtracted). Through chatgate the first
# load fills the cache and the brotli variant is awaited before measuring (the steady state);
# the fill's time is reported too. Everything listens on 127.0.0.1; everything started is
# stopped by PID on exit or Ctrl-C.
#
# Knobs (environment): ROUNDS=6 LOADS=10 PACE=2 BASELINE=5 OUT=bench/ASSETS.md KEEP_WORK=0
# VENV=target/e2e/venv (shared with tests/e2e/run.sh) CHATGATE_BIN (a chatgate to test
# instead of building the release one). Needs python3-venv and curl.

# The report's printf formats hold Markdown code spans (`...`), not shell expansions.
# shellcheck disable=SC2016
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$BENCH_DIR")
ROUNDS=${ROUNDS:-6}
PACE=${PACE:-2}
LOADS=${LOADS:-10}
BASELINE=${BASELINE:-5}
OUT=${OUT:-$BENCH_DIR/ASSETS.md}
KEEP_WORK=${KEEP_WORK:-0}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
VENV=${VENV:-$ROOT/target/e2e/venv}

WORK=$(mktemp -d /tmp/chatgate-assets.XXXXXX)
log() { printf '[assets %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}

# Process bookkeeping (STARTED, stop_pid, cleanup and the traps).
# shellcheck source=bench/lib.sh
source "$BENCH_DIR/lib.sh"

command -v curl >/dev/null || die "curl is needed (apt-get install curl)"

# ---------------------------------------------------------------------------------------
# The venv: tests/e2e/requirements.txt (the pinned Chainlit and the Socket.IO client), with
# the stamp tests/e2e/run.sh uses, so either script reuses the other's.
stamp=$(cat "$ROOT/tests/e2e/requirements.txt" "$ROOT/examples/chainlit/requirements.txt" | sha256sum | cut -c1-16)
if [[ $(cat "$VENV/.e2e-stamp" 2>/dev/null) != "$stamp" ]]; then
    log "creating $VENV (pinned Chainlit, python-socketio client; about a minute)"
    [[ -x $VENV/bin/python ]] || python3 -m venv "$VENV"
    (cd "$ROOT/tests/e2e" && "$VENV/bin/pip" install -q --disable-pip-version-check -r requirements.txt)
    echo "$stamp" >"$VENV/.e2e-stamp"
fi

CHATGATE=${CHATGATE_BIN:-}
if [[ -z $CHATGATE ]]; then
    log "building (cargo build --release --bin chatgate)"
    (cd "$ROOT" && cargo build --release --bin chatgate)
    CHATGATE=$TARGET_DIR/release/chatgate
fi

# ---------------------------------------------------------------------------------------
# Helpers.
CLK_TCK=$(getconf CLK_TCK)

# utime + stime in clock ticks (fields 14 and 15; the command name in field 2 may hold
# spaces, so count from after its closing parenthesis).
cpu_ticks() { sed 's/.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'; }
now() { date +%s.%N; }
free_port() { "$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }


# One fresh page load: the HTML, then the bundle; prints "<ms> <bundle bytes> <encoding>".
page_load() { # base bundle-path
    local start bundle
    start=$(date +%s%N)
    curl -sf -o /dev/null -H 'Accept-Encoding: gzip, br' "$1/" || return 1
    bundle=$(curl -sf -o /dev/null -H 'Accept-Encoding: gzip, br' \
        -w '%{size_download} %header{content-encoding}' "$1$2") || return 1
    echo "$((($(date +%s%N) - start) / 1000000)) $bundle"
}

# ---------------------------------------------------------------------------------------
# Chainlit, from a fresh app root outside the repository.
APPROOT=$WORK/approot
mkdir -p "$APPROOT"
BACKEND_PORT=$(free_port)
log "starting Chainlit on 127.0.0.1:$BACKEND_PORT"
(
    cd "$APPROOT"
    CHAINLIT_APP_ROOT="$APPROOT" exec "$VENV/bin/chainlit" run "$ROOT/examples/chainlit/app.py" \
        --host 127.0.0.1 --port "$BACKEND_PORT" --headless
) >"$WORK/chainlit.log" 2>&1 </dev/null &
CHAINLIT_PID=$!
STARTED+=("$CHAINLIT_PID")
wait_http_200 "http://127.0.0.1:$BACKEND_PORT/health" 60 || die "Chainlit did not start (see $WORK/chainlit.log)"

GATE_PORT=$(free_port)
log "starting chatgate on 127.0.0.1:$GATE_PORT"
RUST_LOG=warn "$CHATGATE" --listen "127.0.0.1:$GATE_PORT" --backend "http://127.0.0.1:$BACKEND_PORT" \
    --admin-listen off >"$WORK/chatgate.log" 2>&1 </dev/null &
CHATGATE_PID=$!
STARTED+=("$CHATGATE_PID")
wait_http_200 "http://127.0.0.1:$GATE_PORT/monitor/health" 30 || die "chatgate did not become ready"

BUNDLE=$(curl -s "http://127.0.0.1:$BACKEND_PORT/" | grep -o '/assets/index-[A-Za-z0-9_-]*\.js' | head -n 1)
[[ -n $BUNDLE ]] || die "no /assets/index-*.js in Chainlit's page"
BUNDLE_BYTES=$(curl -s "http://127.0.0.1:$BACKEND_PORT$BUNDLE" | wc -c)
log "bundle $BUNDLE, $BUNDLE_BYTES bytes uncompressed"

# ---------------------------------------------------------------------------------------
# One target: chat alone, then page loads with the chat going on.
measure() { # name base-url
    local name=$1 base=$2 dir=$WORK/$1 chat_pid t0 t1 t2 b0 b1 b2 g1 g2 round i pids next wait_ms
    mkdir -p "$dir"
    "$VENV/bin/python" "$BENCH_DIR/assets_chat.py" --url "$base" >"$dir/chat.txt" 2>"$dir/chat.err" &
    chat_pid=$!
    STARTED+=("$chat_pid")
    for _ in $(seq 1 100); do
        grep -q '^ready' "$dir/chat.txt" 2>/dev/null && break
        sleep 0.1
    done
    grep -q '^ready' "$dir/chat.txt" || die "$name: the chat did not connect (see $dir/chat.err)"

    log "$name: first load, then ${BASELINE}s of chat alone"
    page_load "$base" "$BUNDLE" >"$dir/first.txt" || die "$name: the first page load failed"
    if [[ $name == chatgate ]]; then
        # The steady state: brotli (made in the background after the first load) is ready.
        for _ in $(seq 1 600); do
            [[ $(curl -s -o /dev/null -H 'Accept-Encoding: br' -w '%header{content-encoding}' "$base$BUNDLE") == br ]] && break
            sleep 0.1
        done
    fi
    t0=$(now) b0=$(cpu_ticks "$CHAINLIT_PID")
    sleep "$BASELINE"
    t1=$(now) b1=$(cpu_ticks "$CHAINLIT_PID") g1=$(cpu_ticks "$CHATGATE_PID")

    log "$name: $ROUNDS rounds of $LOADS concurrent page loads, one every ${PACE}s at most"
    : >"$dir/loads.txt"
    for round in $(seq 1 "$ROUNDS"); do
        next=$(($(date +%s%N) + PACE * 1000000000))
        pids=()
        for i in $(seq 1 "$LOADS"); do
            page_load "$base" "$BUNDLE" >"$dir/load-$round-$i.txt" &
            pids+=($!)
        done
        # Only this round's curls: the chat runs in the background too.
        for i in "${pids[@]}"; do
            wait "$i" || die "$name: a page load failed in round $round"
        done
        cat "$dir/load-$round-"*.txt >>"$dir/loads.txt"
        wait_ms=$(((next - $(date +%s%N)) / 1000000))
        if ((round < ROUNDS && wait_ms > 0)); then
            sleep "$(awk -v ms="$wait_ms" 'BEGIN { printf "%.3f", ms / 1000 }')"
        fi
    done
    t2=$(now) b2=$(cpu_ticks "$CHAINLIT_PID") g2=$(cpu_ticks "$CHATGATE_PID")
    stop_pid "$chat_pid"
    printf '%s %s %s %s %s %s %s %s\n' "$t0" "$t1" "$t2" "$b0" "$b1" "$b2" "$g1" "$g2" >"$dir/marks.txt"
}

measure direct "http://127.0.0.1:$BACKEND_PORT"
measure chatgate "http://127.0.0.1:$GATE_PORT"

# ---------------------------------------------------------------------------------------
# The report.
log "writing $OUT"
"$VENV/bin/python" - "$WORK" "$CLK_TCK" "$ROUNDS $PACE" "$LOADS" "$BUNDLE" "$BUNDLE_BYTES" \
    "$(cd "$ROOT" && git describe --always --dirty 2>/dev/null || echo unknown) (${CHATGATE_BIN:-release})" \
    "$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("chainlit"))')" \
    "$(nproc) x $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)" >"$OUT" <<'EOF'
import math, statistics, sys
work, tck, schedule, loads, bundle, bundle_bytes, commit, chainlit, cpu = sys.argv[1:]
tck, loads = int(tck), int(loads)
rounds, pace = schedule.split()

def pct(values, p):
    """Nearest-rank percentile."""
    values = sorted(values)
    if not values:
        return float("nan")
    return values[max(0, math.ceil(p / 100 * len(values)) - 1)]

rows = {}
for name in ("direct", "chatgate"):
    d = f"{work}/{name}"
    t0, t1, t2, b0, b1, b2, g1, g2 = map(float, open(f"{d}/marks.txt").read().split())
    chat = [[float(x) for x in l.split()] for l in open(f"{d}/chat.txt") if l[0].isdigit()]
    alone = [(token, whole) for sent, token, whole in chat if t0 <= sent < t1]
    during = [(token, whole) for sent, token, whole in chat if t1 <= sent < t2]
    times, sizes, encodings = [], set(), set()
    for line in open(f"{d}/loads.txt"):
        ms, size, *enc = line.split()
        times.append(float(ms)); sizes.add(int(size)); encodings.add(enc[0] if enc else "identity")
    first = open(f"{d}/first.txt").read().split()
    n = len(times)
    chat_rate = (b1 - b0) / (t1 - t0)  # the chat's own backend CPU, ticks per second
    backend_ms = max(0.0, (b2 - b1) - chat_rate * (t2 - t1)) / tck * 1000 / n
    gate_ms = (g2 - g1) / tck * 1000 / n if name == "chatgate" else None
    rows[name] = dict(
        p50=statistics.median(times), p99=pct(times, 99), max=max(times), n=n,
        first=float(first[0]), bytes="/".join(str(s) for s in sorted(sizes)),
        enc="/".join(sorted(encodings)),
        alone_first=(pct([a for a, _ in alone], 50), pct([a for a, _ in alone], 99)),
        during_first=(pct([a for a, _ in during], 50), pct([a for a, _ in during], 99)),
        during_full=(pct([c for _, c in during], 50), pct([c for _, c in during], 99)),
        chats=(len(alone), len(during)),
        backend_ms=backend_ms, gate_ms=gate_ms, wall=t2 - t1,
    )

d, g = rows["direct"], rows["chatgate"]
def f(x): return "–" if x is None else f"{x:,.0f}" if x >= 100 else f"{x:.1f}"
out = print
out("# Page loads: Chainlit direct vs through chatgate's asset cache")
out()
out(f"`bench/assets.sh`, chatgate {commit}, Chainlit {chainlit} (examples/chainlit), "
    f"{cpu}. The bundle {bundle} is {int(bundle_bytes):,} bytes uncompressed. "
    f"{rounds} rounds of {loads} concurrent fresh page loads (curl: `/` then the bundle, "
    f"`Accept-Encoding: gzip, br`, no client cache), a round starting every {pace} s or as "
    "soon as the previous one ends when slower, while one python-socketio chat sends a "
    "message every 200 ms. Latencies in ms; CPU per page load in ms.")
out()
out("| | direct | chatgate |")
out("|---|---:|---:|")
out(f"| page load p50 | {f(d['p50'])} | {f(g['p50'])} |")
out(f"| page load p99 | {f(d['p99'])} | {f(g['p99'])} |")
out(f"| page load max | {f(d['max'])} | {f(g['max'])} |")
out(f"| {d['n']} page loads took (s) | {d['wall']:.1f} | {g['wall']:.1f} |")
out(f"| bundle bytes on the wire | {d['bytes']} ({d['enc']}) | {g['bytes']} ({g['enc']}) |")
out(f"| chat reply, first token, p50 / p99, chat alone | {f(d['alone_first'][0])} / {f(d['alone_first'][1])} | {f(g['alone_first'][0])} / {f(g['alone_first'][1])} |")
out(f"| chat reply, first token, p50 / p99, during the loads | {f(d['during_first'][0])} / {f(d['during_first'][1])} | {f(g['during_first'][0])} / {f(g['during_first'][1])} |")
out(f"| chat reply, whole, p50 / p99, during the loads | {f(d['during_full'][0])} / {f(d['during_full'][1])} | {f(g['during_full'][0])} / {f(g['during_full'][1])} |")
out(f"| chat messages measured (alone / during) | {d['chats'][0]} / {d['chats'][1]} | {g['chats'][0]} / {g['chats'][1]} |")
out(f"| Chainlit CPU per page load | {f(d['backend_ms'])} | {f(g['backend_ms'])} |")
out(f"| chatgate CPU per page load | – | {f(g['gate_ms'])} |")
out(f"| first page load (chatgate: the cache fill, gzip on the way) | {f(d['first'])} | {f(g['first'])} |")
out()
out("Method: each page load is two sequential curl requests on fresh connections. CPU is "
    "utime+stime from /proc/<pid>/stat over the load phase; the chat's own share (the "
    "rate measured over the chat-alone phase) is subtracted from Chainlit's. Through "
    "chatgate the bundle's brotli variant (quality 11, made in the background after the "
    "first load) was ready before the measured loads; until then clients asking for br get "
    "gzip. Both targets get the same page loads; the chat is measured over the whole load "
    "phase, idle gaps between fast rounds included. Through chatgate Chainlit still serves "
    "`/` (the HTML) on every load. One run; the machine is shared, so expect noise in the "
    "small figures.")
EOF
log "done: $OUT"
