# Sourced by scripts/test: installs Debian's Prometheus server, which the dashboard test
# (neruba/tests/dashboard.rs) starts on a loopback port to check every dashboard query.
if ! dpkg-query -W -f='${Status}' prometheus 2>/dev/null | grep -q "install ok installed"; then
    echo "prereqs: installing prometheus" >&2
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

