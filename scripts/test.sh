#!/usr/bin/env bash
# Every test suite of chatgate, in one command:
#   1. cargo test: unit tests and the integration tests (real sockets on loopback),
#   2. tests/ship/run.sh: Dockerfile, entrypoint.sh, probes.yaml and deploy.ps1 checks,
#   3. tests/e2e/run.sh: a real Chainlit app behind chatgate, a real Socket.IO client and
#      headless Chromium.
# Each suite installs what it needs on a fresh Debian machine. All suites run even when one
# fails; the last line sums them up as "N passed, M failed", and the exit status is non-zero
# when anything failed.
#
#   scripts/test.sh            # everything
#   scripts/test.sh cargo      # only the named suites: cargo, ship, e2e
set -uo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root" || exit 2
logs=$root/target/test-logs
mkdir -p "$logs"
suites=("$@")
[ ${#suites[@]} -gt 0 ] || suites=(cargo ship e2e)

passed=0
failed=0
broken=()

count() { # log-file: adds the suite's passed/failed counts from its summary lines
    local log=$1 p f
    case $2 in
        cargo)
            p=$(awk '/^test result:/ { for (i = 1; i < NF; i++) if ($(i + 1) ~ /^passed/) s += $i } END { print s + 0 }' "$log")
            f=$(awk '/^test result:/ { for (i = 1; i < NF; i++) if ($(i + 1) ~ /^failed/) s += $i } END { print s + 0 }' "$log")
            ;;
        ship)
            # pytest's closing line, e.g. "== 36 passed, 1 xfailed in 22.1s ==".
            p=$(grep -oE '[0-9]+ passed' "$log" | tail -n 1 | cut -d' ' -f1)
            f=$(grep -oE '[0-9]+ failed' "$log" | tail -n 1 | cut -d' ' -f1)
            ;;
        e2e)
            p=$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$log" | tail -n 1 | sed -E 's/^([0-9]+) passed.*/\1/')
            f=$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$log" | tail -n 1 | sed -E 's/.* ([0-9]+) failed.*/\1/')
            ;;
    esac
    passed=$((passed + ${p:-0}))
    failed=$((failed + ${f:-0}))
}

run() { # name command...
    local name=$1 log=$logs/$1.log started rc
    shift
    printf '\n===== %s: %s\n' "$name" "$*"
    started=$SECONDS
    "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    printf '===== %s: exit %s after %ss\n' "$name" "$rc" $((SECONDS - started))
    count "$log" "$name"
    if [ "$rc" -ne 0 ]; then
        broken+=("$name")
        # A suite that died before counting anything still counts as one failure.
        grep -qE '(passed|failed)' "$log" || failed=$((failed + 1))
    fi
}

for suite in "${suites[@]}"; do
    case $suite in
        cargo) run cargo cargo test --locked ;;
        ship) run ship tests/ship/run.sh ;;
        e2e) run e2e tests/e2e/run.sh ;;
        *) echo "scripts/test.sh: unknown suite $suite (cargo, ship, e2e)" >&2; exit 2 ;;
    esac
done

echo
[ ${#broken[@]} -eq 0 ] || echo "suites that failed: ${broken[*]} (logs in target/test-logs/)"
echo "$passed passed, $failed failed"
[ ${#broken[@]} -eq 0 ] && [ "$failed" -eq 0 ]
