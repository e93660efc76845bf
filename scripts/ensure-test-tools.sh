#!/usr/bin/env bash
# Debian packages the tests drive for real: Chromium for the dashboard's browser test (Playwright
# is pointed at /usr/bin/chromium; `playwright install` is never run). Safe to run again.
set -euo pipefail
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
missing=()
command -v chromium >/dev/null || missing+=(chromium)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "ensure-test-tools: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
