#!/bin/sh
# Test dependencies pip cannot install, from Debian's packages:
# - systemd, for systemd-analyze, which verifies deploy/systemd/*.service
#   (tests/deploy/test_systemd_units.py);
# - chromium (and a font for readable screenshots), the headless browser that renders the
#   status page at /ui (tests/integration/test_ui.py).
# Installs only what is missing, and only when we are root with apt-get; otherwise does nothing
# (the tests then skip, or fail under CI saying why). Quiet, idempotent, always exits 0.

missing=""
command -v systemd-analyze >/dev/null 2>&1 || missing="$missing systemd"
command -v chromium >/dev/null 2>&1 || missing="$missing chromium fonts-dejavu-core"
[ -n "$missing" ] || exit 0
[ "$(id -u)" = 0 ] || exit 0
command -v apt-get >/dev/null 2>&1 || exit 0

export DEBIAN_FRONTEND=noninteractive
install_missing() {
    # shellcheck disable=SC2086  # $missing is a list of package names
    apt-get install -y -qq --no-install-recommends $missing >/dev/null 2>&1
}
# A fresh image has no package lists: update only when the first try fails.
install_missing || { apt-get update -qq >/dev/null 2>&1 && install_missing; } ||
    echo "test-deps: could not install$missing; the tests that need them will skip" >&2
exit 0
