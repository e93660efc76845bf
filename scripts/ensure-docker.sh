#!/usr/bin/env bash
# Make sure a Docker engine runs here, with what the builds and tests need:
#   - installs docker.io, docker-compose, iptables, debootstrap with apt-get when one is missing
#   - starts dockerd in the background when `docker info` fails, and waits up to 30 s for it
# For Debian/Ubuntu hosts; run as root (or with sudo available). Safe to run again and again.
# Env: DOCKERD_ARGS (extra dockerd flags), DOCKERD_PIDFILE (/var/run/docker.pid),
#      DOCKERD_LOG (/var/log/dockerd.log).
set -euo pipefail

SUDO=""
if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || { echo "ensure-docker: run as root" >&2; exit 1; }
    SUDO="sudo"
fi
log() { echo "ensure-docker: $*" >&2; }
DOCKERD_ARGS="${DOCKERD_ARGS:-}"
DOCKERD_PIDFILE="${DOCKERD_PIDFILE:-/var/run/docker.pid}"
DOCKERD_LOG="${DOCKERD_LOG:-/var/log/dockerd.log}"

# Which Debian packages are missing? (a docker CLI alone, without dockerd, is not enough)
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 || missing+=(docker-compose)
command -v iptables >/dev/null || [ -x /usr/sbin/iptables ] || missing+=(iptables)
command -v debootstrap >/dev/null || [ -x /usr/sbin/debootstrap ] || missing+=(debootstrap)
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if timeout 20 docker info >/dev/null 2>&1; then
    exit 0
fi

if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    log "starting docker (systemctl)"
    $SUDO systemctl start docker || true
fi
if timeout 20 docker info >/dev/null 2>&1; then
    exit 0
elif [ -s "$DOCKERD_PIDFILE" ] && $SUDO kill -0 "$(cat "$DOCKERD_PIDFILE")" 2>/dev/null; then
    log "dockerd (pid $(cat "$DOCKERD_PIDFILE")) runs but does not answer yet; waiting"
else
    log "starting dockerd in the background (log: $DOCKERD_LOG)"
    # setsid + nohup: dockerd outlives this script, make and the CI step that ran them.
    # shellcheck disable=SC2086
    $SUDO sh -c "exec setsid nohup dockerd --pidfile '$DOCKERD_PIDFILE' $DOCKERD_ARGS \
        >>'$DOCKERD_LOG' 2>&1 </dev/null" &
fi

for _ in $(seq 1 30); do
    if timeout 5 docker info >/dev/null 2>&1; then
        log "docker is up ($(docker version -f '{{.Server.Version}}' 2>/dev/null))"
        exit 0
    fi
    sleep 1
done
log "docker did not come up within 30 s; last lines of $DOCKERD_LOG:"
tail -n 20 "$DOCKERD_LOG" >&2 || true
exit 1
