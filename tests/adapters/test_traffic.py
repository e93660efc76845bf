"""Traffic management on loopback: client -> outbound (frontend) -> inbounds (payments vN) -> apps.

Splits and header routes, fault injection, timeouts, retries (budget, idempotency, a peer inbound's
503 UF), circuit breaking, outlier ejection, inbound rate limits, mirroring, ring-hash and round-robin.
Every test runs on both event loops (asyncio's and uvloop). Nothing sleeps for timing: waits poll
toward a deadline (GUARD_S only bounds a hang); randomness is seeded.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
from contextlib import AsyncExitStack
from time import monotonic

import aiohttp
from aiohttp import web

from meshcore.policy import decode_traffic_policy
from meshcore.routing_rules import Fault, Mirror, RouteRule, ServiceRules, Split
from meshcore.snapshot import Endpoint, MeshConfig, ServiceConfig, Snapshot
from sidecar.proxy import ProxyState, start_inbound, start_outbound
from sidecar.traffic import ServiceTraffic, TrafficRegistry
from sidecar.routing import build_route_table
from .loops import GUARD_S, eventually, serve_on_loopback

SVC_PORT = 8080
URL = f"http://payments:{SVC_PORT}"


def port_of(server) -> int:
    return server.sockets[0].getsockname()[1]


def dead_port() -> int:
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Backend:
    """An app instance; `handler(backend, request, body)` answers (default: 200 with its name)."""

    def __init__(self, name: str, handler=None):
        self.name = name
        self.handler = handler
        self.hits = 0
        self.hosts: list[str] = []
        self.bodies: list[bytes] = []
        self.waiting = 0
        self.release = asyncio.Event()
        self.port = 0

    async def start(self, stack: AsyncExitStack) -> Backend:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.port = await serve_on_loopback(app, stack)
        return self

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        self.hosts.append(request.headers.get("Host", ""))
        body = await request.read()
        self.bodies.append(body)
        if self.handler is not None:
            return await self.handler(self, request, body)
        return web.json_response({"backend": self.name})


async def hold(backend: Backend, request, body):
    """A handler that answers only once `backend.release` is set."""
    backend.waiting += 1
    await backend.release.wait()
    backend.waiting -= 1
    return web.json_response({"backend": backend.name})


class Mesh:
    """One `payments` service with an inbound per endpoint, and a frontend outbound in explicit mode."""

    def __init__(self, stack: AsyncExitStack):
        self.stack = stack

    async def start(self, endpoints: list[tuple[str, int]], *, policy: dict | None = None,
                    rules: ServiceRules | None = None, seed: int = 1) -> Mesh:
        """`endpoints`: (version, app port) per endpoint; each gets an inbound of its own."""
        self.inbound_states: list[ProxyState] = []
        eps = []
        for i, (version, app_port) in enumerate(endpoints):
            st = ProxyState("payments", version)
            self.stack.callback(st.close)
            srv = await start_inbound(st, "127.0.0.1", 0, app_port=app_port)
            self.stack.callback(srv.close)
            self.inbound_states.append(st)
            eps.append(Endpoint(instance=f"i{i}", address="127.0.0.1", port=port_of(srv), version=version,
                                identity="spiffe://mesh.local/ns/shop/sa/payments"))
        svc = ServiceConfig(name="payments", namespace="shop", protocol="http", port=SVC_PORT,
                            identity="spiffe://mesh.local/ns/shop/sa/payments",
                            policy=decode_traffic_policy(policy or {}), rules=rules)
        self.snapshot = Snapshot(version=1, config=MeshConfig(services={"payments": svc},
                                                              endpoints={"payments": tuple(eps)}))
        for st in self.inbound_states:
            st.apply_snapshot(self.snapshot)  # the inbound finds its own policy (rate limit) in it
        self.out = ProxyState("frontend", "v1", rand=random.Random(seed).random)
        self.out.apply_snapshot(self.snapshot)
        self.stack.callback(self.out.close)
        srv = await start_outbound(self.out, "127.0.0.1", 0, mode="explicit")
        self.stack.callback(srv.close)
        self.proxy = f"http://127.0.0.1:{port_of(srv)}"
        self.keys = [(e.address, e.port) for e in eps]
        return self

    @property
    def traffic(self) -> ServiceTraffic:
        return self.out.traffic.services["payments"]

    async def session(self) -> aiohttp.ClientSession:
        s = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=50),
                                  timeout=aiohttp.ClientTimeout(total=GUARD_S))
        self.stack.push_async_callback(s.close)
        return s

    async def call(self, s, method="GET", path="/", **kw) -> tuple[int, dict, bytes]:
        async with s.request(method, URL + path, proxy=self.proxy, **kw) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, await r.read()


def name_of(body: bytes) -> str:
    return json.loads(body)["backend"]


def flags_count(state: ProxyState, flags: str) -> int:
    return state.telemetry.request_count(response_flags=flags)


# ---- rules: split, header and path routes ---------------------------------------------------------

async def _split():
    async with AsyncExitStack() as stack:
        v1 = await Backend("v1").start(stack)
        v2 = await Backend("v2").start(stack)
        rules = ServiceRules(service="payments", split=Split("payments", (("v1", 90), ("v2", 10))))
        mesh = await Mesh(stack).start([("v1", v1.port), ("v2", v2.port)], rules=rules, seed=7)
        s = await mesh.session()
        statuses = []

        async def worker(n):
            for _ in range(n):
                statuses.append((await mesh.call(s))[0])

        await asyncio.gather(*(worker(100) for _ in range(20)))
        assert statuses == [200] * 2000
        assert v1.hits + v2.hits == 2000
        assert 0.08 <= v2.hits / 2000 <= 0.12, (v1.hits, v2.hits)


def test_weighted_split_90_10_within_two_percent(run):
    run(_split)


async def _header_route():
    async with AsyncExitStack() as stack:
        v1 = await Backend("v1").start(stack)
        v2 = await Backend("v2").start(stack)
        rules = ServiceRules(service="payments", routes=(
            RouteRule(match_headers=(("x-canary", "1"),), path_prefix=None, to_version="v2"),
            RouteRule(match_headers=(), path_prefix="/beta", to_version="v2"),
            RouteRule(match_headers=(("x-want", "v3"),), path_prefix=None, to_version="v3"),
        ), split=Split("payments", (("v1", 100),)))
        mesh = await Mesh(stack).start([("v1", v1.port), ("v2", v2.port)], rules=rules)
        s = await mesh.session()
        for _ in range(10):
            status, _, body = await mesh.call(s, headers={"X-Canary": "1"})
            assert status == 200 and name_of(body) == "v2"
            status, _, body = await mesh.call(s, headers={"X-Canary": "0"})
            assert status == 200 and name_of(body) == "v1"
            status, _, body = await mesh.call(s, path="/beta/x")
            assert status == 200 and name_of(body) == "v2"
        assert (v1.hits, v2.hits) == (10, 20)
        # A version without endpoints: 503 UH (Istio's empty subset), nothing sent.
        status, headers, _ = await mesh.call(s, headers={"X-Want": "v3"})
        assert status == 503 and headers["x-mesh-flags"] == "UH"
        assert v1.hits + v2.hits == 30


def test_header_and_path_routes_pick_a_version_and_an_empty_version_is_503_uh(run):
    run(_header_route)


# ---- fault injection and the whole-request timeout --------------------------------------------------

async def _fault_abort():
    async with AsyncExitStack() as stack:
        app = await Backend("v1").start(stack)
        rules = ServiceRules(service="payments", fault=Fault(abort_percent=100.0, abort_status=503))
        mesh = await Mesh(stack).start([("v1", app.port)], rules=rules,
                                       policy={"mesh.retries.on": "5xx"})
        s = await mesh.session()
        for _ in range(5):
            status, headers, _ = await mesh.call(s)
            assert status == 503 and headers["x-mesh-flags"] == "FI"
        assert app.hits == 0  # aborted before any upstream, and never retried
        assert flags_count(mesh.out, "FI") == 5


def test_fault_abort_answers_its_status_with_flag_fi(run):
    run(_fault_abort)


async def _delay_and_timeout():
    async with AsyncExitStack() as stack:
        app = await Backend("v1").start(stack)
        rules = ServiceRules(service="payments", fault=Fault(delay_percent=100.0, delay_s=5.0))
        mesh = await Mesh(stack).start([("v1", app.port)], rules=rules, policy={"mesh.timeout": "200ms"})
        s = await mesh.session()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        status, headers, _ = await mesh.call(s)
        elapsed = loop.time() - t0
        assert status == 504
        assert set(headers["x-mesh-flags"].split(",")) == {"DI", "UT"}
        assert elapsed < 5.0  # the timeout cut the delay short
        assert app.hits == 0
        assert mesh.traffic.breaker.requests == 0 and mesh.out.in_flight == {}


def test_delay_fault_longer_than_the_timeout_is_504_ut(run):
    run(_delay_and_timeout)


# ---- retries ------------------------------------------------------------------------------------------

async def _flaky():
    rng = random.Random(11)
    pattern = [rng.random() < 0.3 for _ in range(5000)]
    state = {"i": 0}

    async def flaky(backend, request, body):
        fail = pattern[state["i"]]
        state["i"] += 1
        if fail:
            return web.Response(status=503, text="flaky")
        return web.json_response({"backend": backend.name})

    async with AsyncExitStack() as stack:
        app = await Backend("v1", flaky).start(stack)
        policy = {"mesh.retries.on": "5xx", "mesh.retries.attempts": "3", "mesh.retries.backoff": "1ms,4ms"}
        mesh = await Mesh(stack).start([("v1", app.port), ("v1", app.port)], policy=policy)
        s = await mesh.session()
        n = 400
        ok = 0
        for _ in range(n):
            status, _, _ = await mesh.call(s)
            ok += status == 200
        failures_seen = sum(pattern[:app.hits])
        assert failures_seen > 0.2 * app.hits  # the app really failed about 30% of tries
        assert ok >= 0.99 * n, ok
        assert app.hits > n and mesh.traffic.retries_total == app.hits - n
        assert flags_count(mesh.out, "URX") == n - ok  # a request that ran out of retries says so
        assert mesh.traffic.budget.active_requests == 0 and mesh.traffic.budget.active_retries == 0


def test_retries_on_5xx_make_a_30_percent_flaky_app_succeed(run):
    run(_flaky)


async def _budget():
    async def gated(backend, request, body):
        backend.waiting += 1
        if backend.waiting >= 10:
            backend.release.set()  # the first ten requests are in: all of them fail together
        await backend.release.wait()
        return web.Response(status=503, text="down")

    async def load(budget: str) -> tuple[int, int]:
        async with AsyncExitStack() as stack:
            app = await Backend("v1", gated).start(stack)
            policy = {"mesh.retries.on": "5xx", "mesh.retries.attempts": "3",
                      "mesh.retries.backoff": "20ms,20ms", "mesh.retries.budget": budget,
                      "mesh.outlier.consecutive-5xx": "0"}
            mesh = await Mesh(stack).start([("v1", app.port)], policy=policy)
            s = await mesh.session()
            statuses = await asyncio.gather(*(mesh.call(s) for _ in range(10)))
            assert [st for st, _, _ in statuses] == [503] * 10
            return app.hits, mesh.traffic.retry_overflows

    hits, overflows = await load("100%,10")
    assert (hits, overflows) == (40, 0)          # every request retried 3 times
    hits, overflows = await load("0%,1")
    assert hits <= 20 and overflows >= 5, (hits, overflows)  # one retry in flight at a time


def test_retry_budget_limits_the_extra_load(run):
    run(_budget)


async def _idempotency():
    async def down(backend, request, body):
        return web.Response(status=503, text="down")

    async with AsyncExitStack() as stack:
        app = await Backend("v1", down).start(stack)
        policy = {"mesh.retries.on": "5xx", "mesh.retries.backoff": "1ms", "mesh.outlier.consecutive-5xx": "0"}
        mesh = await Mesh(stack).start([("v1", app.port)], policy=policy)
        s = await mesh.session()
        status, _, _ = await mesh.call(s, "POST", data=b"order")
        assert status == 503 and app.hits == 1        # sent once: it may have been processed
        status, _, _ = await mesh.call(s, "PUT", data=b"order")
        assert status == 503 and app.hits == 1 + 3    # idempotent: first try and 2 retries
        assert app.bodies[1:] == [b"order"] * 3       # the held body went out again each time
        assert flags_count(mesh.out, "URX") == 1 and flags_count(mesh.out, "-") == 1
    async with AsyncExitStack() as stack:
        app = await Backend("v1", down).start(stack)
        mesh = await Mesh(stack).start([("v1", app.port)], policy={**policy, "mesh.retries.non-idempotent": "true"})
        s = await mesh.session()
        status, _, _ = await mesh.call(s, "POST", data=b"order")
        assert status == 503 and app.hits == 3


def test_post_is_not_retried_after_it_was_sent_unless_the_policy_says_so(run):
    run(_idempotency)


async def _peer_unreachable():
    async with AsyncExitStack() as stack:
        app = await Backend("v1").start(stack)
        # Endpoint 0: a peer sidecar whose app is gone (its inbound answers 503 UF); endpoint 1 is fine.
        mesh = await Mesh(stack).start([("v1", dead_port()), ("v1", app.port)], seed=3)
        s = await mesh.session()
        for i in range(20):
            status, _, body = await mesh.call(s, "POST", data=b"pay %d" % i)
            assert status == 200 and name_of(body) == "v1"
        assert sorted(app.bodies) == sorted(b"pay %d" % i for i in range(20))  # each order exactly once
        dead_inbound = mesh.inbound_states[0]
        assert flags_count(dead_inbound, "UF") >= 1        # the dead replica was tried...
        assert flags_count(mesh.out, "-") == 20            # ...and no caller saw it fail


def test_peer_inbound_503_uf_is_retried_on_another_endpoint_even_for_post(run):
    run(_peer_unreachable)


async def _per_try_timeout():
    seen: set[str] = set()

    async def slow_first(backend, request, body):
        key = request.query["id"]
        if key not in seen:
            seen.add(key)
            await backend.release.wait()  # never set: the per-try timeout gives up on this try
        return web.json_response({"backend": backend.name})

    async with AsyncExitStack() as stack:
        app = await Backend("v1", slow_first).start(stack)
        # 400 ms: the answering try must beat it on a loaded CI machine too (the hung one never answers)
        mesh = await Mesh(stack).start([("v1", app.port)], policy={"mesh.retries.per-try-timeout": "400ms",
                                                                    "mesh.retries.backoff": "1ms"})
        s = await mesh.session()
        for i in range(3):
            status, _, _ = await mesh.call(s, path=f"/x?id={i}")
            assert status == 200
        assert app.hits == 6 and mesh.traffic.retries_total == 3
        app.release.set()  # let the abandoned first tries end, so the app can shut down


def test_per_try_timeout_retries_a_hung_try(run):
    run(_per_try_timeout)


# ---- circuit breaker, outlier detection ---------------------------------------------------------------

async def _breaker():
    async with AsyncExitStack() as stack:
        app = await Backend("v1", hold).start(stack)
        mesh = await Mesh(stack).start([("v1", app.port)], policy={"mesh.circuit.max-requests": "1"})
        s = await mesh.session()
        first = asyncio.ensure_future(mesh.call(s))
        await eventually(lambda: app.waiting == 1, "the first request to reach the app")
        status, headers, _ = await mesh.call(s)
        assert status == 503 and headers["x-mesh-flags"] == "UO"
        assert app.hits == 1 and mesh.traffic.breaker.overflows_total == 1
        app.release.set()
        assert (await first)[0] == 200
        assert mesh.traffic.breaker.requests == 0
        assert (await mesh.call(s))[0] == 200  # room again


def test_circuit_breaker_overflow_is_503_uo(run):
    run(_breaker)


async def _outlier():
    async def broken(backend, request, body):
        return web.Response(status=500, text="broken")

    async with AsyncExitStack() as stack:
        good = await Backend("good").start(stack)
        bad = await Backend("bad", broken).start(stack)
        # The ejection outlasts the 30 calls below on a loaded host (200 ms did not, once).
        policy = {"mesh.outlier.consecutive-5xx": "3", "mesh.outlier.base-ejection": "2s",
                  "mesh.outlier.max-ejection-percent": "50%"}
        mesh = await Mesh(stack).start([("v1", good.port), ("v1", bad.port)], policy=policy)
        s = await mesh.session()
        detector = mesh.traffic.outlier
        bad_key = mesh.keys[1]
        for _ in range(200):
            await mesh.call(s)
            if detector.ejections_total:
                break
        assert detector.ejections_total == 1 and detector.is_ejected(bad_key, monotonic())
        hits = bad.hits
        for _ in range(30):
            status, _, _ = await mesh.call(s)
            assert status == 200
        assert bad.hits == hits  # ejected: nothing sent to it
        await eventually(lambda: not detector.is_ejected(bad_key, monotonic()), "the ejection to end")
        for _ in range(200):
            await mesh.call(s)
            if bad.hits > hits:
                break
        assert bad.hits > hits  # back in the rotation after the base ejection time


def test_outlier_detection_ejects_a_failing_endpoint_and_returns_it(run):
    run(_outlier)


# ---- inbound rate limit ----------------------------------------------------------------------------

async def raw_get(port: int, source: str) -> tuple[int, dict]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: payments\r\nx-mesh-source: %b\r\nConnection: close\r\n\r\n"
                 % source.encode())
    data = await reader.read()
    writer.close()
    head = data.split(b"\r\n\r\n", 1)[0].decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in head[1:])
    return int(head[0].split()[1]), headers


async def _ratelimit():
    async with AsyncExitStack() as stack:
        app = await Backend("v1").start(stack)
        mesh = await Mesh(stack).start([("v1", app.port)], policy={"mesh.ratelimit": "3/m"})
        s = await mesh.session()
        assert [(await mesh.call(s))[0] for _ in range(3)] == [200] * 3
        status, headers, _ = await mesh.call(s)
        assert status == 429 and headers["x-mesh-flags"] == "RL"
        assert 1 <= int(headers["retry-after"]) <= 20  # one token comes back every 20 s
        assert app.hits == 3
        assert flags_count(mesh.inbound_states[0], "RL") == 1
    async with AsyncExitStack() as stack:
        app = await Backend("v1").start(stack)
        mesh = await Mesh(stack).start([("v1", app.port)],
                                       policy={"mesh.ratelimit": "2/h", "mesh.ratelimit.per-caller": "true"})
        inbound = mesh.snapshot.config.endpoints["payments"][0].port
        assert [(await raw_get(inbound, "orders"))[0] for _ in range(3)] == [200, 200, 429]
        assert (await raw_get(inbound, "cart"))[0] == 200  # another caller has a bucket of its own
        status, headers = await raw_get(inbound, "orders")
        assert status == 429 and int(headers["retry-after"]) >= 1


def test_inbound_rate_limit_is_429_with_retry_after_per_service_and_per_caller(run):
    run(_ratelimit)


# ---- mirroring -------------------------------------------------------------------------------------

async def _mirror():
    async with AsyncExitStack() as stack:
        primary = await Backend("v1").start(stack)
        shadow = await Backend("v2").start(stack)
        rules = ServiceRules(service="payments", split=Split("payments", (("v1", 100),)),
                             mirror=Mirror(to_version="v2", percent=100.0))
        mesh = await Mesh(stack).start([("v1", primary.port), ("v2", shadow.port)], rules=rules)
        s = await mesh.session()
        for i in range(10):
            status, _, body = await mesh.call(s, "POST", data=b"order %d" % i)
            assert status == 200 and name_of(body) == "v1"  # the caller sees only the primary
        await eventually(lambda: shadow.hits == 10, "the copies to arrive")
        assert primary.hits == 10
        assert sorted(shadow.bodies) == sorted(primary.bodies)
        assert set(shadow.hosts) == {f"payments-shadow:{SVC_PORT}"}  # Envoy's shadow host
        await eventually(lambda: mesh.out.telemetry.registry.get_sample_value(
            "mesh_mirror_requests_total", {"source_workload": "frontend", "destination_service": "payments",
                                           "destination_version": "v2", "response_code": "200"}) == 10,
            "the mirror counter")
        # A shadow that hangs never delays the primary.
        shadow.handler = hold
        for _ in range(5):
            status, _, body = await mesh.call(s)
            assert status == 200 and name_of(body) == "v1"
        await eventually(lambda: shadow.waiting == 5, "the hung copies")
        assert primary.hits == 15
        shadow.release.set()


def test_mirror_copies_requests_to_the_shadow_without_touching_the_primary(run):
    run(_mirror)


# ---- load balancing choices ------------------------------------------------------------------------

async def _ring_hash():
    async with AsyncExitStack() as stack:
        apps = [await Backend(f"b{i}").start(stack) for i in range(3)]
        mesh = await Mesh(stack).start([("v1", a.port) for a in apps],
                                       policy={"mesh.lb": "ring-hash", "mesh.lb.hash-header": "x-user"})
        s = await mesh.session()
        owner: dict[str, set[str]] = {}
        for user in range(20):
            for _ in range(5):
                status, _, body = await mesh.call(s, headers={"X-User": f"user-{user}"})
                assert status == 200
                owner.setdefault(f"user-{user}", set()).add(name_of(body))
        assert all(len(names) == 1 for names in owner.values()), owner   # sticky per user
        assert len(set().union(*owner.values())) >= 2                    # and spread over endpoints


def test_ring_hash_sends_a_header_value_to_one_endpoint(run):
    run(_ring_hash)


async def _round_robin():
    async with AsyncExitStack() as stack:
        apps = [await Backend(f"b{i}").start(stack) for i in range(3)]
        mesh = await Mesh(stack).start([("v1", a.port) for a in apps], policy={"mesh.lb": "round-robin"})
        s = await mesh.session()
        for _ in range(30):
            assert (await mesh.call(s))[0] == 200
        assert [a.hits for a in apps] == [10, 10, 10]


def test_round_robin_takes_turns(run):
    run(_round_robin)


# ---- state across snapshots ------------------------------------------------------------------------

def test_traffic_state_survives_unrelated_snapshot_swaps():
    def snap(version: int, labels: dict, extra: bool) -> Snapshot:
        svc = ServiceConfig(name="payments", namespace="shop", protocol="http", port=SVC_PORT, identity="x",
                            policy=decode_traffic_policy(labels))
        services = {"payments": svc}
        endpoints = {"payments": (Endpoint("a", "10.0.0.1", 15006, "v1", "x"),
                                  Endpoint("b", "10.0.0.2", 15006, "v2", "x"))}
        if extra:
            services["cart"] = ServiceConfig(name="cart", namespace="shop", protocol="http", port=80, identity="y")
        return Snapshot(version=version, config=MeshConfig(services=services, endpoints=endpoints))

    reg = TrafficRegistry()
    reg.apply(build_route_table(snap(1, {"mesh.circuit.max-requests": "5"}, False)))
    tr = reg.services["payments"]
    assert tr.breaker.try_acquire_request()
    tr.outlier.record(("10.0.0.1", 15006), "connect-failure", 1.0)
    assert sorted(tr.subsets) == ["v1", "v2"] and tr.breaker.max_requests == 5
    reg.apply(build_route_table(snap(2, {"mesh.circuit.max-requests": "5"}, True)))
    assert reg.services["payments"] is tr and tr.breaker.requests == 1      # same object, counts kept
    assert tr.outlier.state()[("10.0.0.1", 15006)]["consecutive_5xx"] == 1
    reg.apply(build_route_table(snap(3, {"mesh.circuit.max-requests": "9"}, True)))
    assert reg.services["payments"] is tr and tr.breaker.max_requests == 9 and tr.breaker.requests == 1
    reg.apply(build_route_table(snap(4, {}, False)))
    assert "cart" not in reg.services and tr.breaker.max_requests == 2**32 - 1


async def _all_ejected():
    async def broken(backend, request, body):
        return web.Response(status=503, text="broken")

    async with AsyncExitStack() as stack:
        bad = await Backend("bad", broken).start(stack)
        policy = {"mesh.outlier.consecutive-5xx": "3", "mesh.outlier.base-ejection": "300ms",
                  "mesh.retries.attempts": "0", "mesh.outlier.min-health-percent": "0%"}
        mesh = await Mesh(stack).start([("v1", bad.port)], policy=policy)
        s = await mesh.session()
        for _ in range(3):
            assert (await mesh.call(s))[0] == 503
        assert mesh.traffic.outlier.ejections_total == 1
        hits = bad.hits
        # The only endpoint is ejected and panic is off: 503 UH at once, nothing sent to it.
        for _ in range(10):
            status, headers, _ = await mesh.call(s)
            assert status == 503 and headers["x-mesh-flags"] == "UH"
        assert bad.hits == hits
        await eventually(lambda: not mesh.traffic.outlier.is_ejected(mesh.keys[0], monotonic()), "the ejection to end")
        await mesh.call(s)
        assert bad.hits == hits + 1  # tried again after the ejection


def test_every_endpoint_ejected_answers_503_uh_without_calling_it(run):
    run(_all_ejected)


async def _new_rules_apply_at_once():
    async with AsyncExitStack() as stack:
        app = await Backend("v1").start(stack)
        mesh = await Mesh(stack).start([("v1", app.port)])
        s = await mesh.session()
        assert (await mesh.call(s))[0] == 200
        lane = mesh.out.lanes["payments"]
        # A new snapshot with an abort fault and a timeout: the next request must see both (the
        # traffic layers' copy of the service's state, sidecar.proxy._Lane, follows the new cluster).
        svc = mesh.snapshot.config.services["payments"]
        svc = dataclasses.replace(svc, policy=dataclasses.replace(svc.policy, timeout=2.0), rules=ServiceRules(
            service="payments", fault=Fault(abort_percent=100.0, abort_status=418)))
        mesh.out.apply_snapshot(dataclasses.replace(mesh.snapshot, version=2, config=dataclasses.replace(
            mesh.snapshot.config, services={"payments": svc})))
        status, headers, _ = await mesh.call(s)
        assert status == 418 and headers["x-mesh-flags"] == "FI"
        new = mesh.out.lanes["payments"]
        assert new is not lane and new.timeout == 2.0 and new.fault is not None and lane.fault is None
        # And back: the next snapshot without them serves the app again.
        mesh.out.apply_snapshot(dataclasses.replace(mesh.snapshot, version=3))
        assert (await mesh.call(s))[0] == 200
        assert mesh.out.lanes["payments"].timeout is None and app.hits == 2


def test_a_new_snapshots_rules_and_policy_apply_to_the_next_request(run):
    run(_new_rules_apply_at_once)
