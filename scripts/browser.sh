#!/usr/bin/env bash
# Installs headless Chromium and its chromedriver (Debian packages `chromium` and
# `chromium-driver`) for the console's browser test (neruba/tests/console.rs), when missing.
# Sourced by scripts/test; safe to run again. The test itself fails with a clear message when
# neither is there (it never passes without a browser).
set -euo pipefail

need_browser=()
for pkg in chromium chromium-driver; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need_browser+=("$pkg")
done
if ((${#need_browser[@]})); then
    echo "browser: installing ${need_browser[*]}" >&2
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_browser[@]}" >/dev/null
fi
unset need_browser
