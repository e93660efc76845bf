#!/usr/bin/env bash
# Build the base image mesh-base:bookworm without any image registry:
# debootstrap a minimal Debian into a folder, tar it, `docker import` the tarball.
#
# Needs root, debootstrap and a Docker engine; reaches only the Debian mirror.
# Idempotent: does nothing when the image exists, unless FORCE=1.
# The rootfs tarball is cached in .cache/ (keyed by suite and package list), so a
# missing image is re-imported in seconds; FORCE=1 also rebuilds the tarball.
#
# Environment:
#   IMAGE           image to make            (mesh-base:bookworm)
#   SUITE           Debian suite             (bookworm)
#   MIRROR          Debian mirror            (http://deb.debian.org/debian)
#   EXTRA_PACKAGES  more packages, comma-separated (e.g. tcpdump)
#   CACHE_DIR       where the tarball goes   (<repo>/.cache)
#   FORCE=1         rebuild even if the image exists
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
IMAGE="${IMAGE:-mesh-base:bookworm}"
SUITE="${SUITE:-bookworm}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
CACHE_DIR="${CACHE_DIR:-$here/.cache}"
FORCE="${FORCE:-0}"
# python3-venv: the images make their venvs with Debian's python3 (3.11, like the host's wheels).
# iptables, iproute2: transparent capture in the sidecar. curl: handy in tests and debugging.
PACKAGES="python3,python3-venv,iptables,iproute2,ca-certificates,curl${EXTRA_PACKAGES:+,$EXTRA_PACKAGES}"

log() { echo "build-base: $*" >&2; }

if [ "$FORCE" != 1 ] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
    log "$IMAGE exists (FORCE=1 rebuilds it)"
    exit 0
fi
[ "$(id -u)" = 0 ] || { log "must run as root (debootstrap)"; exit 1; }
command -v debootstrap >/dev/null || { log "debootstrap missing (make docker installs it)"; exit 1; }

mkdir -p "$CACHE_DIR"
exec 9>"$CACHE_DIR/build-base.lock"
flock 9    # two builds at once would race on the same tarball

key="$(printf '%s %s' "$SUITE" "$PACKAGES" | sha256sum | cut -c1-12)"
tarball="$CACHE_DIR/mesh-base-$SUITE-$key.tar"

if [ "$FORCE" = 1 ] || [ ! -s "$tarball" ]; then
    rootfs="$(mktemp -d "$CACHE_DIR/rootfs.XXXXXX")"
    trap 'rm -rf "$rootfs" "$tarball.tmp"' EXIT
    log "debootstrap $SUITE from $MIRROR with $PACKAGES"
    debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$MIRROR" \
        >"$CACHE_DIR/debootstrap.log" 2>&1 \
        || { tail -n 30 "$CACHE_DIR/debootstrap.log" >&2; log "debootstrap failed (log: $CACHE_DIR/debootstrap.log)"; exit 1; }
    # Slim it like Debian's docker images: no package lists or caches, no docs or locales
    # (copyright files stay); later `apt-get install` needs `apt-get update` first.
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
        "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/log/bootstrap.log \
        "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/* "$rootfs"/usr/share/info/*
    find "$rootfs"/usr/share/doc -mindepth 1 -not -name copyright -not -type d -delete
    cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker-slim" <<'EOF'
path-exclude /usr/share/man/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/info/*
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
EOF
    printf 'APT::Install-Recommends "false";\n' >"$rootfs/etc/apt/apt.conf.d/docker-no-recommends"
    # Docker bind-mounts these per container; don't ship the build host's.
    : >"$rootfs/etc/resolv.conf"
    rm -f "$rootfs/etc/hostname"
    tar --numeric-owner -C "$rootfs" -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
    rm -rf "$rootfs"
    trap - EXIT
else
    log "using cached $tarball"
fi

log "importing $IMAGE"
docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    --message "debootstrap --variant=minbase $SUITE +$PACKAGES" \
    "$tarball" "$IMAGE" >/dev/null
# Drop older cached tarballs (other package lists); keep the current one.
find "$CACHE_DIR" -maxdepth 1 -name "mesh-base-$SUITE-*.tar" ! -name "$(basename "$tarball")" -delete
log "built $IMAGE ($(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%d MB", $1/1e6}'))"
