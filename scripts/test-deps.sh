#!/bin/sh
# Test dependencies pip cannot install. systemd-analyze verifies deploy/systemd/*.service
# (tests/unit/test_systemd_units.py); on Debian it comes with the systemd package.
# Installs it only when it is missing and we are root with apt-get; otherwise does nothing
# (the test then skips, or fails under CI saying why). Quiet, idempotent, always exits 0.

command -v systemd-analyze >/dev/null 2>&1 && exit 0
[ "$(id -u)" = 0 ] || exit 0
command -v apt-get >/dev/null 2>&1 || exit 0

export DEBIAN_FRONTEND=noninteractive
install_systemd() {
    apt-get install -y -qq --no-install-recommends systemd >/dev/null 2>&1
}
# A fresh image has no package lists: update only when the first try fails.
install_systemd || { apt-get update -qq >/dev/null 2>&1 && install_systemd; } ||
    echo "test-deps: could not install systemd (for systemd-analyze); its tests will skip" >&2
exit 0
