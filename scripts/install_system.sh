#!/usr/bin/env bash
# Install the system packages the tests run for real: Debian's prometheus (with promtool)
# and prometheus-alertmanager (with amtool). A quick no-op when they are already there.
# Usage: bash scripts/install_system.sh   (uses sudo when not root)
set -euo pipefail

PACKAGES=(prometheus prometheus-alertmanager)
BINARIES=(/usr/bin/prometheus /usr/bin/promtool /usr/bin/prometheus-alertmanager /usr/bin/amtool)

missing=()
for binary in "${BINARIES[@]}"; do
    [[ -x $binary ]] || missing+=("$binary")
done
if ((${#missing[@]} == 0)); then
    exit 0
fi

cannot_install() {
    echo "install_system.sh: missing ${missing[*]}; $1." >&2
    echo "Install the Debian/Ubuntu packages yourself: apt-get install -y --no-install-recommends ${PACKAGES[*]}" >&2
    exit 1
}

command -v apt-get >/dev/null || cannot_install "apt-get is not available"
if ((EUID == 0)); then
    SUDO=()
elif command -v sudo >/dev/null; then
    SUDO=(sudo)
else
    cannot_install "not root and no sudo"
fi

# The packages' maintainer scripts may start the daemons on 0.0.0.0:9090/9093 (systemd or
# sysvinit); the tests start their own on loopback. Remember which daemons ran before.
daemon_pids() {
    if id -u prometheus >/dev/null 2>&1; then
        pgrep -u prometheus -f '^/usr/bin/prometheus(-alertmanager)?( |$)' || true
    fi
}
before=$(daemon_pids)

echo "install_system.sh: installing ${PACKAGES[*]} (missing ${missing[*]})" >&2
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq || cannot_install "apt-get update failed"
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" \
    || cannot_install "apt-get install failed"

for service in "${PACKAGES[@]}"; do
    if [[ -d /run/systemd/system ]]; then
        "${SUDO[@]}" systemctl stop "$service" 2>/dev/null || true
    elif [[ -x /etc/init.d/$service ]]; then
        "${SUDO[@]}" "/etc/init.d/$service" stop >/dev/null 2>&1 || true
    fi
done
# Anything the install started and the service manager did not stop: end it by pid.
for pid in $(daemon_pids); do
    if ! grep -qx "$pid" <<<"$before"; then
        "${SUDO[@]}" kill "$pid" 2>/dev/null || true
    fi
done

for binary in "${BINARIES[@]}"; do
    [[ -x $binary ]] || cannot_install "$binary is still missing after apt-get install"
done
echo "install_system.sh: installed ${PACKAGES[*]}" >&2
