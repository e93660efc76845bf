"""Tracing on loopback: trace context propagation client -> outbound -> inbound -> app, spans posted
as OTLP/HTTP JSON to a fake collector, access logs by mode, and meshd's receiver and trace API.

Every test runs on both event loops (the `run` fixture). Waits poll toward a deadline; the only fixed
wait is the one that proves nothing is exported with sampling 0 (about 2.5 batch delays).
"""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
import threading
import time
from contextlib import AsyncExitStack

import aiohttp
import pytest
import structlog
from aiohttp import web
from multidict import CIMultiDict

from gateway.server import start_gateway
from meshcore.otlp import decode_otlp, encode_otlp
from meshcore.snapshot import GatewayRoute, MeshConfig, Snapshot
from meshcore.spans import KIND_CLIENT, KIND_SERVER, SpanRecord
from meshcore.telemetry_settings import TelemetrySettings
from meshcore.tracecontext import TraceContext, decode_traceparent
from meshd.pki import Pki
from meshd.store import Store
from meshd.traces import MAX_BODY, SettingsBook, TraceStore, add_receiver, add_routes
from sidecar.otel import BATCH_DELAY_MS, post_json
from meshcore.metrics import Registry
from sidecar.proxy import ProxyState, start_inbound, start_outbound
from sidecar.tracing import Tracing
from tests.adapters.loops import eventually, serve_on_loopback
from tests.adapters.test_mtls import ORDERS, make_agent
from tests.adapters.test_proxy import SVC_PORT, endpoint, port_of, service

OUT_TRACE = 0x0AF7651916CD43DD8448EB211C80319C    # ids the outbound node draws (new traces, its spans)
OUT_SPAN = 0xB7AD6B7169203331
IN_TRACE = 0x11111111111111111111111111111111     # the inbound node's (never used as a trace id: it has a parent)
IN_SPAN = 0x2222222222222222
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
SPAN_WAIT_S = 10.0                                  # spans leave a node about BATCH_DELAY_MS after the request


# ---- the pieces -------------------------------------------------------------------------------------------

class Backend:
    """The app behind the inbound: records every request's headers (all values, lowercase names)."""

    def __init__(self):
        self.seen: list[list[tuple[str, str]]] = []

    async def start(self, stack: AsyncExitStack) -> "Backend":
        app = web.Application()
        app.router.add_route("*", "/status/{code}", self.status)
        self.port = await serve_on_loopback(app, stack)
        return self

    async def status(self, request: web.Request) -> web.Response:
        self.seen.append([(k.lower(), v) for k, v in request.headers.items()])
        return web.Response(status=int(request.match_info["code"]), text="ok\n")

    def last(self, name: str) -> list[str]:
        """Every value of header `name` in the last request."""
        return [v for k, v in self.seen[-1] if k == name]

    def one(self, name: str) -> str:
        values = self.last(name)
        assert len(values) == 1, (name, self.seen[-1])
        return values[0]


class Collector:
    """A fake external OTLP/HTTP collector (Jaeger's or Tempo's /v1/traces) on loopback."""

    def __init__(self):
        self.bodies: list[dict] = []
        self.content_types: list[str] = []

    async def start(self, stack: AsyncExitStack) -> "Collector":
        app = web.Application()
        app.router.add_post("/v1/traces", self.receive)
        self.port = await serve_on_loopback(app, stack)
        self.url = f"http://127.0.0.1:{self.port}/v1/traces"
        return self

    async def receive(self, request: web.Request) -> web.Response:
        self.content_types.append(request.content_type)
        self.bodies.append(await request.json())
        return web.json_response({})

    def spans(self) -> list[SpanRecord]:
        return [s for body in self.bodies for s in decode_otlp(body)]


def fixed_ids(trace: int, span: int):
    """Tracing.bits for a node: its new trace id and span id, drawn in that order per request."""
    return lambda n: trace if n == 128 else span


class TracedMesh:
    """app <- inbound (payments v2) <- outbound (frontend v1), both with the same telemetry settings."""

    def __init__(self, stack: AsyncExitStack):
        self.stack = stack

    async def start(self, settings: TelemetrySettings) -> "TracedMesh":
        stack = self.stack
        self.app = await Backend().start(stack)
        self.inbound = ProxyState("payments", "v2")
        stack.callback(self.inbound.close)
        srv = await start_inbound(self.inbound, "127.0.0.1", 0, app_port=self.app.port)
        stack.callback(srv.close)
        self.inbound_port = port_of(srv)
        self.outbound = ProxyState("frontend", "v1")
        stack.callback(self.outbound.close)
        out = await start_outbound(self.outbound, "127.0.0.1", 0, mode="explicit")
        stack.callback(out.close)
        self.proxy = f"http://127.0.0.1:{port_of(out)}"
        for state in (self.inbound, self.outbound):
            # The SDK's shutdown may export: never block this loop (a fake collector may be on it).
            stack.push_async_callback(asyncio.to_thread, state.tracing.close)
        self.outbound.tracing.bits = fixed_ids(OUT_TRACE, OUT_SPAN)
        self.inbound.tracing.bits = fixed_ids(IN_TRACE, IN_SPAN)
        self.apply(settings)
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        stack.push_async_callback(self.session.close)
        return self

    def apply(self, settings: TelemetrySettings, version: int = 1) -> None:
        eps = {"payments": (endpoint("live0", self.inbound_port),)}
        routes = (GatewayRoute(service="payments", path="/pay", host=None, strip_prefix=True),)
        self.snapshot = Snapshot(version=version, config=MeshConfig(
            services={"payments": service("payments", SVC_PORT)}, endpoints=eps, gateway_routes=routes,
            telemetry=settings))
        self.inbound.apply_snapshot(self.snapshot)
        self.outbound.apply_snapshot(self.snapshot)

    async def start_gateway(self) -> str:
        """The gateway node on the same snapshot; returns its base URL."""
        self.gateway = ProxyState("gateway", "v1")
        self.stack.callback(self.gateway.close)
        gw = await start_gateway(self.gateway, "127.0.0.1", 0)
        self.stack.callback(gw.close)
        self.stack.push_async_callback(asyncio.to_thread, self.gateway.tracing.close)
        self.gateway.tracing.bits = fixed_ids(OUT_TRACE, OUT_SPAN)
        self.gateway.apply_snapshot(self.snapshot)
        return f"http://127.0.0.1:{port_of(gw)}"

    async def get(self, path: str = "/status/200", headers: dict | None = None) -> int:
        async with self.session.get(f"http://payments:{SVC_PORT}{path}", proxy=self.proxy,
                                    headers=headers or {}) as r:
            await r.read()
            return r.status


def metric(state: ProxyState, name: str, **labels) -> float:
    return state.telemetry.registry.get_sample_value(name, labels) or 0.0


def requests_logged(logs: list[dict]) -> list[dict]:
    return [e for e in logs if e.get("event") == "request" and "direction" in e]


# ---- a. propagation ---------------------------------------------------------------------------------------

async def _new_trace_reaches_the_app():
    async with AsyncExitStack() as stack:
        mesh = await TracedMesh(stack).start(TelemetrySettings(sampling=0, access_log="off"))
        assert await mesh.get() == 200
        parent = decode_traceparent(mesh.app.one("traceparent").encode())
        assert parent is not None, mesh.app.seen
        assert parent.trace_id == OUT_TRACE            # the trace the outbound started, kept by the inbound
        assert parent.span_id == IN_SPAN               # the app's parent is the inbound hop
        assert parent.sampled is False                 # sampling 0: propagated, not recorded
        assert mesh.app.last("x-b3-traceid") == [] and mesh.app.last("b3") == []   # no B3 unless asked


def test_a_request_without_trace_headers_gets_a_new_trace_that_reaches_the_app(run):
    run(_new_trace_reaches_the_app)


async def _incoming_traceparent_kept():
    async with AsyncExitStack() as stack:
        mesh = await TracedMesh(stack).start(TelemetrySettings(sampling=0, access_log="off"))
        sent = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
        assert await mesh.get(headers={"traceparent": sent}) == 200
        got = mesh.app.one("traceparent")
        assert got == f"00-{CALLER_TRACE}-{IN_SPAN:016x}-01"   # same trace, new parent id, caller's decision
        # An invalid traceparent is replaced by a new trace (W3C: restart the trace).
        assert await mesh.get(headers={"traceparent": f"ff-{CALLER_TRACE}-{CALLER_SPAN}-01"}) == 200
        parent = decode_traceparent(mesh.app.one("traceparent").encode())
        assert parent.trace_id == OUT_TRACE and parent.sampled is False


def test_an_incoming_traceparent_keeps_its_trace_id_and_gets_a_new_parent_id(run):
    run(_incoming_traceparent_kept)


async def _not_sampled_preserved():
    async with AsyncExitStack() as stack:
        collector = await Collector().start(stack)
        mesh = await TracedMesh(stack).start(TelemetrySettings(sampling=100, otlp_endpoint=collector.url))
        assert await mesh.get(headers={"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-00"}) == 200
        assert mesh.app.one("traceparent") == f"00-{CALLER_TRACE}-{IN_SPAN:016x}-00"
        await asyncio.sleep(2.5 * BATCH_DELAY_MS / 1000)   # batches would have gone out by now
        assert collector.bodies == []                         # nothing recorded
        for node in (mesh.outbound, mesh.inbound):
            assert metric(node, "mesh_trace_spans_total", target="external", result="exported") == 0


def test_a_callers_not_sampled_decision_wins_over_the_sampling_rate(run):
    run(_not_sampled_preserved)


B3_TID64 = "64fe8b2a57d3eff7"
B3_TID128 = "80f198ee56343ba864fe8b2a57d3eff7"
B3_SID = "e457b5a2e4d86bd1"


async def _b3_multi():
    async with AsyncExitStack() as stack:
        mesh = await TracedMesh(stack).start(TelemetrySettings(sampling=0, access_log="off"))
        headers = {"X-B3-TraceId": B3_TID64, "X-B3-SpanId": B3_SID, "X-B3-ParentSpanId": "05e3ac9a4f6e3b90",
                   "X-B3-Sampled": "1"}
        assert await mesh.get(headers=headers) == 200
        parent = decode_traceparent(mesh.app.one("traceparent").encode())
        assert (parent.trace_id, parent.span_id, parent.sampled) == (int(B3_TID64, 16), IN_SPAN, True)
        assert int(mesh.app.one("x-b3-traceid"), 16) == int(B3_TID64, 16)   # the caller's trace
        assert mesh.app.one("x-b3-spanid") == f"{IN_SPAN:016x}"     # replaced, not duplicated
        assert mesh.app.one("x-b3-parentspanid") == f"{OUT_SPAN:016x}"
        assert mesh.app.one("x-b3-sampled") == "1"
        assert mesh.app.last("b3") == []
        # Not sampled by the caller: 0 all the way.
        headers = {"x-b3-traceid": B3_TID128, "x-b3-spanid": B3_SID, "x-b3-sampled": "0"}
        assert await mesh.get(headers=headers) == 200
        assert mesh.app.one("x-b3-traceid") == B3_TID128 and mesh.app.one("x-b3-sampled") == "0"
        assert mesh.app.one("traceparent") == f"00-{B3_TID128}-{IN_SPAN:016x}-00"


def test_b3_multi_headers_are_understood_and_forwarded_in_kind(run):
    run(_b3_multi)


async def _b3_short_trace_id_kept():
    async with AsyncExitStack() as stack:
        mesh = await TracedMesh(stack).start(TelemetrySettings(sampling=0, access_log="off"))
        assert await mesh.get(headers={"x-b3-traceid": B3_TID64, "x-b3-spanid": B3_SID, "x-b3-sampled": "1"}) == 200
        assert mesh.app.one("x-b3-traceid") == B3_TID64


def test_a_64_bit_b3_trace_id_stays_64_bit_across_two_hops(run):
    run(_b3_short_trace_id_kept)


async def _b3_single():
    async with AsyncExitStack() as stack:
        mesh = await TracedMesh(stack).start(TelemetrySettings(sampling=0, access_log="off"))
        assert await mesh.get(headers={"b3": f"{B3_TID128}-{B3_SID}-1"}) == 200
        assert mesh.app.one("b3") == f"{B3_TID128}-{IN_SPAN:016x}-1-{OUT_SPAN:016x}"
        assert mesh.app.one("traceparent") == f"00-{B3_TID128}-{IN_SPAN:016x}-01"
        assert mesh.app.last("x-b3-traceid") == []


def test_a_single_b3_header_is_forwarded_as_a_single_b3_header(run):
    run(_b3_single)


async def _duplicated_traceparent():
    async with AsyncExitStack() as stack:
        mesh = await TracedMesh(stack).start(TelemetrySettings(sampling=0, access_log="off"))
        a = f"00-{'1' * 32}-{CALLER_SPAN}-01"
        b = f"00-{'2' * 32}-{CALLER_SPAN}-01"
        async with mesh.session.get(f"http://payments:{SVC_PORT}/status/200", proxy=mesh.proxy,
                                    headers=CIMultiDict([("traceparent", a), ("traceparent", b)])) as r:
            assert r.status == 200
        parent = decode_traceparent(mesh.app.one("traceparent").encode())
        assert parent.trace_id == OUT_TRACE, "two traceparent headers: neither may be trusted"


def test_two_traceparent_headers_start_a_new_trace(run):
    run(_duplicated_traceparent)


# ---- b. spans ---------------------------------------------------------------------------------------------

async def _spans_exported(incoming: bool):
    async with AsyncExitStack() as stack:
        collector = await Collector().start(stack)
        mesh = await TracedMesh(stack).start(TelemetrySettings(sampling=100, otlp_endpoint=collector.url))
        headers = {"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"} if incoming else {}
        assert await mesh.get("/status/201?q=1", headers=headers) == 201
        await eventually(lambda: len(collector.spans()) >= 2, "a span from each node", SPAN_WAIT_S)
        spans = collector.spans()
        assert len(spans) == 2, spans
        assert set(collector.content_types) == {"application/json"}
        (client,) = [s for s in spans if s.kind == KIND_CLIENT]
        (server,) = [s for s in spans if s.kind == KIND_SERVER]
        trace = CALLER_TRACE if incoming else f"{OUT_TRACE:032x}"
        assert client.trace_id == server.trace_id == trace
        assert client.span_id == f"{OUT_SPAN:016x}" and server.span_id == f"{IN_SPAN:016x}"
        assert client.parent_id == (CALLER_SPAN if incoming else None)
        assert server.parent_id == client.span_id                     # the chain: caller -> client -> server
        assert mesh.app.one("traceparent") == f"00-{trace}-{server.span_id}-01"   # -> the app
        assert (client.service, server.service) == ("frontend", "payments")
        assert dict(server.resource)["service.version"] == "v2"
        assert client.name == "GET payments" and server.name == "GET /status/201"
        for s, direction in ((client, "outbound"), (server, "inbound")):
            assert s.attr("http.response.status_code") == 201
            assert s.attr("http.request.method") == "GET"
            assert s.attr("url.path") == "/status/201"                  # no query string in spans
            assert s.attr("mesh.destination") == "payments"
            assert s.attr("mesh.direction") == direction
            assert s.error is False and 0 < s.end_ns - s.start_ns < 10e9
        assert client.attr("server.address") == f"127.0.0.1:{mesh.inbound_port}"
        assert client.attr("mesh.source") == "frontend" and client.attr("mesh.destination_version") == "v2"
        slack = 50_000_000                                             # two clocks' worth of rounding, in ns
        assert server.start_ns >= client.start_ns - slack and server.end_ns <= client.end_ns + slack
        for state in (mesh.outbound, mesh.inbound):
            await eventually(lambda: metric(state, "mesh_trace_spans_total", target="external",
                                            result="exported") == 1, "the exported count")
            assert metric(state, "mesh_trace_spans_total", target="external", result="failed") == 0


@pytest.mark.parametrize("incoming", [False, True], ids=["new-trace", "incoming-traceparent"])
def test_sampled_requests_export_a_client_and_a_server_span(run, incoming):
    run(_spans_exported, incoming)


async def _gateway_spans():
    async with AsyncExitStack() as stack:
        collector = await Collector().start(stack)
        mesh = await TracedMesh(stack).start(TelemetrySettings(sampling=100, otlp_endpoint=collector.url))
        url = await mesh.start_gateway()
        async with mesh.session.get(f"{url}/pay/status/200") as r:
            assert r.status == 200
        await eventually(lambda: len(collector.spans()) >= 2, "a span from the gateway and the inbound", SPAN_WAIT_S)
        spans = {s.service: s for s in collector.spans()}
        assert set(spans) == {"gateway", "payments"}, collector.spans()
        gw, server = spans["gateway"], spans["payments"]
        assert gw.kind == KIND_SERVER and gw.attr("mesh.direction") == "gateway"   # the trace's entry
        assert gw.parent_id is None and gw.name == "GET payments"
        assert server.trace_id == gw.trace_id == f"{OUT_TRACE:032x}" and server.parent_id == gw.span_id
        # The gateway reports the path after strip-prefix (Istio's access log would show the original).
        assert gw.attr("url.path").endswith("/status/200") and server.attr("url.path") == "/status/200"
        assert mesh.app.one("traceparent") == f"00-{gw.trace_id}-{server.span_id}-01"


def test_the_gateway_starts_the_trace_with_a_server_span(run):
    run(_gateway_spans)


async def _failed_span_is_an_error():
    async with AsyncExitStack() as stack:
        collector = await Collector().start(stack)
        mesh = await TracedMesh(stack).start(TelemetrySettings(sampling=100, otlp_endpoint=collector.url))
        assert await mesh.get("/status/503") == 503
        await eventually(lambda: len(collector.spans()) >= 2, "a span from each node", SPAN_WAIT_S)
        assert all(s.error and s.attr("http.response.status_code") == 503 for s in collector.spans())
        raw = [s for body in collector.bodies for rs in body["resourceSpans"] for ss in rs["scopeSpans"]
               for s in ss["spans"]]
        assert all(s["status"] == {"code": 2} for s in raw)           # STATUS_CODE_ERROR on the wire


def test_a_failed_request_exports_error_spans(run):
    run(_failed_span_is_an_error)


async def _unsampled_nothing_exported():
    async with AsyncExitStack() as stack:
        collector = await Collector().start(stack)
        mesh = await TracedMesh(stack).start(TelemetrySettings(sampling=0, otlp_endpoint=collector.url,
                                                               access_log="off"))
        for _ in range(3):
            assert await mesh.get() == 200
            parent = decode_traceparent(mesh.app.one("traceparent").encode())
            assert parent.trace_id == OUT_TRACE and parent.sampled is False   # still propagated
        await asyncio.sleep(2.5 * BATCH_DELAY_MS / 1000)
        assert collector.bodies == []
        assert mesh.outbound.tracing._exporter is None and mesh.inbound.tracing._exporter is None   # never made
        assert metric(mesh.outbound, "mesh_trace_spans_total", target="external", result="exported") == 0


def test_sampling_zero_exports_nothing_but_still_propagates(run):
    run(_unsampled_nothing_exported)


async def _failing_collector_counted():
    async with AsyncExitStack() as stack:
        app = web.Application()
        async def refuse(_request: web.Request) -> web.Response:
            return web.json_response({"error": "overloaded"}, status=503)

        app.router.add_post("/v1/traces", refuse)
        port = await serve_on_loopback(app, stack)
        mesh = await TracedMesh(stack).start(TelemetrySettings(sampling=100,
                                                               otlp_endpoint=f"http://127.0.0.1:{port}/v1/traces"))
        assert await mesh.get() == 200                                  # the data path is unaffected
        await eventually(lambda: metric(mesh.outbound, "mesh_trace_spans_total", target="external",
                                        result="failed") == 1, "the failed count", SPAN_WAIT_S)
        assert metric(mesh.outbound, "mesh_trace_spans_total", target="external", result="exported") == 0


def test_a_refusing_collector_is_counted_as_failed(run):
    run(_failing_collector_counted)


# ---- c. access logs ---------------------------------------------------------------------------------------

async def _access_full():
    async with AsyncExitStack() as stack:
        mesh = await TracedMesh(stack).start(TelemetrySettings(sampling=0, access_log="full"))
        with structlog.testing.capture_logs() as logs:
            assert await mesh.get("/status/200?secret=1") == 200
            await eventually(lambda: len(requests_logged(logs)) >= 2, "a line from each node")
        lines = {e["direction"]: e for e in requests_logged(logs)}
        assert set(lines) == {"outbound", "inbound"}, logs
        parent = decode_traceparent(mesh.app.one("traceparent").encode())
        for e in lines.values():
            assert e["trace_id"] == "%032x" % parent.trace_id         # matches what the app received
            assert e["status"] == 200 and e["sampled"] is False and e["path"] == "/status/200"
            assert e["method"] == "GET" and e["destination"] == "payments" and e["flags"] == "-"
            assert e["duration_ms"] >= 0
        assert lines["inbound"]["span_id"] == "%016x" % parent.span_id
        assert lines["outbound"]["span_id"] == f"{OUT_SPAN:016x}"
        assert lines["outbound"]["upstream"] == f"127.0.0.1:{mesh.inbound_port}"
        assert lines["outbound"]["source"] == "frontend" and lines["inbound"]["destination_version"] == "v2"


def test_access_log_full_logs_every_request_with_its_trace_id(run):
    run(_access_full)


async def _access_sampled():
    async with AsyncExitStack() as stack:
        mesh = await TracedMesh(stack).start(TelemetrySettings(sampling=0, access_log="sampled"))
        with structlog.testing.capture_logs() as logs:
            assert await mesh.get("/status/200") == 200                   # unsampled, fine: not logged
            assert await mesh.get("/status/404") == 404                   # the app's answer: not logged
            assert await mesh.get("/status/500") == 500                   # failed: logged
            await eventually(lambda: len(requests_logged(logs)) >= 2, "the 5xx lines")
            # A caller-sampled request is logged whatever its status.
            assert await mesh.get("/status/200", {"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"}) == 200
            await eventually(lambda: len(requests_logged(logs)) >= 4, "the sampled lines")
        got = sorted((e["path"], e["direction"], e["sampled"]) for e in requests_logged(logs))
        assert got == [("/status/200", "inbound", True), ("/status/200", "outbound", True),
                       ("/status/500", "inbound", False), ("/status/500", "outbound", False)], got
        assert {e["trace_id"] for e in requests_logged(logs) if e["sampled"]} == {CALLER_TRACE}


def test_access_log_sampled_logs_failures_and_sampled_traces_only(run):
    run(_access_sampled)


async def _access_off():
    async with AsyncExitStack() as stack:
        mesh = await TracedMesh(stack).start(TelemetrySettings(sampling=100, access_log="off"))
        with structlog.testing.capture_logs() as logs:
            assert await mesh.get("/status/200") == 200
            assert await mesh.get("/status/500") == 500
            # A barrier: switch to full and make one more request; once it is logged, the earlier ones
            # had their chance.
            mesh.apply(TelemetrySettings(sampling=100, access_log="full"), version=2)
            assert await mesh.get("/status/204") == 204
            await eventually(lambda: len(requests_logged(logs)) >= 2, "the barrier's lines")
        assert {e["path"] for e in requests_logged(logs)} == {"/status/204"}, logs
        assert any(e.get("event") == "telemetry_settings" and e.get("access_log") == "full" for e in logs)


def test_access_log_off_logs_nothing(run):
    run(_access_off)


# ---- d. meshd's receiver (POST /v1/traces on the control listener) ----------------------------------------

def sample_spans(trace_id: str = CALLER_TRACE) -> list[SpanRecord]:
    t0 = 1_700_000_000_000_000_000
    return [
        SpanRecord(trace_id, "a" * 16, None, "GET payments", KIND_CLIENT, t0, t0 + 5_000_000, "frontend",
                   (("http.response.status_code", 200), ("mesh.destination", "payments")),
                   resource=(("service.name", "frontend"),)),
        SpanRecord(trace_id, "b" * 16, "a" * 16, "GET /pay", KIND_SERVER, t0 + 1_000_000, t0 + 4_000_000,
                   "payments", (("http.response.status_code", 200),), resource=(("service.name", "payments"),)),
    ]


class Receiver:
    """meshd's control listener with only the OTLP receiver, served with meshd's own TLS set-up."""

    async def start(self, stack: AsyncExitStack, tmp_path) -> "Receiver":
        store = Store(str(tmp_path / "state.db"))
        stack.callback(store.close)
        self.pki = Pki(str(tmp_path), "mesh.local", store)
        self.pki.control_tls.ensure(["127.0.0.1"])
        self.traces = TraceStore()
        app = web.Application(client_max_size=MAX_BODY)
        add_receiver(app, self.traces, "mesh.local")
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=self.pki.control_tls.front)
        await site.start()
        stack.push_async_callback(runner.cleanup)
        self.url = f"https://127.0.0.1:{runner.addresses[0][1]}/v1/traces"
        self.agent = await make_agent(self.pki.ca, ORDERS)
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        stack.push_async_callback(self.session.close)
        return self

    def bare_context(self) -> ssl.SSLContext:
        """Trusts meshd, presents no certificate."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cadata=self.pki.ca.bundle_pem.decode())
        return ctx

    async def post(self, body: bytes, ctx: ssl.SSLContext | None = None,
                   content_type: str = "application/json") -> tuple[int, dict]:
        ctx = ctx if ctx is not None else self.agent.control_ssl_context()
        async with self.session.post(self.url, data=body, headers={"Content-Type": content_type}, ssl=ctx) as r:
            if r.content_type != "application/json":
                return r.status, {"text": await r.text()}
            return r.status, await r.json()


async def _receiver_accepts_members(tmp_path):
    async with AsyncExitStack() as stack:
        rx = await Receiver().start(stack, tmp_path)
        body = json.dumps(encode_otlp(sample_spans())).encode()
        # The sidecar's own exporter client (sidecar.otel.post_json) with the workload's control context.
        status = await asyncio.to_thread(post_json, rx.url, body, rx.agent.control_ssl_context())
        assert status == 200
        assert rx.traces.spans(CALLER_TRACE) == sample_spans()
        assert rx.traces.spans(CALLER_TRACE.upper()) == sample_spans()
        assert rx.traces.received == 2
        status, answer = await rx.post(json.dumps(encode_otlp(sample_spans("c" * 32))).encode())
        assert (status, answer) == (200, {})
        assert set(rx.traces.traces) == {CALLER_TRACE, "c" * 32}


def test_meshd_receiver_stores_spans_from_mesh_members(run, tmp_path):
    run(_receiver_accepts_members, tmp_path)


async def _receiver_refusals(tmp_path):
    async with AsyncExitStack() as stack:
        rx = await Receiver().start(stack, tmp_path)
        good = json.dumps(encode_otlp(sample_spans())).encode()
        status, answer = await rx.post(good, ctx=rx.bare_context())
        assert status == 401 and "certificate" in answer["error"]
        status, answer = await rx.post(b"\x0a\x00", content_type="application/x-protobuf")
        assert status == 415 and "application/x-protobuf" in answer["error"] and "JSON" in answer["error"]
        status, answer = await rx.post(b"{not json")
        assert status == 400 and answer["error"].startswith("OTLP body:")
        bad = encode_otlp(sample_spans())
        bad["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["traceId"] = "xyz"
        status, answer = await rx.post(json.dumps(bad).encode())
        assert status == 400
        assert "resourceSpans[0].scopeSpans[0].spans[0].traceId" in answer["error"], answer
        bad = encode_otlp(sample_spans())
        bad["resourceSpans"][1]["scopeSpans"][0]["spans"][0]["startTimeUnixNano"] = "soon"   # the 2nd service's
        status, answer = await rx.post(json.dumps(bad).encode())
        assert status == 400, answer
        assert "resourceSpans[1].scopeSpans[0].spans[0].startTimeUnixNano" in answer["error"], answer
        assert rx.traces.traces == {} and rx.traces.received == 0       # nothing half-stored
        # The sidecar's exporter sees a refusal as a status, not an exception.
        status = await asyncio.to_thread(post_json, rx.url, good, rx.bare_context())
        assert status == 401


def test_meshd_receiver_refuses_non_members_other_encodings_and_bad_bodies(run, tmp_path):
    run(_receiver_refusals, tmp_path)


async def _receiver_bad_resource(tmp_path):
    async with AsyncExitStack() as stack:
        rx = await Receiver().start(stack, tmp_path)
        body = encode_otlp(sample_spans())
        body["resourceSpans"][0]["resource"] = ["service.name"]
        status, answer = await rx.post(json.dumps(body).encode())
        assert status == 400 and "resourceSpans[0].resource" in answer.get("error", ""), (status, answer)


def test_meshd_receiver_answers_400_for_a_non_object_resource(run, tmp_path):
    run(_receiver_bad_resource, tmp_path)


# ---- d. meshd's trace and settings API (admin) -------------------------------------------------------------

class Admin:
    """add_routes on a plain admin app, with a counting publish()."""

    async def start(self, stack: AsyncExitStack, tmp_path) -> "Admin":
        self.db = Store(str(tmp_path / "admin.db"))
        stack.callback(self.db.close)
        self.traces = TraceStore()
        self.book = SettingsBook(self.db, TelemetrySettings())
        self.published = 0
        app = web.Application()
        add_routes(app, self.traces, self.book, self.publish)
        port = await serve_on_loopback(app, stack)
        self.base = f"http://127.0.0.1:{port}"
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        stack.push_async_callback(self.session.close)
        return self

    async def publish(self) -> int:
        self.published += 1
        return 41 + self.published

    async def call(self, method: str, path: str, body=None, raw: bytes | None = None) -> tuple[int, dict]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        async with self.session.request(method, self.base + path, data=data,
                                        headers={"Content-Type": "application/json"}) as r:
            return r.status, await r.json(content_type=None)


def stored_trace(trace_id: str, t0: int, service: str = "orders", error: bool = False) -> list[SpanRecord]:
    """gateway -> orders (server) -> orders calls payments (client) -> payments (server), plus an orphan."""
    def s(span_id, parent, start, dur, name, kind, svc, err=False):
        return SpanRecord(trace_id, span_id, parent, name, kind, t0 + start, t0 + start + dur, svc,
                          (("http.response.status_code", 503 if err else 200), ("mesh.destination", svc)),
                          error=err)
    return [
        s("3" * 16, "2" * 16, 2_000_000, 3_000_000, "GET payments", KIND_CLIENT, service, error),
        s("1" * 16, None, 0, 10_000_000, "GET orders", KIND_CLIENT, "gateway"),
        s("4" * 16, "3" * 16, 2_500_000, 2_000_000, "GET /pay", KIND_SERVER, "payments", error),
        s("2" * 16, "1" * 16, 1_000_000, 8_000_000, "GET /orders/1", KIND_SERVER, service),
        s("5" * 16, "9" * 16, 20_000_000, 1_000_000, "late", KIND_SERVER, "audit"),   # parent not received
    ]


async def _trace_api(tmp_path):
    async with AsyncExitStack() as stack:
        admin = await Admin().start(stack, tmp_path)
        t0 = 1_700_000_000_000_000_000
        first, second = "a" * 32, "b" * 32
        admin.traces.add(stored_trace(first, t0, error=True))
        admin.traces.add(stored_trace(second, t0 + 10**9, service="catalog"))
        status, data = await admin.call("GET", "/v1/traces")
        assert status == 200 and data["stored"] == 2 and data["received"] == 10
        assert [t["trace_id"] for t in data["traces"]] == [second, first]          # newest first
        summary = data["traces"][1]
        assert summary["root"] == "gateway: GET orders" and summary["spans"] == 5 and summary["errors"] == 2
        assert summary["services"] == ["audit", "gateway", "orders", "payments"]
        assert summary["duration_ms"] == 21.0 and summary["start"] == t0 / 1e9
        status, data = await admin.call("GET", "/v1/traces?errors=1")
        assert [t["trace_id"] for t in data["traces"]] == [first]
        status, data = await admin.call("GET", "/v1/traces?service=catalog")
        assert [t["trace_id"] for t in data["traces"]] == [second]
        status, data = await admin.call("GET", "/v1/traces?limit=1")
        assert [t["trace_id"] for t in data["traces"]] == [second]
        status, data = await admin.call("GET", "/v1/traces?limit=many")
        assert status == 400 and "limit" in data["error"]

        status, data = await admin.call("GET", f"/v1/traces/{first.upper()}")
        assert status == 200 and data["trace"]["trace_id"] == first
        rows = [(s["depth"], s["span_id"][0], s["kind"], s["orphan"]) for s in data["spans"]]
        assert rows == [(0, "1", "CLIENT", False), (1, "2", "SERVER", False), (2, "3", "CLIENT", False),
                        (3, "4", "SERVER", False), (0, "5", "SERVER", True)]
        pay = data["spans"][3]
        assert pay["service"] == "payments" and pay["parent_id"] == "3" * 16 and pay["error"] is True
        assert pay["duration_ms"] == 2.0 and pay["attributes"]["http.response.status_code"] == 503
        status, data = await admin.call("GET", f"/v1/traces/{'c' * 32}")
        assert status == 404 and "c" * 32 in data["error"]


def test_meshd_trace_api_lists_and_shows_traces_in_tree_order(run, tmp_path):
    run(_trace_api, tmp_path)


async def _settings_api(tmp_path):
    async with AsyncExitStack() as stack:
        admin = await Admin().start(stack, tmp_path)
        status, data = await admin.call("GET", "/v1/telemetry/settings")
        assert status == 200
        assert data["settings"] == data["defaults"] == {"sampling": 1.0, "otlp_endpoint": None,
                                                        "access_log": "errors"}
        status, data = await admin.call("PUT", "/v1/telemetry/settings",
                                        {"sampling": "25%", "otlp_endpoint": "http://jaeger:4318"})
        assert status == 200 and data["version"] == 42 and admin.published == 1
        assert data["settings"] == {"sampling": 25.0, "otlp_endpoint": "http://jaeger:4318/v1/traces",
                                    "access_log": "errors"}
        assert admin.book.settings == TelemetrySettings(25.0, "http://jaeger:4318/v1/traces", "errors")
        # Persisted: a restarted meshd (a new book on the same store) starts from them.
        assert SettingsBook(admin.db, TelemetrySettings()).settings == admin.book.settings
        for body, named in (({"sampling": 150}, "sampling"), ({"sampling": "lots"}, "sampling"),
                            ({"access_log": "loud"}, "access log"), ({"otlp_endpoint": "jaeger"}, "otlp endpoint"),
                            ({"sampling": 5, "color": 1}, "color"), ([1, 2], "telemetry")):
            status, data = await admin.call("PUT", "/v1/telemetry/settings", body)
            assert status == 400 and named in data["error"], (body, data)
        status, data = await admin.call("PUT", "/v1/telemetry/settings", raw=b"sampling=5")
        assert status == 400 and "JSON" in data["error"]
        assert admin.published == 1                                       # nothing pushed
        assert admin.book.settings.sampling == 25.0                       # nothing changed
        assert SettingsBook(admin.db, TelemetrySettings()).settings.sampling == 25.0   # nothing stored
        status, data = await admin.call("PUT", "/v1/telemetry/settings", {"otlp_endpoint": None, "access_log": "off"})
        assert status == 200 and data["version"] == 43 and admin.published == 2
        assert data["settings"] == {"sampling": 25.0, "otlp_endpoint": None, "access_log": "off"}


def test_meshd_settings_api_validates_before_storing_and_publishing(run, tmp_path):
    run(_settings_api, tmp_path)


# ---- the span exporter: a bounded queue on the event loop, batches posted by its thread -------------------

class Posts:
    """Stands in for post_json: each body, decoded, with the thread that posted it."""

    def __init__(self, status: int = 200):
        self.status = status
        self.calls: list[tuple[str, str, dict]] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, url, body, context, timeout=5.0):
        self.gate.wait(10)
        self.calls.append((threading.current_thread().name, url, json.loads(body)))
        return self.status


def finish_sampled(tracing, status):
    tracing.finish(TraceContext(1, status, None, True), direction="outbound", method=b"GET", target=b"/x",
                   status=status, flags="-", ms=1.0, source="a", source_version="v1", destination="b",
                   destination_version="v1", upstream=None, attempts=1, no_flags="-")


def wait_until(check, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


@pytest.fixture
def posts(monkeypatch):
    import sidecar.otel
    fake = Posts()
    monkeypatch.setattr(sidecar.otel, "post_json", fake)
    yield fake
    fake.gate.set()


def exported_statuses(posts, calls=None):
    return [int(span["attributes"][2]["value"]["intValue"]) for _t, _u, body in (posts.calls if calls is None else calls)
            for rs in body["resourceSpans"] for ss in rs["scopeSpans"] for span in ss["spans"]]


def test_sampled_spans_are_posted_in_batches_by_the_exporter_thread(posts):
    """Nothing is made until a sampled span comes; then spans queue on the caller's thread and one
    thread posts them as OTLP JSON, in order, to every target, counted per target."""
    registry = Registry()
    tracing = Tracing("a", "v1", node="a-1", registry=registry)
    tracing.collector = ("http://meshd.invalid/v1/traces", None)
    assert tracing._exporter is None
    for status in (200, 201, 202):
        finish_sampled(tracing, status)
    wait_until(lambda: posts.calls)
    thread, url, body = posts.calls[0]
    assert thread == "span-export" and url == "http://meshd.invalid/v1/traces"
    assert exported_statuses(posts) == [200, 201, 202]
    resource = {a["key"]: a["value"]["stringValue"] for a in body["resourceSpans"][0]["resource"]["attributes"]}
    assert resource == {"service.name": "a", "service.version": "v1", "service.instance.id": "a-1"}
    span = body["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    assert span["traceId"] == "%032x" % 1 and span["spanId"] == "%016x" % 200 and span["kind"] == KIND_CLIENT
    assert registry.get_sample_value("mesh_trace_spans_total", {"target": "meshd", "result": "exported"}) == 3
    tracing.close()
    assert not tracing._exporter._thread.is_alive()


def test_a_full_batch_leaves_at_once_and_close_flushes_the_rest(posts):
    tracing = Tracing("a", "v1")
    tracing.collector = ("http://meshd.invalid/v1/traces", None)
    tracing._exporter = tracing.make_exporter(delay_s=60.0, max_batch=2)   # only a full batch wakes it
    for status in (200, 201, 202):
        finish_sampled(tracing, status)
    wait_until(lambda: posts.calls)     # woken by the full batch, not by the 60 s delay
    assert exported_statuses(posts, posts.calls[:1]) == [200, 201]
    tracing.close()                     # the third goes out by close at the latest
    assert exported_statuses(posts) == [200, 201, 202] and len(posts.calls) == 2


def test_spans_beyond_a_full_queue_and_after_close_are_counted_as_dropped(posts):
    registry = Registry()
    tracing = Tracing("a", "v1", registry=registry)
    tracing.collector = ("http://meshd.invalid/v1/traces", None)
    posts.gate.clear()                  # the first batch's POST hangs: the queue fills behind it
    tracing._exporter = tracing.make_exporter(delay_s=0.01, max_queue=2)
    finish_sampled(tracing, 200)
    wait_until(lambda: not tracing._exporter.queue)   # taken by the thread, which now waits on the POST
    for status in (201, 202, 203):      # the third finds the queue full
        finish_sampled(tracing, status)
    dropped = {"target": "queue", "result": "dropped"}
    assert registry.get_sample_value("mesh_trace_spans_total", dropped) == 1
    posts.gate.set()
    tracing.close()
    finish_sampled(tracing, 204)        # after close: dropped, nothing restarts
    assert registry.get_sample_value("mesh_trace_spans_total", dropped) == 2
    assert exported_statuses(posts) == [200, 201, 202]


def test_without_a_target_batches_are_dropped_unencoded(posts, monkeypatch):
    import sidecar.otel
    monkeypatch.setattr(sidecar.otel.OtlpJsonWriter, "body", lambda *a, **k: pytest.fail("encoded with no target"))
    registry = Registry()
    tracing = Tracing("a", "v1", registry=registry)
    finish_sampled(tracing, 200)
    tracing.close()
    assert posts.calls == [] and not tracing._exporter.queue
    assert registry.get_sample_value("mesh_trace_spans_total", {"target": "queue", "result": "dropped"}) in (None, 0)


def test_flush_beside_the_exporter_thread_loses_and_repeats_nothing(posts):
    """flush() may run on another thread while the exporter's own drains the queue (close, a bench):
    every span is exported once, none raises."""
    tracing = Tracing("a", "v1")
    tracing.collector = ("http://meshd.invalid/v1/traces", None)
    tracing._exporter = exporter = tracing.make_exporter(delay_s=0.0001, max_batch=64)
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)          # threads trade the GIL between any two bytecodes, nearly
    try:
        for round_ in range(40):
            for i in range(100):
                finish_sampled(tracing, 200 + (round_ * 100 + i) % 300)
            exporter.flush()
    finally:
        sys.setswitchinterval(switch)
    tracing.close()
    assert sorted(exported_statuses(posts)) == sorted(200 + n % 300 for n in range(4000))
