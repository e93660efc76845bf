"""Traffic management end to end: the flaky-payments checkout, the catalog canary, timeouts, rate
limits and mirroring, on the demo shop in real Docker. Figures are printed for the closing note."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections import Counter

import pytest

from .conftest import ADMIN, GATEWAY, PROJECT, docker_ps, get_json, http, run, wait_for

pytestmark = pytest.mark.e2e


def meshctl(*args: str, check: bool = True):
    return run(["meshctl", *args], check=check, env={**os.environ, "COLUMNS": "250"})


def container_of(service: str) -> str:
    return docker_ps(f"label=com.docker.compose.project={PROJECT}",
                     f"label=com.docker.compose.service={service}")[0]["Names"]


def app_local(container: str, method: str, path: str, body: dict | None = None) -> dict:
    """Call an app on its own loopback from inside its container (not captured: 127/8 is exempt)."""
    code = ("import sys, urllib.request as u\n"
            "data = sys.argv[3].encode() if len(sys.argv) > 3 else None\n"
            "req = u.Request('http://127.0.0.1:8080' + sys.argv[2], method=sys.argv[1], data=data,"
            " headers={'Content-Type': 'application/json'})\n"
            "sys.stdout.write(u.urlopen(req, timeout=5).read().decode())")
    args = [method, path] + ([json.dumps(body)] if body is not None else [])
    return json.loads(run(["docker", "exec", container, "python3", "-c", code, *args]).stdout)


def acked_ms(output: str) -> float:
    m = re.search(r"ACKed by (\d+)/(\d+) connected nodes in (\d+) ms", output)
    assert m, output
    assert m.group(1) == m.group(2), output
    return float(m.group(3))


def orders_flags(flag: str) -> float:
    from .conftest import container_ip, metric_sum, metrics
    return metric_sum(metrics(container_ip(container_of("orders"))), "istio_requests_total",
                      reporter="source", destination_service="payments", response_flags=flag)


@pytest.fixture
def payments_faults(mesh):
    payments = container_of("payments")
    yield lambda **f: app_local(payments, "POST", "/admin/faults", f)
    app_local(payments, "POST", "/admin/faults", {"fail_rate": 0, "status": 503, "latency_ms": 0})


def settled_version(quiet_s: float = 2.0) -> int:
    """The snapshot version once it has stayed the same for `quiet_s` (discovery has settled)."""
    seen = {"version": None, "since": 0.0}

    def still() -> int | None:
        version = get_json(f"{ADMIN}/v1/status")["meshd"]["snapshot_version"]
        now = time.monotonic()
        if version != seen["version"]:
            seen.update(version=version, since=now)
        return version if now - seen["since"] >= quiet_s else None

    return wait_for(still, 30, interval=0.2, what="the snapshot version to settle")


# First in this module: the failures the stories below inject make meshd's adaptive loop publish
# tighter policies a few seconds later, which would move the version for reasons of its own.
def test_bad_split_is_refused_and_nothing_is_pushed(mesh):
    version = settled_version()
    bad = meshctl("split", "catalog", "v1=90", "v2=20", check=False)
    assert bad.returncode != 0 and "100" in bad.stderr
    unknown = meshctl("split", "catalog", "v1=90", "v7=10", check=False)
    assert unknown.returncode != 0 and "v7" in unknown.stderr
    assert get_json(f"{ADMIN}/v1/status")["meshd"]["snapshot_version"] == version
    assert get_json(f"{ADMIN}/v1/rules/catalog")["rules"].get("split") is None


def test_story1_checkout_survives_flaky_payments_with_retries(mesh, payments_faults):
    payments = container_of("payments")
    payments_faults(fail_rate=0.3, status=503)
    before = app_local(payments, "GET", "/admin/stats")
    n, ok, failures = 1000, 0, Counter()
    for i in range(n):
        status, _, body = http("GET", f"{GATEWAY}/api/orders/{i}", timeout=10)
        ok += status == 200
        if status != 200:
            detail = json.loads(body) if body.startswith(b"{") else {}
            failures[(status, detail.get("failed"), detail.get("status"))] += 1
    after = app_local(payments, "GET", "/admin/stats")
    calls = after["requests"] - before["requests"]
    ratio = calls / n
    print(f"\nstory 1: {ok}/{n} checkouts succeeded with payments failing 30%; "
          f"payments saw {calls} calls ({ratio:.2f} per checkout); failures {dict(failures)}")
    # With 3 retries the expected success is 1 - 0.3**4 = 99.19%: the ">= 99%" is the
    # expectation itself, so a single run lands below it about one time in five. We assert 98.5%
    # (3 sigma below the expectation over 1000 checkouts), which still fails with 2 retries (97.3%)
    # or none (70%), and print the measured figure.
    assert ok >= 0.985 * n
    # Retries happened (about 1/(1-0.3) = 1.43 tries per checkout), and stayed bounded by the policy.
    assert 1.2 <= ratio <= 1.7


def test_story1_failing_payments_is_ejected_then_recovers(mesh, payments_faults):
    payments = container_of("payments")
    payments_faults(fail_rate=1.0, status=503)
    uh_before = orders_flags("UH")
    # 10 consecutive 5xx eject the only instance (min-health 0%: no panic): from then on orders'
    # sidecar answers 503 UH at once without calling payments.
    wait_for(lambda: http("GET", f"{GATEWAY}/api/orders/1", timeout=10)[0] != 200 and orders_flags("UH") > uh_before,
             30, interval=0.05, what="payments to be ejected")
    seen = app_local(payments, "GET", "/admin/stats")["requests"]
    uh_start = orders_flags("UH")
    started = time.monotonic()
    fast, answers = [], []
    for i in range(10):
        t = time.monotonic()
        status, _, body = http("GET", f"{GATEWAY}/api/orders/{i}", timeout=10)
        fast.append(time.monotonic() - t)
        answers.append((status, json.loads(body).get("failed") if body.startswith(b"{") else None))
    inside = time.monotonic() - started < 4.5  # still inside the 5 s ejection
    ejected_calls = app_local(payments, "GET", "/admin/stats")["requests"] - seen
    uh = orders_flags("UH") - uh_start
    print(f"\nstory 1: ejected payments: 10 checkouts answered in median {sorted(fast)[5] * 1000:.1f} ms by orders "
          f"({set(answers)}), payments called {ejected_calls} times meanwhile; orders' sidecar UH {uh:.0f}")
    # orders itself answered (the gateway did not cut it off), naming payments as the failure
    assert answers == [(502, "payments")] * 10
    if inside:
        assert ejected_calls == 0 and uh >= 10
    assert sorted(fast)[5] < 0.1
    payments_faults(fail_rate=0.0)
    wait_for(lambda: http("GET", f"{GATEWAY}/api/orders/2", timeout=10)[0] == 200, 30, interval=0.2,
             what="payments to come back after its ejection")


def test_story2_canary_split_routes_and_rollback(mesh):
    out = meshctl("split", "catalog", "v1=90", "v2=10").stdout
    split_ms = acked_ms(out)
    counts = Counter()
    for _ in range(2000):
        status, _, body = http("GET", f"{GATEWAY}/api/catalog")
        assert status == 200
        counts[json.loads(body)["version"]] += 1
    share = counts["v2"] / 2000
    out = meshctl("route", "catalog", "--to", "v2", "--header", "x-user-group=beta").stdout
    route_ms = acked_ms(out)
    beta = Counter(json.loads(http("GET", f"{GATEWAY}/api/catalog", headers={"x-user-group": "beta"})[2])["version"]
                   for _ in range(50))
    out = meshctl("route", "catalog", "--clear").stdout
    acked_ms(out)
    out = meshctl("split", "catalog", "v1=100").stdout
    back_ms = acked_ms(out)
    after = Counter(json.loads(http("GET", f"{GATEWAY}/api/catalog")[2])["version"] for _ in range(200))
    print(f"\nstory 2: v2 share {share:.3f} over 2000 requests ({dict(counts)}); beta -> {dict(beta)}; "
          f"after rollback {dict(after)}; ACKed by every node in {split_ms:.0f} / {route_ms:.0f} / {back_ms:.0f} ms")
    assert 0.08 <= share <= 0.12
    assert beta == Counter({"v2": 50})
    assert after == Counter({"v1": 200})
    assert max(split_ms, route_ms, back_ms) <= 1000


def test_rules_survive_a_meshd_restart(mesh):
    meshctl("split", "catalog", "v1=100")
    try:
        run(["docker", "restart", "meshd"])
        wait_for(lambda: get_json(f"{ADMIN}/v1/rules/catalog")["rules"].get("split"), 30, what="meshd back")
        rules = get_json(f"{ADMIN}/v1/rules/catalog")["rules"]
        assert rules["split"]["weights"] == [["v1", 100]]
        wait_for(lambda: all(n["connected"] for n in get_json(f"{ADMIN}/v1/status")["nodes"]), 30,
                 what="nodes reconnected")
        versions = Counter(json.loads(http("GET", f"{GATEWAY}/api/catalog")[2])["version"] for _ in range(50))
        assert versions == Counter({"v1": 50})
    finally:
        meshctl("split", "catalog", "--clear", check=False)


@pytest.fixture
def extra_service(mesh):
    """Start a meshed test service from labels; yields a starter; removes what it started."""
    started = []

    def start(name: str, labels: dict[str, str]):
        args = ["docker", "run", "-d", "--name", name, "--network", f"{PROJECT}_default",
                "-l", f"com.docker.compose.project={PROJECT}", "-l", "mesh.enable=true", "-l", "mesh.port=8080"]
        for k, v in labels.items():
            args += ["-l", f"{k}={v}"]
        run(args + ["mesh-demo:latest", "python3", "/app/shop.py", "catalog"])
        started.append(name)
        svc = labels.get("mesh.service", name)
        wait_for(lambda: any(s["name"] == svc and s["endpoints"] for s in get_json(f"{ADMIN}/v1/services")["services"]),
                 30, what=f"{svc} endpoints")
        path = labels["mesh.gateway.path"]
        wait_for(lambda: http("GET", f"{GATEWAY}{path}")[0] == 200, 30, what=f"{path} through the gateway")

    yield start
    for name in started:
        run(["docker", "rm", "-f", name], check=False)


def test_timeout_against_a_delay_fault_gives_504_fast(extra_service):
    extra_service("shop-slowpoke", {"mesh.service": "slowpoke", "mesh.timeout": "200ms",
                                    "mesh.gateway.path": "/api/slowpoke"})
    meshctl("fault", "slowpoke", "--delay", "100:1s")
    t = time.monotonic()
    status, headers, _ = http("GET", f"{GATEWAY}/api/slowpoke")
    took = time.monotonic() - t
    print(f"\ntimeout 200ms vs 1s delay: {status} in {took * 1000:.0f} ms, flags {headers.get('x-mesh-flags')}")
    assert status == 504
    assert 0.15 <= took < 0.8
    assert "UT" in headers.get("x-mesh-flags", "")


def test_rate_limit_holds_under_four_times_the_load(extra_service):
    extra_service("shop-limited", {"mesh.service": "limited", "mesh.ratelimit": "50/s",
                                   "mesh.gateway.path": "/api/limited"})
    time.sleep(1.1)  # a full bucket (burst 50, the default) after the readiness probes above
    duration, workers = 4.0, 8
    results: list[int] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + duration

    def worker():
        interval = workers / 200.0  # 200 req/s in all
        nxt = time.monotonic()
        while time.monotonic() < stop_at:
            status = http("GET", f"{GATEWAY}/api/limited")[0]
            with lock:
                results.append(status)
            nxt += interval
            time.sleep(max(0.0, nxt - time.monotonic()))

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    ok, limited = results.count(200), results.count(429)
    rate = (ok - 50) / duration  # the initial burst of 50, then the refill rate
    print(f"\nrate limit 50/s: {len(results)} requests in {duration:.0f}s ({len(results) / duration:.0f}/s), "
          f"{ok} allowed ({rate:.1f}/s), {limited} got 429")
    assert len(results) / duration >= 150
    assert ok + limited == len(results)
    assert abs(rate - 50) <= 5


def test_mirror_doubles_shadow_traffic_and_callers_see_the_primary(mesh):
    v1, v2 = container_of("catalog-v1"), container_of("catalog-v2")
    meshctl("split", "catalog", "v1=100")
    meshctl("mirror", "catalog", "--to", "v2", "--percent", "100")
    try:
        before = (app_local(v1, "GET", "/admin/stats")["requests"], app_local(v2, "GET", "/admin/stats")["requests"])
        versions = Counter(json.loads(http("GET", f"{GATEWAY}/api/catalog")[2])["version"] for _ in range(100))
        wait_for(lambda: app_local(v2, "GET", "/admin/stats")["requests"] - before[1] >= 100, 10,
                 what="the mirrored copies to arrive")
        seen = (app_local(v1, "GET", "/admin/stats")["requests"] - before[0],
                app_local(v2, "GET", "/admin/stats")["requests"] - before[1])
        print(f"\nmirror: callers saw {dict(versions)}; v1 served {seen[0]}, v2 (shadow) got {seen[1]}")
        assert versions == Counter({"v1": 100})
        assert seen[0] == 100 and seen[1] == 100
    finally:
        meshctl("mirror", "catalog", "--clear", check=False)
        meshctl("split", "catalog", "--clear", check=False)


def test_mesh_names_resolve_without_compose_aliases(mesh):
    # No compose service is called `catalog` (they are catalog-v1 and catalog-v2): the name resolves
    # only through the sidecar's DNS proxy, and the call goes through the mesh to both versions.
    orders = container_of("orders")
    code = ("import json, urllib.request as u\n"
            "print(json.dumps([json.load(u.urlopen('http://catalog:8080/', timeout=5))['version']"
            " for _ in range(40)]))")
    versions = Counter(json.loads(run(["docker", "exec", orders, "python3", "-c", code]).stdout))
    print(f"\nhttp://catalog:8080/ from orders: {dict(versions)}")
    assert set(versions) == {"v1", "v2"}
    # Names that are not mesh names still resolve through Docker's resolver (a container name here).
    from .conftest import container_ip
    payments = container_of("payments")
    out = run(["docker", "exec", orders, "python3", "-c",
               f"import socket; print(socket.gethostbyname('{payments}'))"]).stdout.strip()
    assert out == container_ip(payments)
