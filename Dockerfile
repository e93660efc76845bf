# meshd:latest - one image for meshd (control plane), sidecar, gateway and meshctl.
#
# Installs the project from wheels made on the host (`make wheels`: meshd compiled for the host's
# Python, its data path built with Cython by setup.py, and meshd pure, py3-none-any; then every
# dependency's wheel).
#   ours:  make image   (= docker build --build-arg BASE=mesh-base:bookworm
#                          --build-arg PIP_ARGS=--no-index -t meshd:latest .)
#          offline: the base has iptables, and every wheel comes from wheels/.
#   users: make wheels && docker build -t meshd:latest .
#          on python:3.12-slim pip takes what fits from wheels/ (the compiled meshd when the
#          host's Python is 3.12 too, else the pure one) and the rest from PyPI, and iptables
#          comes from apt.
# Works with the legacy builder (Docker 20.10 without buildx): no syntax directive,
# no RUN --mount; the wheels stay in the build stage, out of the final image.
ARG BASE=python:3.12-slim

FROM ${BASE} AS build
ARG PIP_ARGS=""
COPY wheels/ /tmp/wheels/
RUN python3 -m venv /opt/mesh \
 && /opt/mesh/bin/pip install --no-cache-dir --disable-pip-version-check --root-user-action=ignore \
        ${PIP_ARGS} --find-links /tmp/wheels meshd

FROM ${BASE}
# The sidecar installs nat rules (iptables) as root, then drops to uid 1337 (Istio's
# proxy uid), which the rules exempt from capture.
RUN set -e; missing=""; \
    command -v iptables >/dev/null 2>&1 || missing="$missing iptables"; \
    command -v ip >/dev/null 2>&1 || missing="$missing iproute2"; \
    if [ -n "$missing" ]; then \
        apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $missing \
        && rm -rf /var/lib/apt/lists/*; \
    fi; \
    groupadd --gid 1337 mesh \
    && useradd --uid 1337 --gid 1337 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin mesh
COPY --from=build /opt/mesh /opt/mesh
ENV PATH=/opt/mesh/bin:$PATH \
    PYTHONUNBUFFERED=1
LABEL org.opencontainers.image.title="meshd" \
      org.opencontainers.image.description="meshd, sidecar, gateway and meshctl"
CMD ["meshd", "run"]
