"""The mesh on Docker Swarm, end to end on the three-node test cluster (scripts/swarm-cluster.sh).

They run under CI=true (CI builds the node image and the cluster, about 8 minutes) or with
MESH_SWARM_TESTS=1; elsewhere they are skipped, as they take minutes. MESH_SWARM_IMAGE picks the mesh image in the stacks (default
meshd:latest; meshd:swarm after `scripts/swarm-cluster.sh dev-image`); MESH_SWARM_KEEP=1 leaves the
cluster up afterwards. The tests run in file order: they share one cluster and the later ones kill
nodes. Placement is pinned so that each check crosses nodes: the client side of the shop (orders,
inventory, users, notifications, catalog v1) on node 1, payments on nodes 2 and 3, catalog v2 on 3.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import pytest

from .conftest import ROOT, metric_sum, run, wait_for

pytestmark = pytest.mark.skipif(
    os.environ.get("MESH_SWARM_TESTS") != "1" and os.environ.get("CI", "").lower() != "true",
    reason="the Swarm e2e tests run under CI=true or with MESH_SWARM_TESTS=1")

CLUSTER = "scripts/swarm-cluster.sh"
IMAGE = os.environ.get("MESH_SWARM_IMAGE", "meshd:latest")
MESHED_TASKS = 8   # orders, payments x2, inventory, users, notifications, catalog v1 and v2
CLIENT_SERVICE = "shop_inventory"   # on node 1: the load comes from its namespace, through its sidecar

# Steady load from inside a task: GETs at a rate, failures with the second they happened at, and
# latency percentiles (stdlib only: it runs with the demo image's python3).
LOAD = r'''
import json, sys, time, urllib.request
url, seconds, rate = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
start, lat, fails = time.time(), [], []
while time.time() - start < seconds:
    t = time.time()
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            r.read(); ok = r.status == 200
    except Exception as e:
        ok = False
    lat.append(time.time() - t)
    if not ok:
        fails.append(round(t - start, 2))
    time.sleep(max(0.0, 1 / rate - (time.time() - t)))
lat.sort()
pct = lambda p: round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 1)
print(json.dumps({"sent": len(lat), "failed": len(fails), "fail_at_s": fails[:100],
                  "p50_ms": pct(0.5), "p99_ms": pct(0.99), "max_ms": round(lat[-1] * 1000, 1)}))
'''

COUNT_VERSIONS = r'''
import collections, json, sys, urllib.request
seen = collections.Counter()
for _ in range(int(sys.argv[2])):
    try:
        with urllib.request.urlopen(sys.argv[1], timeout=3) as r:
            seen[json.loads(r.read()).get("version")] += 1
    except Exception as e:
        seen["error"] += 1
print(json.dumps(seen))
'''


def cluster(*args: str, timeout: float = 600) -> str:
    return run([CLUSTER, *args], timeout=timeout, env={**os.environ, "MESH_SWARM_IMAGE": IMAGE}).stdout


def on(n: int, *cmd: str, check: bool = True, timeout: float = 120):
    return run(["docker", "exec", f"meshswarm-{n}", *cmd], check=check, timeout=timeout)


def admin(method: str, path: str, body: dict | None = None):
    """The control plane's admin API; waits (30 s at most) while its task starts or moves."""
    args = ("admin", method, path, *([json.dumps(body)] if body else []))
    return wait_for(lambda: json.loads(cluster(*args)), 30, 1, f"{method} {path} at the control plane")


def running_nodes() -> list[int]:
    out = run(["docker", "ps", "--filter", "label=meshswarm.node", "--format", "{{.Label \"meshswarm.node\"}}"]).stdout
    return sorted(int(x) for x in out.split())


def task_container(service: str) -> tuple[int, str]:
    """(node number, container id) of a running task of `service` (the first one found)."""
    for n in running_nodes():
        cid = on(n, "docker", "ps", "-q", "-f", f"label=com.docker.swarm.service.name={service}").stdout.split()
        if cid:
            return n, cid[0]
    raise AssertionError(f"no running task of {service}")


def tasks_of(service: str) -> list[tuple[int, str]]:
    out = []
    for n in running_nodes():
        out += [(n, c) for c in on(n, "docker", "ps", "-q", "-f",
                                   f"label=com.docker.swarm.service.name={service}").stdout.split()]
    return out


def in_task(service: str, *cmd: str, timeout: float = 300) -> str:
    n, cid = task_container(service)
    return on(n, "docker", "exec", cid, *cmd, timeout=timeout).stdout


def sidecar_metrics(n: int, app_cid: str) -> str:
    return on(n, "docker", "exec", app_cid, "curl", "-s", "localhost:15020/metrics").stdout


def put_script(service: str, name: str, text: str) -> None:
    n, cid = task_container(service)
    run(["docker", "exec", "-i", f"meshswarm-{n}", "docker", "exec", "-i", cid, "sh", "-c", f"cat > /tmp/{name}"],
        input=text)


def all_sidecars_connected(expected: int = MESHED_TASKS) -> dict | None:
    status = admin("GET", "/v1/status")
    sidecars = [s for node in status["swarm"]["nodes"] for s in node["sidecars"]]
    version = status["meshd"]["snapshot_version"]
    ok = (len(sidecars) == expected and all(s["connected"] for s in sidecars)
          and all(s["acked_version"] == version for s in sidecars))
    return status if ok else None


def control_node() -> int:
    return task_container("mesh_control")[0]


def load(url: str, seconds: float, rate: float = 20.0) -> dict:
    return json.loads(in_task(CLIENT_SERVICE, "python3", "/tmp/load.py", url, str(seconds), str(rate),
                              timeout=seconds + 60))


@pytest.fixture(scope="module")
def swarm(images):
    cluster("up")
    cluster("check")
    if IMAGE == "meshd:swarm":
        cluster("dev-image")
    cluster("deploy")
    pins = {"orders": "==meshswarm-1", "inventory": "==meshswarm-1", "users": "==meshswarm-1",
            "notifications": "==meshswarm-1", "catalog-v1": "==meshswarm-1", "catalog-v2": "==meshswarm-3",
            "payments": "!=meshswarm-1"}
    for service, where in pins.items():
        on(1, "docker", "service", "update", "-q", "--detach", "--constraint-add",
           f"node.hostname{where}", f"shop_{service}")
    wait_for(lambda: {n for n, _ in tasks_of("shop_payments")} == {2, 3} and task_container("shop_orders")[0] == 1
             and task_container("shop_catalog-v2")[0] == 3, 120, 2, "the pinned placement")
    wait_for(all_sidecars_connected, 120, 2, "a connected sidecar per meshed task")
    put_script(CLIENT_SERVICE, "load.py", LOAD)
    put_script(CLIENT_SERVICE, "count.py", COUNT_VERSIONS)
    yield
    if os.environ.get("MESH_SWARM_KEEP") != "1":
        cluster("down")


def test_one_agent_per_node_and_one_sidecar_per_task(swarm):
    status = all_sidecars_connected()
    assert status is not None
    nodes = status["swarm"]["nodes"]
    assert len(nodes) == 3 and all(n["agent"] and n["role"] == "manager" for n in nodes)
    # exactly one sidecar container per meshed task, on the task's node
    for n in running_nodes():
        names = on(n, "docker", "ps", "--format", "{{.Names}}").stdout.split()
        tasks = [x for x in names if x.startswith("shop_") and not x.endswith("-mesh")]
        assert sorted(x + "-mesh" for x in tasks) == sorted(x for x in names if x.endswith("-mesh"))


def test_checkout_crosses_nodes_over_mtls(swarm):
    n_orders, orders = task_container("shop_orders")
    before = {cid: metric_sum(sidecar_metrics(n, cid), "istio_requests_total", reporter="destination",
                              destination_service="payments", response_code="200")
              for n, cid in tasks_of("shop_payments")}
    result = load("http://orders:8080/orders/1", 10, 10)
    assert result["failed"] == 0, result
    sent = metric_sum(sidecar_metrics(n_orders, orders), "istio_requests_total", reporter="source",
                      destination_service="payments", response_code="200", connection_security_policy="mutual_tls")
    assert sent >= result["sent"]
    counted = {}
    for n, cid in tasks_of("shop_payments"):
        text = sidecar_metrics(n, cid)
        assert n != n_orders
        counted[n] = metric_sum(text, "istio_requests_total", reporter="destination", destination_service="payments",
                                response_code="200", connection_security_policy="mutual_tls") - before[cid]
        assert metric_sum(text, "mesh_tls_connections_total", direction="inbound") >= 1
    assert sum(counted.values()) >= result["sent"] and all(v > 0 for v in counted.values()), counted
    # The inbound port takes no plaintext: a plain HTTP call from a container on the overlay fails.
    n, cid = task_container("shop_payments")
    ip = on(n, "docker", "inspect", "-f", '{{(index .NetworkSettings.Networks "mesh").IPAddress}}', cid).stdout.strip()
    plain = on(1, "docker", "run", "--rm", "--network", "mesh", "--entrypoint", "curl", IMAGE, "-s", "-m", "3",
               "-o", "/dev/null", "-w", "%{http_code}", f"http://{ip}:15006/pay", check=False)
    assert plain.stdout.strip() in ("000", ""), plain.stdout


# A packet capture in a task's network namespace (AF_PACKET, stdlib only: no tcpdump in the images):
# frames seen on one interface, and how many carry a given byte string.
SNIFF = r'''
import json, socket, sys, time
iface, seconds, needle = sys.argv[1], float(sys.argv[2]), sys.argv[3].encode()
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(3))
s.bind((iface, 0))
s.settimeout(0.2)
end, frames, found = time.time() + seconds, 0, 0
while time.time() < end:
    try:
        frame = s.recv(65535)
    except socket.timeout:
        continue
    frames += 1
    found += needle in frame
print(json.dumps({"iface": iface, "frames": frames, "with_needle": found}))
'''


def test_a_capture_on_the_overlay_shows_no_plaintext_body(swarm):
    n, cid = task_container("shop_payments")
    ip = on(n, "docker", "inspect", "-f", '{{(index .NetworkSettings.Networks "mesh").IPAddress}}', cid).stdout.strip()
    addrs = on(n, "docker", "exec", cid, "ip", "-o", "-4", "addr", "show").stdout
    overlay = next(line.split()[1] for line in addrs.splitlines() if f" {ip}/" in line)
    sniffers = {}
    for iface in (overlay, "lo"):   # lo: the sidecar hands the app the plaintext there (the capture works)
        sniffers[iface] = on(n, "docker", "run", "-d", "--network", f"container:{cid}", "--cap-add", "NET_RAW",
                             "--entrypoint", "python3", IMAGE, "-c", SNIFF, iface, "15", '"amount"').stdout.strip()
    time.sleep(2)
    result = load("http://orders:8080/orders/5", 8, 10)
    assert result["failed"] == 0, result
    seen = {}
    for iface, sniffer in sniffers.items():
        on(n, "docker", "wait", sniffer, timeout=60)
        seen[iface] = json.loads(on(n, "docker", "logs", sniffer).stdout)
        on(n, "docker", "rm", sniffer)
    print(f"capture in a payments task on node {n}: {seen}")
    assert seen[overlay]["frames"] > 0 and seen[overlay]["with_needle"] == 0, seen
    assert seen["lo"]["with_needle"] > 0, seen


def test_split_holds_across_nodes(swarm):
    admin("POST", "/v1/rules/catalog/split", {"weights": {"v1": 90, "v2": 10}})
    wait_for(all_sidecars_connected, 30, 1, "every sidecar to ACK the split")
    seen = json.loads(in_task(CLIENT_SERVICE, "python3", "/tmp/count.py", "http://catalog:8080/", "1000"))
    assert seen.get("error", 0) == 0, seen
    assert 70 <= seen.get("v2", 0) <= 130, seen     # 10% +/- 3% of 1,000


def node_address(n: int) -> str:
    return run(["docker", "inspect", "-f", '{{(index .NetworkSettings.Networks "meshswarm").IPAddress}}',
                f"meshswarm-{n}"]).stdout.strip()


def test_gateway_on_every_node_routes_to_tasks_on_any_node(swarm):
    status = admin("GET", "/v1/status")
    assert all(n["gateway_connected"] for n in status["swarm"]["nodes"]), status["swarm"]
    seen = {}
    for n in running_nodes():   # orders runs on node 1: nodes 2 and 3 route across the overlay
        proc = run(["curl", "-s", "-m", "5", f"http://{node_address(n)}:8080/api/orders/1"])
        seen[n] = json.loads(proc.stdout)["results"]["payments"]["paid"]
    assert seen == {1: True, 2: True, 3: True}


def test_meshctl_from_every_node_through_its_agent(swarm):
    token = str(ROOT / ".cache" / "meshswarm-admin.token")
    for n in running_nodes():
        out = run([sys.executable, "-c", "from meshctl.cli import main; main()", "--api",
                   f"http://{node_address(n)}:15014", "--token-file", token, "status"]).stdout
        assert "meshd UP" in out and "swarm nodes (3)" in out, out
        rows = [line.split() for line in out.splitlines() if line.startswith("meshswarm-")]
        assert len(rows) == 3 and all(r[-1].split("/")[0] == r[-1].split("/")[1] for r in rows), out


def test_killing_a_payments_node_under_load_fails_no_checkout(swarm):
    control = control_node()
    victim = next(n for n, _ in tasks_of("shop_payments") if n != control)
    result = {}
    runner = threading.Thread(target=lambda: result.update(load("http://orders:8080/orders/2", 40)))
    runner.start()
    time.sleep(10)
    try:
        run(["docker", "kill", f"meshswarm-{victim}"])
        runner.join()
        print(f"node {victim} killed at 10 s under 20 req/s: {result}")
    finally:   # the next tests need the whole cluster back, whatever this one found
        run(["docker", "start", f"meshswarm-{victim}"])
        wait_for(lambda: victim in {n for n, _ in tasks_of("shop_payments")}, 120, 2, "payments back on its node")
        wait_for(all_sidecars_connected, 120, 2, "every sidecar connected again")
    assert result["sent"] >= 650 and result["failed"] == 0, result


def test_control_plane_node_killed_comes_back_with_same_ca_and_rules(swarm):
    wait_for(lambda: {n for n, _ in tasks_of("shop_payments")} == {2, 3}, 120, 2, "payments on nodes 2 and 3")
    wait_for(all_sidecars_connected, 120, 2, "every sidecar connected")
    if control_node() == 1:   # node 1 holds the client side of the shop: move the control plane off it
        on(1, "docker", "service", "update", "-q", "--constraint-add", "node.hostname!=meshswarm-1", "mesh_control")
        wait_for(lambda: control_node() != 1, 60, 1, "the control plane off node 1")
        wait_for(all_sidecars_connected, 60, 2, "every sidecar connected again")
    roots = admin("GET", "/v1/certs")["roots"]
    rules = admin("GET", "/v1/rules/catalog")["rules"]
    old_version = admin("GET", "/v1/status")["meshd"]["snapshot_version"]
    victim = control_node()
    result = {}
    runner = threading.Thread(target=lambda: result.update(load("http://orders:8080/orders/3", 60)))
    runner.start()
    time.sleep(5)
    killed = time.monotonic()
    run(["docker", "kill", f"meshswarm-{victim}"])
    wait_for(lambda: control_node() != victim, 90, 1, "the control plane on another manager")
    back = time.monotonic() - killed
    assert admin("GET", "/v1/certs")["roots"] == roots        # same root CA (swarm secrets)
    assert admin("GET", "/v1/rules/catalog")["rules"] == rules  # same rules (swarm configs)
    # every task the swarm still lists (a payments replica may be gone with the node) reconnected
    status = wait_for(lambda: all_sidecars_connected(expected=len(
        [s for node in admin("GET", "/v1/status")["swarm"]["nodes"] for s in node["sidecars"]])), 60, 1,
        "sidecars reconnected and ACKing")
    acked = time.monotonic() - killed
    runner.join()
    print(f"control plane node {victim} killed: back after {back:.1f} s, sidecars ACK version "
          f"{status['meshd']['snapshot_version']} (was {old_version}) after {acked:.1f} s; load {result}")
    run(["docker", "start", f"meshswarm-{victim}"])
    assert status["meshd"]["snapshot_version"] > old_version
    assert result["failed"] == 0, result
