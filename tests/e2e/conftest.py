"""End-to-end fixtures: a real Docker engine, the mesh images, meshd and the demo shop.

Under CI=true a missing Docker engine is a failure, never a skip.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROJECT = "shop"
GATEWAY = "http://127.0.0.1:8080"
ADMIN = "http://127.0.0.1:15014"


def compose_cmd() -> list[str]:
    """docker-compose (1.29) when present, else `docker compose` (v2)."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return ["docker", "compose"]


def run(cmd: list[str], check: bool = True, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """Run a command, capturing text output; raise with its output on failure."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def compose(*args: str, project: str = PROJECT, file: str = "compose/demo.yml", **kw):
    """Run compose on one of our compose files."""
    return run(compose_cmd() + ["-p", project, "-f", file, *args], **kw)


def recreate_meshd(name: str, value: str | None) -> None:
    """`compose up` meshd (compose/meshd.yml) with setting `name` set to `value`, or unset (the
    file's default) when None: meshd is recreated when that changes its environment."""
    env = {k: v for k, v in os.environ.items() if k != name}
    if value:
        env[name] = value
    compose("up", "-d", project="meshd", file="compose/meshd.yml", env=env)


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None,
         timeout: float = 5.0) -> tuple[int, dict, bytes]:
    """A plain HTTP call: (status, headers, body); HTTP errors are returned, not raised."""
    headers = dict(headers or {})
    if url.startswith(ADMIN) and "Authorization" not in headers:
        from meshctl.api import load_admin_token  # the admin API requires meshd's admin token

        token = load_admin_token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def get_json(url: str, timeout: float = 5.0):
    """GET and decode JSON; raises on a non-200 answer."""
    status, _, body = http("GET", url, timeout=timeout)
    assert status == 200, f"GET {url} -> {status}: {body[:300]!r}"
    return json.loads(body)


def wait_for(predicate, timeout: float, interval: float = 0.2, what: str = "condition"):
    """Poll `predicate` until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - keep polling, report the last error
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last error: {last_exc!r}")


def docker_ps(*filters: str, all_: bool = False) -> list[dict]:
    """`docker ps` as dicts, with filters like `label=mesh.role=sidecar`."""
    cmd = ["docker", "ps", "--no-trunc", "--format", "{{json .}}"]
    if all_:
        cmd.append("-a")
    for f in filters:
        cmd += ["--filter", f]
    return [json.loads(line) for line in run(cmd).stdout.splitlines() if line.strip()]


def container_ip(name: str) -> str:
    """The first IPv4 address of a container."""
    out = run(["docker", "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}", name]).stdout
    return out.split()[0]


def metrics(ip: str, port: int = 15020) -> str:
    """The Prometheus text of a sidecar (or gateway) admin port."""
    status, _, body = http("GET", f"http://{ip}:{port}/metrics")
    assert status == 200
    return body.decode()


def metric_sum(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include all of `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


@pytest.fixture(scope="session")
def e2e_lock():
    """One end-to-end session per Docker engine at a time: the mesh is a host singleton (ports
    8080, 15010, 15014), so concurrent runs wait here instead of tearing each other down."""
    import fcntl

    with open(os.environ.get("MESH_E2E_LOCK", "/tmp/meshd-e2e.lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield
        fcntl.flock(fh, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def docker_engine(e2e_lock):
    """A reachable Docker engine: fail under CI, skip elsewhere."""
    ok = shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True).returncode == 0
    if not ok:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true but no Docker engine is reachable (run `make docker`)")
        pytest.skip("no Docker engine (run `make docker`)")
    return True


@pytest.fixture(scope="session")
def images(docker_engine):
    """The mesh and demo images, built from this checkout."""
    if os.environ.get("MESH_SKIP_IMAGE_BUILD") != "1":
        run(["make", "-s", "images", "test-images"], timeout=1200)
    return True


def _down_all():
    compose("down", "-v", "--remove-orphans", check=False, timeout=120)
    compose("down", "-v", project="meshd", file="compose/meshd.yml", check=False, timeout=120)
    ids = run(["docker", "ps", "-aq", "--filter", "label=mesh.owner=meshd"]).stdout.split()
    if ids:
        run(["docker", "rm", "-f", *ids], check=False)


@pytest.fixture(scope="session")
def mesh(images):
    """meshd (from compose/meshd.yml) and the demo shop, up and serving through the gateway."""
    _down_all()
    # The control loop relaxes a tightened policy after 10 s of health here (60 s by default), so
    # the observability test can watch a whole tighten/relax cycle.
    os.environ.setdefault("MESH_TIGHTEN_RECOVERY_S", "10")
    compose("up", "-d", project="meshd", file="compose/meshd.yml")
    compose("up", "-d")
    wait_for(lambda: http("GET", f"{GATEWAY}/api/orders/1", timeout=3)[0] == 200, 120,
             what="the shop to answer through the gateway")
    yield
    if os.environ.get("MESH_KEEP_E2E") != "1":
        _down_all()
