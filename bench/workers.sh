#!/usr/bin/env bash
# What several workers buy a CPU-bound Chainlit app (issue 11), and what the affinity costs.
#
#   bench/workers.sh              # scaling: ~5 min; writes bench/WORKERS.md
#   bench/workers.sh affinity     # only the affinity's cost (GET 2 KiB): ~3 min
#   bench/workers.sh all          # both
#
# Scaling: bench/workers/app.py (a fixed amount of pure Python per message, calibrated here to
# about 50 ms on an idle core) behind chatgate --workers 1, then --workers 2; CHATS concurrent
# python-socketio chats (bench/workers/load.py: polling then WebSocket, one message in flight
# per chat) for RUN_SECONDS, REPEATS times each. Reports replies per second, errors and the
# per-worker spread (from chatgate's affinity cookie).
#
# Affinity: wrk GET /page (2 KiB) through chatgate with one bench-backend, then with two
# (--backend a,b) both without a cookie (every request a new visitor: least-loaded pick and a
# Set-Cookie) and with one (the cookie routes it); chatgate's CPU per request from /proc,
# chatgate pinned to PROXY_CPUS, wrk and the backends to LOAD_CPUS, AFF_REPEATS rounds
# interleaved. COMPARE=/path/to/another/chatgate adds its one-backend case (e.g. a build of
# the commit before the workers, to see what the change costs a single backend).
#
# Not a timed test: nothing here passes or fails on a figure. It needs the e2e venv
# (target/e2e/venv with Chainlit and python-socketio; made here when missing), wrk for the
# affinity part, and builds chatgate (and the bench tools) with cargo build --release.
# Everything listens on 127.0.0.1; everything started is stopped by PID.
#
# Knobs: CHATS=8 RUN_SECONDS=30 REPEATS=2 WORK_MS=50 WORKERS_LIST="1 2" PORT_BASE=19100
#        CHATGATE_BIN=target/release/chatgate OUT=bench/WORKERS.md KEEP_WORK=0
#        WRK_SECONDS=10 WRK_CONNS=64 AFF_REPEATS=3 PROXY_CPUS=1 LOAD_CPUS=0 COMPARE=
#        SCALING_TSV=<a kept run's scaling.tsv>: report that scaling run instead of measuring
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$BENCH_DIR")
MODE=${1:-scaling}
CHATS=${CHATS:-8}
RUN_SECONDS=${RUN_SECONDS:-30}
REPEATS=${REPEATS:-2}
WORK_MS=${WORK_MS:-50}
WORKERS_LIST=${WORKERS_LIST:-1 2}
PORT_BASE=${PORT_BASE:-19100}
CHATGATE_BIN=${CHATGATE_BIN:-$ROOT/target/release/chatgate}
OUT=${OUT:-$BENCH_DIR/WORKERS.md}
KEEP_WORK=${KEEP_WORK:-0}
WRK_SECONDS=${WRK_SECONDS:-10}
WRK_CONNS=${WRK_CONNS:-64}
AFF_REPEATS=${AFF_REPEATS:-3}
PROXY_CPUS=${PROXY_CPUS:-1}
LOAD_CPUS=${LOAD_CPUS:-0}
COMPARE=${COMPARE:-}
SCALING_TSV=${SCALING_TSV:-}
VENV=$ROOT/target/e2e/venv

WORK=$(mktemp -d /tmp/chatgate-workers-bench.XXXXXX)
log() { printf '[workers %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# Process bookkeeping (STARTED, stop_pid, cleanup and the traps).
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$BENCH_DIR/lib.sh"

case $MODE in
    scaling | affinity | all) ;;
    *)
        echo "usage: bench/workers.sh [scaling|affinity|all]" >&2
        exit 2
        ;;
esac

# Two benchmarks on the same CPUs spoil each other's figures: take turns with bench/run.sh.
LOCK=${TMPDIR:-/tmp}/chatgate-bench.lock
exec 9>"$LOCK"
if ! flock -n 9; then
    log "another benchmark holds $LOCK; waiting for it (up to 30 min)"
    flock -w 1800 9 || {
        log "gave up waiting for $LOCK"
        exit 1
    }
fi

if [[ ! -x $VENV/bin/chainlit ]]; then
    log "creating $VENV (Chainlit, python-socketio)"
    python3 -m venv "$VENV"
    (cd "$ROOT/tests/e2e" && "$VENV/bin/pip" install -q --disable-pip-version-check -r requirements.txt)
fi
if [[ $CHATGATE_BIN == "$ROOT/target/release/chatgate" ]]; then
    log "cargo build --release --bin chatgate"
    (cd "$ROOT" && cargo build --release --bin chatgate) >"$WORK/build.log" 2>&1 ||
        { log "build failed: $(tail -5 "$WORK/build.log")"; exit 1; }
fi

# User+system CPU ticks of processes (fields 14 and 15 of /proc/PID/stat), summed.
cpu_ticks() {
    local pid total=0 ticks
    for pid in "$@"; do
        ticks=$(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0)
        total=$((total + ${ticks:-0}))
    done
    echo "$total"
}

# Busy and total ticks of the whole machine, from /proc/stat's cpu line.
machine_ticks() {
    awk '/^cpu / { busy = $2 + $3 + $4 + $7 + $8 + $9; print busy, busy + $5 + $6 }' /proc/stat
}

# The supervised workers' pids, from chatgate's /monitor/health.
worker_pids() {
    curl -s --max-time 2 "http://127.0.0.1:$1/monitor/health" |
        "$VENV/bin/python" -c 'import json,sys; print(" ".join(str(w["pid"]) for w in json.load(sys.stdin)["workers"]))'
}

# Waits until chatgate at port $1 reports $2 reachable workers (bounded).
wait_workers() {
    local port=$1 want=$2 deadline=$((SECONDS + 90)) up
    while ((SECONDS < deadline)); do
        # (A chatgate from before the workers has no `workers` list: its backend counts.)
        up=$(curl -s --max-time 2 "http://127.0.0.1:$port/monitor/health" |
            "$VENV/bin/python" -c 'import json,sys; d=json.load(sys.stdin); print(sum(w["reachable"] for w in d.get("workers", [d["backend"]])))' \
                2>/dev/null || echo 0)
        [[ $up == "$want" ]] && return 0
        sleep 0.3
    done
    return 1
}

# Loop rounds of bench/workers/app.py's burn() that take WORK_MS on this machine (the fastest
# of a few tries, taken before anything else runs).
calibrate() {
    "$VENV/bin/python" - "$WORK_MS" <<'EOF'
import sys, time
ms = float(sys.argv[1])
def burn(rounds):
    acc = 0
    for i in range(rounds):
        acc = (acc * 31 + i) % 1_000_003
    return acc
rounds, best = 1_000_000, float("inf")
for _ in range(5):
    started = time.perf_counter()
    burn(rounds)
    best = min(best, time.perf_counter() - started)
print(int(rounds * ms / 1000 / best))
EOF
}

run_scaling() {
    local work workers repeat port base pid json app="$WORK/app"
    mkdir -p "$app/.chainlit"
    ln -s "$BENCH_DIR/workers/app.py" "$app/app.py"
    work=$(calibrate)
    log "BENCH_WORK=$work loop rounds = ${WORK_MS} ms of Python on an idle core"
    printf 'work\t%s\n' "$work" >"$WORK/scaling.tsv"
    for repeat in $(seq 1 "$REPEATS"); do
        for workers in $WORKERS_LIST; do
            port=$((PORT_BASE + 10 * workers))
            base=$((port + 1))
            BENCH_WORK=$work "$CHATGATE_BIN" --listen "127.0.0.1:$port" --admin-listen off \
                --workers "$workers" --worker-port-base "$base" --worker-app-dir "$app" \
                --health-interval 1 --shutdown-grace 2 --log-format json \
                -- "$VENV/bin/chainlit" run app.py --headless --host 127.0.0.1 --port '{port}' \
                >"$WORK/chatgate-$workers-$repeat.log" 2>&1 </dev/null &
            pid=$!
            STARTED+=("$pid")
            wait_workers "$port" "$workers" || {
                log "workers did not come up; log: $(tail -c 600 "$WORK/chatgate-$workers-$repeat.log")"
                exit 1
            }
            log "run $repeat/$REPEATS: $workers worker(s), $CHATS chats, ${RUN_SECONDS} s"
            local pids machine0 machine1 workers0 workers1 gate0 gate1
            read -r -a pids <<<"$(worker_pids "$port")"
            machine0=$(machine_ticks)
            workers0=$(cpu_ticks "${pids[@]}")
            gate0=$(cpu_ticks "$pid")
            json=$("$VENV/bin/python" "$BENCH_DIR/workers/load.py" --url "http://127.0.0.1:$port" \
                --chats "$CHATS" --seconds "$RUN_SECONDS")
            machine1=$(machine_ticks)
            workers1=$(cpu_ticks "${pids[@]}")
            gate1=$(cpu_ticks "$pid")
            log "  $json"
            printf 'run\t%s\t%s\t%s\t%s %s %s %s %s\n' "$workers" "$repeat" "$json" \
                "$machine0" "$machine1" "$((workers1 - workers0))" "$((gate1 - gate0))" \
                "$(getconf CLK_TCK)" >>"$WORK/scaling.tsv"
            stop_pid "$pid"
        done
    done
}

# One wrk measurement: $1 case name, $2 chatgate binary, $3 backends, $4 repeat.
affinity_case() {
    local case=$1 bin=$2 backends=$3 repeat=$4 port=$((PORT_BASE + 90)) pid url cpu0 cpu1 out
    local requests want=1 header=() cookie
    [[ $backends == *,* ]] && want=2
    RUST_LOG=warn taskset -c "$PROXY_CPUS" "$bin" --listen "127.0.0.1:$port" --admin-listen off \
        --backend "$backends" --health-interval 1 >"$WORK/chatgate-$case-$repeat.log" 2>&1 </dev/null &
    pid=$!
    STARTED+=("$pid")
    wait_workers "$port" "$want" || { log "chatgate ($case) not ready"; exit 1; }
    url="http://127.0.0.1:$port/page"
    if [[ $case == two-cookie ]]; then
        cookie=$(curl -s -D - -o /dev/null "$url" | awk -F': ' 'tolower($1) == "set-cookie" {split($2, a, ";"); print a[1]}')
        header=(-H "Cookie: $cookie")
    fi
    taskset -c "$LOAD_CPUS" wrk -t1 -c"$WRK_CONNS" -d2s "${header[@]}" "$url" >/dev/null
    cpu0=$(cpu_ticks "$pid")
    out=$(taskset -c "$LOAD_CPUS" wrk -t1 -c"$WRK_CONNS" -d"${WRK_SECONDS}s" "${header[@]}" "$url")
    cpu1=$(cpu_ticks "$pid")
    requests=$(awk '/requests in/ {print $1}' <<<"$out")
    printf '%s\t%s\t%s\t%s\t%s\n' "$case" "$repeat" "$requests" "$(awk '/Requests\/sec/ {print $2}' <<<"$out")" \
        "$(awk -v a="$cpu0" -v b="$cpu1" -v n="$requests" -v hz="$(getconf CLK_TCK)" \
            'BEGIN { printf "%.2f", (b - a) / hz * 1e6 / n }')" >>"$WORK/affinity.tsv"
    log "  $(tail -1 "$WORK/affinity.tsv")"
    stop_pid "$pid"
}

run_affinity() {
    local b1 b2 repeat one two
    command -v wrk >/dev/null || { log "wrk missing (apt-get install wrk)"; exit 1; }
    (cd "$ROOT" && cargo build --release -p chatgate-bench) >>"$WORK/build.log" 2>&1
    b1=$((PORT_BASE + 81))
    b2=$((PORT_BASE + 82))
    for b in "$b1" "$b2"; do
        taskset -c "$LOAD_CPUS" "$ROOT/target/release/bench-backend" --listen "127.0.0.1:$b" \
            >"$WORK/backend-$b.log" 2>&1 &
        STARTED+=("$!")
    done
    one="http://127.0.0.1:$b1"
    two="$one,http://127.0.0.1:$b2"
    : >"$WORK/affinity.tsv"
    for repeat in $(seq 1 "$AFF_REPEATS"); do
        log "affinity round $repeat/$AFF_REPEATS"
        [[ -n $COMPARE ]] && affinity_case compared-one-backend "$COMPARE" "$one" "$repeat"
        affinity_case one-backend "$CHATGATE_BIN" "$one" "$repeat"
        affinity_case two-no-cookie "$CHATGATE_BIN" "$two" "$repeat"
        affinity_case two-cookie "$CHATGATE_BIN" "$two" "$repeat"
    done
}

if [[ -n $SCALING_TSV ]]; then
    cp "$SCALING_TSV" "$WORK/scaling.tsv"
elif [[ $MODE != affinity ]]; then
    run_scaling
fi
[[ $MODE == scaling ]] || run_affinity

"$VENV/bin/python" - "$WORK" "$OUT" "$CHATS" "$RUN_SECONDS" "$WORK_MS" "$(nproc)" <<'EOF'
import json, os, statistics, sys
work, out, chats, seconds, work_ms, cpus = sys.argv[1:7]
scaling = os.path.join(work, "scaling.tsv")
rows = [l.rstrip("\n").split("\t") for l in open(scaling)] if os.path.exists(scaling) else [["work", "-"]]
rounds = rows[0][1]
runs = {}
for _, workers, repeat, blob, ticks in rows[1:]:
    result = json.loads(blob)
    busy0, total0, busy1, total1, worker_ticks, gate_ticks, hz = map(int, ticks.split())
    # CPU seconds in the run (warm-up included) and what share of the machine was idle.
    result["cpu"] = {
        "workers": worker_ticks / hz,
        "chatgate": gate_ticks / hz,
        "client": result.get("client_cpu_seconds", 0.0),
        "busy": (busy1 - busy0) / hz,
        "idle_share": 1 - (busy1 - busy0) / max(1, total1 - total0),
    }
    runs.setdefault(int(workers), []).append(result)
lines = [] if not runs else [
    "# Workers: a CPU-bound Chainlit app on 1 and 2 workers",
    "",
    f"`bench/workers.sh` on this machine ({cpus} CPUs, shared): bench/workers/app.py, {work_ms} ms of",
    f"pure Python per message ({rounds} loop rounds), {chats} concurrent python-socketio chats",
    f"(polling then WebSocket, one message in flight each), {seconds} s per run after a 3 s warm-up,",
    "behind chatgate --workers N. The load client and chatgate run on the same CPUs.",
    "",
    "| workers | replies/s per run | median | session errors | chats (replies) per worker | CPU s: workers / chatgate / client / all others, machine idle |",
    "|---:|---|---:|---:|---|---|",
]
medians = {}
for workers, results in sorted(runs.items()):
    rates = [r["replies_per_second"] for r in results]
    medians[workers] = statistics.median(rates)
    errors = sum(len(r["errors"]) for r in results)
    spread = "; ".join(
        ", ".join(
            f"w{w if w != '?' else 0}: {v['chats']} ({v['replies']})"
            for w, v in sorted(r["per_worker"].items())
        )
        for r in results
    )
    cpu = "; ".join(
        "{w:.1f} / {g:.1f} / {c:.1f} / {o:.1f}, {i:.0%}".format(
            w=r["cpu"]["workers"], g=r["cpu"]["chatgate"], c=r["cpu"]["client"],
            o=max(0.0, r["cpu"]["busy"] - r["cpu"]["workers"] - r["cpu"]["chatgate"] - r["cpu"]["client"]),
            i=r["cpu"]["idle_share"],
        )
        for r in results
    )
    lines.append(f"| {workers} | {', '.join(f'{x:.1f}' for x in rates)} | {medians[workers]:.1f} | {errors} | {spread} | {cpu} |")
if 1 in medians and 2 in medians and medians[1]:
    lines += ["", f"Scaling, 2 workers over 1: **{medians[2] / medians[1]:.2f}×** (goal ≥ 1.6×)."]
path = os.path.join(work, "affinity.tsv")
if os.path.exists(path) and os.path.getsize(path):
    lines += [
        "",
        "## What the affinity costs per request",
        "",
        "wrk -t1 -c64 GET /page (2 KiB) through chatgate (RUST_LOG=warn, pinned to its own CPU;",
        "wrk and bench-backend on the other) for 10 s per run, the cases interleaved: one backend,",
        "then two (`--backend a,b`) without a cookie (each request a new visitor: least-loaded",
        "pick and a Set-Cookie) and with the affinity cookie; chatgate's user+system CPU per request.",
        "",
        "| case | req/s per run | median req/s | CPU per request per run (µs) | median (µs) |",
        "|---|---|---:|---|---:|",
    ]
    cases = {}
    for case, _, requests, rps, cpu in (l.rstrip("\n").split("\t") for l in open(path)):
        cases.setdefault(case, []).append((float(rps), float(cpu)))
    for case, values in cases.items():
        rps = [v[0] for v in values]
        cpu = [v[1] for v in values]
        lines.append(
            f"| {case} | {', '.join(f'{x:,.0f}' for x in rps)} | {statistics.median(rps):,.0f} "
            f"| {', '.join(f'{x:.2f}' for x in cpu)} | {statistics.median(cpu):.2f} |"
        )
open(out, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
log "wrote $OUT"
