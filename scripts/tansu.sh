#!/usr/bin/env bash
# The real Kafka-protocol broker the fault tests start (tansu, from crates.io), built once per
# machine into a cache outside the checkout. Sourced by scripts/test; exports NERUBA_TANSU.
set -euo pipefail

NERUBA_TOOLS="${NERUBA_TOOLS:-$HOME/.cache/neruba-tools}"
TANSU_VERSION="0.6.0"
export NERUBA_TANSU="${NERUBA_TANSU:-$NERUBA_TOOLS/bin/tansu}"
if ! "$NERUBA_TANSU" --version 2>/dev/null | grep -q "$TANSU_VERSION"; then
    echo "prereqs: building tansu $TANSU_VERSION into $NERUBA_TOOLS (once per machine, ~15 minutes)" >&2
    CARGO_TARGET_DIR="$NERUBA_TOOLS/target" cargo install --locked tansu \
        --version "$TANSU_VERSION" --features dynostore,libsql --root "$NERUBA_TOOLS"
    export NERUBA_TANSU="$NERUBA_TOOLS/bin/tansu"
fi
