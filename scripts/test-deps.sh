#!/bin/sh
# Test dependencies pip cannot install, from Debian's packages:
# - systemd, for systemd-analyze, which verifies deploy/systemd/*.service
#   (tests/deploy/test_systemd_units.py);
# - chromium (and a font for readable screenshots), the headless browser that renders the
#   status page at /ui (tests/integration/test_ui.py);
# - nodejs and npm, to run the ollama package for JavaScript against corral
#   (tests/integration/test_js_client.py); the package itself comes from the npm registry,
#   at the version tests/js/package.json pins, into tests/js/node_modules;
# - redis-server, the Redis that several corral replicas share (tests/cluster/ start one on a
#   free loopback port).
# Installs only what is missing, and only when we are root with apt-get; otherwise does nothing
# (the tests then skip, or fail under CI saying why). Quiet, idempotent, always exits 0.

missing=""
command -v systemd-analyze >/dev/null 2>&1 || missing="$missing systemd"
command -v chromium >/dev/null 2>&1 || missing="$missing chromium fonts-dejavu-core"
command -v node >/dev/null 2>&1 || missing="$missing nodejs"
command -v npm >/dev/null 2>&1 || missing="$missing npm"
command -v redis-server >/dev/null 2>&1 || missing="$missing redis-server"

if [ -n "$missing" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    install_missing() {
        # shellcheck disable=SC2086  # $missing is a list of package names
        apt-get install -y -qq --no-install-recommends $missing >/dev/null 2>&1
    }
    # A fresh image has no package lists: update only when the first try fails.
    install_missing || { apt-get update -qq >/dev/null 2>&1 && install_missing; } ||
        echo "test-deps: could not install$missing; the tests that need them will skip" >&2
fi

# The JavaScript clients, when npm is here and the pinned version is not installed yet.
js="$(dirname "$0")/../tests/js"
want=$(sed -n 's/.*"ollama": "\(.*\)".*/\1/p' "$js/package.json")
have=$(sed -n 's/^  "version": "\(.*\)".*/\1/p' "$js/node_modules/ollama/package.json" 2>/dev/null)
if command -v npm >/dev/null 2>&1 && [ "$want" != "$have" ]; then
    (cd "$js" && npm install --no-package-lock --no-audit --no-fund --silent >/dev/null 2>&1) ||
        echo "test-deps: could not install the ollama package for JavaScript; its test will skip" >&2
fi
exit 0
