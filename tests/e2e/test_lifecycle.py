"""Lifecycle, end to end: the mesh keeps up with what Compose and Docker do to a project.

A third-party project (Debian's nginx and a curl client, labels only) beside the demo shop, brought
up, down, up, scaled, restarted, recreated, re-networked, and its sidecar killed. After each
operation settles: the invariants of tests/e2e/lifecycle.py hold and calls still pass with mTLS.
The tests run in file order on one project.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from .conftest import ADMIN, GATEWAY, ROOT, compose, get_json, http, metric_sum, metrics, run, wait_for
from .lifecycle import (
    calls_through_mesh, containers, curl, host_bridge_gateways, ipv4, mesh_violations, mtls_requests, project,
    service_containers, sidecar_env, wait_mesh_ok,
)

pytestmark = pytest.mark.e2e

P = "lc"
HOLD_NET = "lc-subnet-hold"
SHARED_NET = "mesh-projects"   # tests/e2e/projects/namedweb.yml's network


def gateway_of(network: str) -> str:
    net = json.loads(run(["docker", "network", "inspect", network]).stdout)[0]
    return next(c["Gateway"] for c in net["IPAM"]["Config"] if ":" not in c.get("Gateway", ":"))


def sidecar_of(app: dict) -> dict:
    found = [c for c in containers(f"label=mesh.sidecar.for={app['Id']}") if c["State"]["Running"]]
    assert len(found) == 1, [c["Name"] for c in found]
    return found[0]


@pytest.fixture(scope="module")
def lc(mesh):
    project(P, "down", "-v", "--remove-orphans", check=False)
    run(["docker", "network", "rm", HOLD_NET], check=False)
    project(P, "up", "-d")
    wait_mesh_ok(what="the lc project meshed")
    yield P
    project(P, "down", "-v", "--remove-orphans", check=False)
    run(["docker", "network", "rm", HOLD_NET], check=False)


def test_third_party_project_is_meshed(lc):
    calls_through_mesh(lc)
    web = service_containers(lc, "web")[0]
    env = sidecar_env(sidecar_of(web))
    assert env["MESH_SERVICE"] == "web" and env["MESH_NAMESPACE"] == lc and env["MESH_APP_PORT"] == "80"


def test_down_then_up_with_a_new_subnet(lc):
    """The reported defect: `down` + `up` re-creates `<project>_default` under its name with a new
    subnet; the new sidecars must dial the new gateway and get a snapshot and a certificate."""
    old_gateway = gateway_of(f"{lc}_default")
    project(lc, "down")
    # Hold the freed subnet so that Docker must give the re-created network another one.
    run(["docker", "network", "create", HOLD_NET])
    project(lc, "up", "-d")
    new_gateway = gateway_of(f"{lc}_default")
    assert new_gateway != old_gateway
    wait_mesh_ok(what="the re-created project meshed")
    for svc in ("web", "client"):
        env = sidecar_env(sidecar_of(service_containers(lc, svc)[0]))
        assert f"//{new_gateway}:" in env["MESH_CONTROL_URL"], env["MESH_CONTROL_URL"]
    assert old_gateway not in host_bridge_gateways() or old_gateway == gateway_of(HOLD_NET)
    calls_through_mesh(lc)
    # and a later project on the host is not broken either: down + up once more
    project(lc, "down")
    project(lc, "up", "-d")
    wait_mesh_ok(what="the project meshed after a second down + up")
    calls_through_mesh(lc)
    status = get_json(f"{ADMIN}/v1/status")
    assert status["problems"] == [] and not status.get("unconnected")


def test_scale_up_and_down(lc):
    project(lc, "up", "-d", "--no-recreate", "--scale", "web=3")
    wait_mesh_ok(what="3 web replicas meshed")
    assert len(service_containers(lc, "web")) == 3
    calls_through_mesh(lc, n=9)
    project(lc, "up", "-d", "--no-recreate", "--scale", "web=1")
    wait_mesh_ok(what="back to one web replica")
    # sidecars carry no Compose label: Compose never takes them for containers of its own
    assert containers("label=mesh.role=sidecar", f"label=com.docker.compose.project={lc}") == []
    calls_through_mesh(lc)


def test_restart_and_stop_start(lc):
    before = service_containers(lc, "web")[0]
    project(lc, "restart", "web")
    wait_mesh_ok(what="web restarted")
    after = service_containers(lc, "web")[0]
    assert after["Id"] == before["Id"] and after["State"]["StartedAt"] != before["State"]["StartedAt"]
    assert sidecar_of(after)["State"]["StartedAt"] > after["State"]["StartedAt"]  # a new one, in the new namespace
    calls_through_mesh(lc)
    project(lc, "stop", "web")
    wait_mesh_ok(what="web stopped: its sidecar gone")
    assert curl(lc, "http://web/", timeout=3)[0] != 200
    project(lc, "start", "web")
    wait_mesh_ok(what="web started again")
    calls_through_mesh(lc)


def test_force_recreate(lc):
    old = {c["Id"] for c in service_containers(lc, "web") + service_containers(lc, "client")}
    project(lc, "up", "-d", "--force-recreate")
    new = {c["Id"] for c in service_containers(lc, "web") + service_containers(lc, "client")}
    assert not old & new
    wait_mesh_ok(what="recreated containers meshed")
    calls_through_mesh(lc)


def test_network_connect_and_disconnect(lc):
    """An app joins a second network and leaves it again while running: one sidecar throughout,
    dialling an address of this host, and calls keep passing."""
    extra = f"{lc}-extra"
    run(["docker", "network", "rm", extra], check=False)
    run(["docker", "network", "create", extra])
    try:
        client = service_containers(lc, "client")[0]
        run(["docker", "network", "connect", extra, client["Id"]])
        wait_mesh_ok(what="client on two networks")
        calls_through_mesh(lc)
        run(["docker", "network", "disconnect", extra, client["Id"]])
        wait_mesh_ok(what="client back on one network")
        calls_through_mesh(lc)
    finally:
        run(["docker", "network", "rm", extra], check=False)


def test_killed_sidecar_is_replaced(lc):
    web = service_containers(lc, "web")[0]
    old = sidecar_of(web)
    run(["docker", "kill", old["Id"]])
    wait_for(lambda: sidecar_of(web)["Id"] != old["Id"] or sidecar_of(web)["State"]["StartedAt"]
             != old["State"]["StartedAt"], 60, what="a new sidecar for web")
    wait_mesh_ok(what="the replaced sidecar connected")
    calls_through_mesh(lc)


def test_killed_gateway_is_replaced(lc):
    gw = [c for c in containers("label=mesh.role=gateway") if c["State"]["Running"]]
    assert len(gw) == 1
    run(["docker", "kill", gw[0]["Id"]])

    def replaced() -> bool:
        now = [c for c in containers("label=mesh.role=gateway") if c["State"]["Running"]]
        return len(now) == 1 and now[0]["State"]["StartedAt"] != gw[0]["State"]["StartedAt"]

    wait_for(replaced, 60, what="a running gateway again")
    wait_for(lambda: any(n["node"] == "gateway" and n["connected"] for n in get_json(f"{ADMIN}/v1/status")["nodes"]),
             60, what="the gateway connected to meshd")
    assert mesh_violations() == []


def first_call(proj: str, service: str) -> str:
    """What the service's client wrote for its first call (an HTTP status; 000: no answer)."""
    cid = service_containers(proj, service)[0]["Id"]
    return wait_for(lambda: run(["docker", "exec", cid, "cat", "/tmp/first"], check=False).stdout.strip(),
                    30, what=f"{service}'s first call to finish")


def test_start_is_held_until_the_sidecar_is_ready(mesh):
    """An app that calls the moment it starts: held (paused) by meshd until its sidecar is ready,
    its first call goes through the mesh. Without the hold (mesh.hold=false) the same first call
    leaves before the sidecar exists; what it gets then is recorded, not asserted."""
    fp = "lcfirst"
    project(fp, "down", "-v", file="firstcall.yml", check=False)
    try:
        project(fp, "up", "-d", "firstweb", file="firstcall.yml")
        wait_mesh_ok(what="firstweb meshed")
        outcomes = {"early": [], "early-nohold": []}
        for attempt in range(3):
            before = mtls_requests(fp, "firstweb", source="early")
            if attempt == 0:
                project(fp, "up", "-d", "early", "early-nohold", file="firstcall.yml")
            else:
                project(fp, "restart", "early", "early-nohold", file="firstcall.yml")
            for svc in outcomes:
                outcomes[svc].append(first_call(fp, svc))
            assert outcomes["early"][-1] == "200", outcomes
            wait_for(lambda: mtls_requests(fp, "firstweb", source="early") > before, 10,
                     what="firstweb's sidecar to count early's first call")
            wait_mesh_ok(what="the clients meshed")
            for svc in outcomes:   # the next start writes its own first call
                run(["docker", "exec", service_containers(fp, svc)[0]["Id"], "rm", "-f", "/tmp/first"])
        print(f"first calls at start: held {outcomes['early']}, not held {outcomes['early-nohold']}")
        assert outcomes["early"] == ["200"] * 3, outcomes
    finally:
        project(fp, "down", "-v", file="firstcall.yml", check=False)


def test_image_rebuilt_and_service_recreated(lc):
    """A new build of the app's image: `up -d` recreates the service; the new container is meshed."""
    tag = "mesh-nginx:lc-rebuilt"
    run(["docker", "build", "-q", "-t", tag, "-"], input="FROM mesh-nginx:bookworm\nLABEL rebuilt=1\n")
    try:
        old = service_containers(lc, "web")[0]["Id"]
        project(lc, "up", "-d", env={**os.environ, "MESH_TEST_WEB_IMAGE": tag}, file="webclient.yml")
        new = service_containers(lc, "web")[0]
        assert new["Id"] != old and new["Config"]["Image"] == tag
        wait_mesh_ok(what="the rebuilt web meshed")
        calls_through_mesh(lc)
    finally:
        project(lc, "up", "-d")
        run(["docker", "rmi", tag], check=False)


def test_compose_v2_container_names(lc):
    """Compose v2 names containers `<project>-<service>-1`: meshd goes by labels, not names."""
    name = f"{lc}-v2web-1"
    run(["docker", "rm", "-f", name], check=False)
    run(["docker", "run", "-d", "--name", name, "--network", f"{lc}_default", "--network-alias", "v2web",
         "--label", f"com.docker.compose.project={lc}", "--label", "com.docker.compose.service=v2web",
         "--label", "mesh.enable=true", "--label", "mesh.port=80",
         "mesh-nginx:bookworm", "nginx", "-g", "daemon off;"])
    try:
        wait_mesh_ok(what="a v2-named container meshed")
        assert sidecar_of(containers(f"name=^/{name}$")[0])["Name"] == f"/{name}-mesh"
        calls_through_mesh(lc, service="v2web")
    finally:
        run(["docker", "rm", "-f", name], check=False)
    wait_mesh_ok(what="its sidecar removed with it")


def test_crash_looping_app_leaves_no_orphans(lc):
    """An app restarted by Docker every second: at most one sidecar for it at any moment, no orphan
    afterwards, and the other project's calls keep passing meanwhile."""
    cp = "lccrash"
    project(cp, "down", file="crashloop.yml", check=False)
    project(cp, "up", "-d", file="crashloop.yml")
    try:
        deadline = time.monotonic() + 15
        restarts = 0
        while time.monotonic() < deadline:
            flaky = service_containers(cp, "flaky", running=False)
            assert len(flaky) == 1
            restarts = flaky[0]["RestartCount"]
            running = [c for c in containers(f"label=mesh.sidecar.for={flaky[0]['Id']}") if c["State"]["Running"]]
            assert len(running) <= 1, [c["Name"] for c in running]
            calls_through_mesh(lc, n=1)
        assert restarts >= 3
    finally:
        project(cp, "down", file="crashloop.yml", check=False)
    wait_mesh_ok(what="no sidecar left of the crash-looping app")


def test_meshd_restarted_during_a_rebuild(lc):
    """meshd killed while it is creating sidecars (and holding the new apps): the restarted meshd
    finishes the job, releases every hold, and leaves no orphan or duplicate."""
    project(lc, "up", "-d", "--no-recreate", "--scale", "web=3")
    run(["docker", "restart", "-t", "0", "meshd"])
    wait_mesh_ok(what="the mesh after meshd's restart mid-rebuild")
    paused = [c["Name"] for c in containers("label=mesh.enable=true") if c["State"]["Paused"]]
    assert paused == []
    calls_through_mesh(lc, n=6)
    project(lc, "up", "-d", "--no-recreate", "--scale", "web=1")
    wait_mesh_ok(what="back to one web replica")


def test_meshd_restarted_during_a_root_rotation(lc):
    """meshd killed in the middle of a root rotation (held in its first phase by a paused sidecar
    that cannot ACK the bundle): the restarted meshd resumes it from its persisted phase, every
    identity ends under the new root alone, and calls pass through the mesh."""
    before = get_json(f"{ADMIN}/v1/certs")
    client_sc = sidecar_of(service_containers(lc, "client")[0])
    run(["docker", "pause", client_sc["Id"]])
    try:
        status, _, body = http("POST", f"{ADMIN}/v1/certs/rotate", json.dumps({"root": True}).encode())
        assert status == 202, body
        wait_for(lambda: (r := get_json(f"{ADMIN}/v1/certs/rotation"))["step"] == "distributing_bundle"
                 and client_sc["Name"].lstrip("/") in r["pending"], 30, what="the rotation waiting on the paused sidecar")
        run(["docker", "kill", "meshd"])
    finally:
        run(["docker", "unpause", client_sc["Id"]])
    run(["docker", "start", "meshd"])
    wait_for(lambda: get_json(f"{ADMIN}/v1/certs")["interrupted_root_rotation"] is not None
             or get_json(f"{ADMIN}/v1/certs")["rotation"], 60, what="meshd back with the interrupted rotation")

    def done() -> dict | None:
        rot = get_json(f"{ADMIN}/v1/certs")["rotation"]
        return rot if rot and rot["state"] != "running" else None

    rot = wait_for(done, 120, interval=1.0, what="the resumed root rotation to end")
    assert rot["state"] == "done" and rot["log"][0]["step"] == "resumed", rot
    after = get_json(f"{ADMIN}/v1/certs")
    print(f"root rotation resumed after meshd's restart: {[r['name'] for r in before['roots']]} -> "
          f"{[r['name'] for r in after['roots']]}, {rot['renewed']} nodes renewed")
    assert [r["name"] for r in after["roots"]] == [rot["new_root"]] and rot["new_root"] not in \
        [r["name"] for r in before["roots"]]
    assert after["interrupted_root_rotation"] is None
    wait_for(lambda: all(i["issuer"] == rot["new_root"] for i in get_json(f"{ADMIN}/v1/certs")["identities"]
                         if i.get("connected")), 60, what="every connected identity under the new root")
    wait_mesh_ok(what="the mesh after the resumed rotation")
    calls_through_mesh(lc)


def test_two_projects_with_the_same_service_names(mesh):
    """Compose projects are namespaces: two projects each with `web` (nginx serving a page naming its
    project) and `client`, on one shared network. Each client's `http://web/` reaches its own project's
    web through both sidecars over mTLS, with its own identity; `web.<other>` reaches the other's; a
    bare `web` given to meshd is ambiguous; `down` of the second leaves the first with its keys and
    working."""
    first, second = "pa", "pb"

    def down_all() -> None:
        for proj in (second, first):
            project(proj, "down", "-v", "--remove-orphans", file="namedweb.yml", check=False)
        run(["docker", "network", "rm", SHARED_NET], check=False)

    down_all()
    run(["docker", "network", "create", SHARED_NET])
    try:
        for proj in (first, second):
            project(proj, "up", "-d", file="namedweb.yml", env={**os.environ, "WHO": proj})
            wait_mesh_ok(what=f"project {proj} meshed")
        web = {proj: _service_of(proj, "web") for proj in (first, second)}
        td = web[first]["identity"].split("/")[2]
        for proj in (first, second):
            assert web[proj]["identity"] == f"spiffe://{td}/ns/{proj}/sa/web"
        assert web[second]["name"] == f"web.{second}"   # the first project holds the name (or an older one)
        for caller in (first, second):
            for url, proj in (("http://web/", caller), (f"http://web.{second}/", second),
                              (f"http://web.{first}/", first)):
                _call_counted(caller, url, proj, web[proj]["name"])
        status, _, body = http("POST", f"{ADMIN}/v1/rules/web/fault", json.dumps({"abort": "50:503"}).encode(),
                               {"Content-Type": "application/json"})
        error = json.loads(body)["error"]   # other projects of this run may have a `web` too
        assert status == 400 and "'web' is ambiguous" in error, body
        assert f"web.{first}" in error and f"web.{second}" in error, body
        project(second, "down", "-v", "--remove-orphans", file="namedweb.yml")
        wait_mesh_ok(what=f"the mesh without project {second}")
        assert _service_of(first, "web")["name"] == web[first]["name"]   # its key did not change
        _call_counted(first, "http://web/", first, web[first]["name"])
    finally:
        down_all()


def _service_of(proj: str, service: str) -> dict:
    """meshd's /v1/services entry of a project's service (its `name` is the snapshot key)."""
    found = [s for s in get_json(f"{ADMIN}/v1/services")["services"]
             if s["namespace"] == proj and s["name"].partition(".")[0] == service]
    assert len(found) == 1, found
    return found[0]


def _count(c: dict, **labels: str) -> float:
    return metric_sum(metrics(ipv4(c)), "istio_requests_total", connection_security_policy="mutual_tls", **labels)


def _call_counted(caller: str, url: str, proj: str, key: str, n: int = 3) -> None:
    """n curls of `url` from project `caller`'s client answer `proj`'s page, each counted by the
    client's sidecar (outbound) and by `proj`'s web sidecars (inbound over mTLS) under `key`."""
    client = service_containers(caller, "client")[0]
    webs = service_containers(proj, "web")

    def counts() -> tuple[float, float]:
        out = _count(client, reporter="source", destination_service=key)
        inbound = sum(_count(c, reporter="destination", source_workload="client", destination_service=key)
                      for c in webs)
        return out, inbound

    before = counts()
    for _ in range(n):
        code, body = curl(caller, url)
        assert (code, body.strip()) == (200, f"web of {proj}"), (caller, url, code, body[:200])
    wait_for(lambda: all(now - was >= n for now, was in zip(counts(), before)), 10,
             what=f"{n} calls {caller} -> {url} counted by both sidecars under {key}")


def test_health_check_decides_the_endpoint(mesh):
    """A container with a Docker HEALTHCHECK is an endpoint only while healthy, and meshd says so."""
    hp = "lchealth"
    project(hp, "down", file="health.yml", check=False)
    project(hp, "up", "-d", file="health.yml")
    try:
        web = service_containers(hp, "hweb")[0]

        def instance() -> dict:
            svc = next(s for s in get_json(f"{ADMIN}/v1/services")["services"] if s["name"] == "hweb")
            return svc["instances"][0] | {"endpoints": [e["instance"] for e in svc["endpoints"]]}

        wait_for(lambda: instance()["health"] == "unhealthy", 30, what="hweb unhealthy")
        wait_for(lambda: not containers(f"id={web['Id']}")[0]["State"]["Paused"], 30,
                 what="hweb released by the start hold")
        assert web["Id"] not in instance()["endpoints"] and instance()["serving"] is False
        assert curl(hp, "http://hweb/", client="hclient", timeout=3)[0] != 200   # not served while unhealthy
        run(["docker", "exec", web["Id"], "touch", "/tmp/healthy"])
        wait_for(lambda: web["Id"] in instance()["endpoints"], 30, what="hweb an endpoint once healthy")
        assert instance()["health"] == "healthy"
        before = mtls_requests(hp, "hweb", source="hclient")
        assert curl(hp, "http://hweb/", client="hclient")[0] == 200
        wait_for(lambda: mtls_requests(hp, "hweb", source="hclient") > before, 10, what="counted by hweb's sidecar")
        run(["docker", "exec", web["Id"], "rm", "/tmp/healthy"])
        wait_for(lambda: web["Id"] not in instance()["endpoints"], 30, what="hweb withdrawn once unhealthy")
    finally:
        project(hp, "down", file="health.yml", check=False)


def test_stop_drains_in_flight_and_long_lived_calls(mesh):
    """`docker stop` of one of two replicas while it streams a long response: the stream finishes
    through both sidecars (the app keeps its stop grace period), every new call meanwhile answers 200
    from the other replica (withdrawn from callers first), and the stopped replica's sidecar goes."""
    dp = "lcdrain"
    project(dp, "down", file="drain.yml", check=False)
    project(dp, "up", "-d", "--scale", "drainweb=2", file="drain.yml")
    try:
        wait_mesh_ok(what="the drain project meshed")
        calls_through_mesh(dp, service="drainweb", n=2, client="draincli")
        cli = service_containers(dp, "draincli")[0]["Id"]
        seconds = 8
        stream = subprocess.Popen(["docker", "exec", cli, "curl", "-sSN", "-m", "60", f"http://drainweb/stream?n={seconds}"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            first = stream.stdout.readline().split()
            assert first and first[1] == "0", first
            serving = next(c for c in service_containers(dp, "drainweb") if c["Config"]["Hostname"] == first[0])
            stopped_at = time.monotonic()
            stopper = subprocess.Popen(["docker", "stop", "-t", "30", serving["Id"]], stdout=subprocess.DEVNULL)
            others: list[tuple[int, str]] = []
            while stream.poll() is None and time.monotonic() - stopped_at < seconds + 10:
                others.append(curl(dp, "http://drainweb/", client="draincli", timeout=5))
            rest, err = stream.communicate(timeout=30)
            assert stopper.wait(timeout=60) == 0
            stop_took = time.monotonic() - stopped_at
        finally:
            if stream.poll() is None:
                stream.kill()
        lines = [first] + [line.split() for line in rest.splitlines()]
        print(f"drain: stream of {len(lines)} lines, stop took {stop_took:.1f} s, {len(others)} calls meanwhile: "
              f"{sorted({code for code, _ in others})}")
        assert stream.returncode == 0, err
        assert [int(n) for _, n in lines] == list(range(seconds)), lines
        assert {host for host, _ in lines} == {first[0]}
        assert others and all(code == 200 for code, _ in others), others
        assert stop_took >= seconds - 2   # the app was given the time to finish its stream
        exit_code = containers(f"id={serving['Id']}")[0]["State"]["ExitCode"]
        assert exit_code == 0 and stop_took < 25, (exit_code, stop_took)   # it exited by itself, not killed
        late = [body.strip() for _, body in others[len(others) // 2:]]
        assert first[0] not in late, late   # withdrawn: the stopping replica takes no new calls
        wait_mesh_ok(what="the stopped replica's sidecar removed")
    finally:
        project(dp, "down", file="drain.yml", check=False)



def _restart_dockerd() -> None:
    """Stop the engine (it stops every container) and start it again as `make docker` does."""
    if os.path.isdir("/run/systemd/system") and not os.path.exists("/var/run/docker.pid"):
        run(["systemctl", "restart", "docker"], timeout=180)
        return
    pid = int(open("/var/run/docker.pid").read().strip())
    os.kill(pid, signal.SIGTERM)

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    wait_for(gone, 120, interval=0.5, what="dockerd to stop")
    run([str(ROOT / "scripts" / "ensure-docker.sh")], timeout=120)


def test_dockerd_restarted(lc):
    """dockerd itself restarted: every container stops; those with a restart policy (meshd, and here
    the lc project set to unless-stopped) come back with new network namespaces, and meshd gives each
    app a new sidecar in it. The demo shop (no restart policy) is brought back up afterwards."""
    apps = service_containers(lc, "web") + service_containers(lc, "client")
    for app in apps:
        run(["docker", "update", "--restart", "unless-stopped", app["Id"]])
    old_sidecars = {sidecar_of(app)["Id"] for app in apps}
    started = time.monotonic()
    _restart_dockerd()
    try:
        wait_for(lambda: get_json(f"{ADMIN}/v1/status"), 90, what="meshd back after the engine's restart")
        wait_mesh_ok(timeout=120, what="the mesh after dockerd's restart")
        took = time.monotonic() - started
        now = service_containers(lc, "web") + service_containers(lc, "client")
        assert {c["Id"] for c in now} == {a["Id"] for a in apps}   # the same apps, restarted
        assert all(c["State"]["StartedAt"] > a["State"]["StartedAt"] for c, a in
                   zip(sorted(now, key=lambda c: c["Id"]), sorted(apps, key=lambda c: c["Id"])))
        new_sidecars = {sidecar_of(c)["Id"] for c in now}
        print(f"dockerd restarted: the lc project meshed again {took:.0f} s after the stop; "
              f"sidecars replaced: {len(new_sidecars - old_sidecars)} of {len(new_sidecars)}")
        calls_through_mesh(lc)
    finally:
        compose("up", "-d", project="meshd", file="compose/meshd.yml")
        compose("up", "-d")
        wait_for(lambda: http("GET", f"{GATEWAY}/api/orders/1", timeout=3)[0] == 200, 120,
                 what="the demo shop through the gateway again")
        wait_mesh_ok(what="the whole mesh after dockerd's restart")
