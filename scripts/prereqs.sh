#!/usr/bin/env bash
# Installs what a fresh machine lacks to build and test Neruba, and exports the shared
# build cache. Sourced by the other scripts; safe to run again (it only installs what is missing).
set -euo pipefail

# One target directory outside the checkout, shared by tests, demo and benchmarks, so RocksDB
# and librdkafka (minutes of C++ each) are built once per machine, not once per clone.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/neruba-target}"

need_apt=()
# Ask dpkg, not the file system: a fresh image ships libclang-cpp, which is not the libclang
# that bindgen (librocksdb-sys) loads at build time.
for pkg in clang libclang-dev make g++ cmake curl; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need_apt+=("$pkg")
done
if ((${#need_apt[@]})); then
    echo "prereqs: installing ${need_apt[*]}" >&2
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
    echo "prereqs: cargo is required (Rust 1.95 or newer)" >&2
    exit 1
fi
if ! cargo nextest --version >/dev/null 2>&1; then
    echo "prereqs: installing cargo-nextest" >&2
    cargo install --locked cargo-nextest
fi

# openapi-spec-validator (PyPI), which neruba/tests/openapi.rs runs on schemas/openapi.json, in a
# virtualenv cached outside the checkout (as scripts/k8s-check keeps kubernetes-validate).
openapi_venv="$HOME/.cache/neruba-tools/venv-openapi"
openapi_validator_version="0.9.0"
if [ "$("$openapi_venv/bin/python" -c 'import importlib.metadata as m; print(m.version("openapi-spec-validator"))' 2>/dev/null)" != "$openapi_validator_version" ]; then
    rm -rf "$openapi_venv"
    mkdir -p "$(dirname "$openapi_venv")"
    # Debian's python3 creates no virtualenv without python3-venv (ensurepip).
    if ! command -v python3 >/dev/null 2>&1 || ! python3 -m venv "$openapi_venv" >/dev/null 2>&1; then
        echo "prereqs: installing python3-venv" >&2
        SUDO=""
        [ "$(id -u)" -ne 0 ] && SUDO="sudo"
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3 python3-venv >/dev/null
        rm -rf "$openapi_venv"
        python3 -m venv "$openapi_venv"
    fi
    echo "prereqs: installing openapi-spec-validator==$openapi_validator_version into $openapi_venv" >&2
    "$openapi_venv/bin/pip" install --quiet --disable-pip-version-check \
        "openapi-spec-validator==$openapi_validator_version" >&2
fi
