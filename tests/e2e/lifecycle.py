"""What the lifecycle tests (and the soak) check after each Compose or Docker operation settles.

The invariants are those of the lifecycle issue: exactly one running sidecar per running meshed
container, started after the app's latest start (so in its current network namespace), and none for
anything else; every running, healthy meshed container an endpoint of its service; every sidecar connected to meshd and on the current snapshot
version; every sidecar told to dial an address of this host; no problem left in `meshctl status`.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

from .conftest import ADMIN, compose_cmd, get_json, metric_sum, metrics, run, wait_for

PROJECTS = Path(__file__).resolve().parent / "projects"


def project(name: str, *args: str, file: str = "webclient.yml", **kw):
    """Compose on one of the test projects (tests/e2e/projects)."""
    return run(compose_cmd() + ["-p", name, "-f", str(PROJECTS / file), *args], **kw)


def containers(*filters: str) -> list[dict]:
    """`docker inspect` of the containers matching every filter (running or not)."""
    cmd = ["docker", "ps", "-aq", "--no-trunc"]
    for f in filters:
        cmd += ["--filter", f]
    ids = run(cmd).stdout.split()
    if not ids:
        return []
    # A container removed between the two calls is left out (docker inspect exits 1 for it).
    return json.loads(run(["docker", "inspect", *ids], check=False).stdout or "[]")


def service_containers(proj: str, service: str, running: bool = True) -> list[dict]:
    """Containers of one compose service, by Compose's labels (v1 and v2 names alike)."""
    found = containers(f"label=com.docker.compose.project={proj}", f"label=com.docker.compose.service={service}")
    return [c for c in found if c["State"]["Running"] or not running]


def ipv4(c: dict) -> str:
    """A container's IPv4 address on its Compose project's default network, else its first one (by
    network name): a network connected later (`docker network connect`) is not the one to test on."""
    nets = c["NetworkSettings"]["Networks"]
    own = f"{(c['Config'].get('Labels') or {}).get('com.docker.compose.project', '')}_default"
    order = sorted(nets, key=lambda n: (n != own, n))
    return next(nets[n]["IPAddress"] for n in order if nets[n]["IPAddress"])


def host_bridge_gateways() -> set[str]:
    """The IPv4 gateway of every bridge network on this engine now (the host's addresses on them)."""
    ids = run(["docker", "network", "ls", "-q", "--filter", "driver=bridge"]).stdout.split()
    out = set()
    for net in json.loads(run(["docker", "network", "inspect", *ids]).stdout):
        for cfg in (net.get("IPAM") or {}).get("Config") or []:
            if cfg.get("Gateway") and ":" not in cfg["Gateway"]:
                out.add(cfg["Gateway"])
    return out


def sidecar_env(sc: dict) -> dict[str, str]:
    return dict(e.split("=", 1) for e in sc["Config"]["Env"])


def mesh_violations() -> list[str]:
    """Every broken invariant of the mesh on this engine now (empty: all hold)."""
    bad = []
    apps = [c for c in containers("label=mesh.enable=true") if not c["Config"]["Labels"].get("mesh.owner")]
    running_apps = {c["Id"]: c for c in apps if c["State"]["Running"] and not c["State"]["Restarting"]}
    sidecars = [c for c in containers("label=mesh.role=sidecar") if c["State"]["Running"]]
    per_app: dict[str, list[str]] = {}
    for sc in sidecars:
        per_app.setdefault(sc["Config"]["Labels"].get("mesh.sidecar.for", ""), []).append(sc["Name"])
    status = get_json(f"{ADMIN}/v1/status", timeout=10)
    label_errors = {e["container"] for e in status["label_errors"]}
    for cid, app in running_apps.items():
        if app["Name"].lstrip("/") in label_errors:
            continue
        if len(per_app.get(cid, [])) != 1:
            bad.append(f"{app['Name']}: {len(per_app.get(cid, []))} running sidecars {per_app.get(cid, [])}")
    for sc in sidecars:
        app = running_apps.get(sc["Config"]["Labels"].get("mesh.sidecar.for", ""))
        if app is not None and sc["State"]["StartedAt"] < app["State"]["StartedAt"]:
            bad.append(f"{sc['Name']} started before its app's latest start: in a network namespace that is gone")
    for app_id, names in per_app.items():
        if app_id not in running_apps:
            bad.append(f"orphan sidecar(s) {names} of a container that is not a running meshed app")
    gateways = host_bridge_gateways()
    for sc in sidecars:
        host = sidecar_env(sc).get("MESH_CONTROL_URL", "").split("//", 1)[-1].rsplit(":", 1)[0]
        if host not in gateways and not ipaddress.ip_address(host).is_loopback:
            bad.append(f"{sc['Name']} is told to dial {host}, not an address of this host ({sorted(gateways)})")
    latest = status["meshd"]["snapshot_version"]
    nodes = {n["node"]: n for n in status["nodes"]}
    for sc in sidecars:
        node = nodes.get(sc["Name"].lstrip("/"))
        if node is None or not node["connected"]:
            bad.append(f"{sc['Name']} not connected to meshd")
        elif node["acked_version"] != latest:
            bad.append(f"{sc['Name']} ACKed {node['acked_version']}, latest is {latest}")
    endpoints = {e["instance"] for svc in get_json(f"{ADMIN}/v1/services", timeout=10)["services"]
                 for e in svc["endpoints"]}
    for cid, app in running_apps.items():
        health = (app["State"].get("Health") or {}).get("Status", "healthy")
        if app["Name"].lstrip("/") not in label_errors and health == "healthy" and cid not in endpoints:
            bad.append(f"{app['Name']} is not an endpoint of its service (not discovered yet?)")
    for err in status["label_errors"]:   # none is intended in the lifecycle projects
        bad.append(f"label error: {err['container']} {err['label']}: {err['message']}")
    for problem in status.get("problems", []):
        bad.append(f"problem: {problem['kind']} {problem['subject']}: {problem['message']}")
    return bad


def wait_mesh_ok(timeout: float = 90, what: str = "the mesh's invariants", violations=mesh_violations) -> None:
    """Poll until `violations()` is empty (every invariant holds); the last ones are in the failure message."""
    last: list[list[str]] = [[]]

    def ok() -> bool:
        last[0] = violations()
        return not last[0]

    try:
        wait_for(ok, timeout, interval=0.5, what=what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nviolations: {last[0]}") from None


def curl(proj: str, url: str, client: str = "client", timeout: float = 5) -> tuple[int, str]:
    """(HTTP status, body) of one curl from the project's client container (0: no answer)."""
    name = service_containers(proj, client)[0]["Id"]
    proc = run(["docker", "exec", name, "curl", "-s", "-m", str(timeout), "-o", "/dev/stdout", "-w", "\n%{http_code}",
                url], check=False, timeout=timeout + 10)
    body, _, code = proc.stdout.rpartition("\n")
    return (int(code) if code.strip().isdigit() else 0), body


def mtls_requests(proj: str, service: str, source: str = "client") -> float:
    """Requests from `source` that the service's sidecars served, by their own metrics. The service
    is STRICT (checked): its sidecars' inbound port takes nothing but mutual TLS."""
    assert get_json(f"{ADMIN}/v1/status")["mtls"].get(service) == "strict"
    total = 0.0
    for c in service_containers(proj, service):
        total += metric_sum(metrics(ipv4(c)), "istio_requests_total", reporter="destination",
                            source_workload=source, destination_service=service)
    return total


def calls_through_mesh(proj: str, service: str = "web", n: int = 5, url: str | None = None,
                       client: str = "client") -> None:
    """n calls from the client to the service answer 200, each counted over mTLS by the callee's sidecars."""
    before = mtls_requests(proj, service, source=client)
    for _ in range(n):
        code, body = curl(proj, url or f"http://{service}/", client=client)
        assert code == 200, (code, body[:200])
    wait_for(lambda: mtls_requests(proj, service, source=client) - before >= n, 10,
             what=f"{n} mTLS requests counted by {service}'s sidecars")
