"""Distributed tracing end to end: one request through gateway -> orders -> payments / inventory in
real Docker gives one trace whose spans chain parent to child, in meshd's store (`meshctl trace`) and
at an external OTLP/HTTP endpoint set by `meshctl tracing`; every sidecar logs the request as a JSON
access log line carrying the trace id.

The external endpoint is a collector this test runs on the host (bound to the shop network's
gateway address, where the containers reach the host). It decodes each body with
opentelemetry-proto's own schema (`google.protobuf.json_format`, unknown fields refused; ids
converted from OTLP's hex to protobuf's base64), so what the sidecars send is checked against the
OTLP schema, not against our own decoder."""

from __future__ import annotations

import base64
import json
import os
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from .conftest import ADMIN, GATEWAY, PROJECT, docker_ps, get_json, http, run, wait_for

pytestmark = pytest.mark.e2e


def meshctl(*args: str, check: bool = True):
    return run(["meshctl", *args], check=check, env={**os.environ, "COLUMNS": "250"})


class Collector:
    """An OTLP/HTTP JSON collector on the host: every span it received, as decoded by opentelemetry-proto."""

    def __init__(self, host: str):
        from google.protobuf import json_format
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        spans: list[dict] = []
        errors: list[str] = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    assert self.path == "/v1/traces", self.path
                    assert self.headers.get("Content-Type") == "application/json"
                    msg = json_format.ParseDict(otlp_ids_as_base64(json.loads(body)), ExportTraceServiceRequest())
                    for rs in msg.resource_spans:
                        service = next(a.value.string_value for a in rs.resource.attributes
                                       if a.key == "service.name")
                        for ss in rs.scope_spans:
                            for s in ss.spans:
                                spans.append({"trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(),
                                              "parent_id": s.parent_span_id.hex() or None, "name": s.name,
                                              "kind": s.kind, "service": service})
                    code = 200
                except Exception as exc:  # noqa: BLE001 - reported by the test
                    errors.append(f"{type(exc).__name__}: {exc}")
                    code = 400
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args):
                return

        self.spans = spans
        self.errors = errors
        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.url = f"http://{host}:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def shop_gateway_ip() -> str:
    out = run(["docker", "network", "inspect", f"{PROJECT}_default", "--format",
               "{{range .IPAM.Config}}{{.Gateway}}{{end}}"]).stdout.strip()
    assert out, "the shop network has no gateway address"
    return out


def otlp_ids_as_base64(body: dict) -> dict:
    """OTLP/HTTP JSON writes trace and span ids as hex (OTLP 1.0, "JSON Protobuf Encoding"), where
    protobuf's own JSON mapping expects base64 for bytes: convert, checking the hex form on the way."""
    for rs in body.get("resourceSpans", []):
        for ss in rs.get("scopeSpans", []):
            for span in ss.get("spans", []):
                for key, width in (("traceId", 32), ("spanId", 16), ("parentSpanId", 16)):
                    value = span.get(key)
                    if key == "parentSpanId" and not value:
                        continue
                    assert isinstance(value, str) and len(value) == width and value == value.lower(), (key, value)
                    span[key] = base64.b64encode(bytes.fromhex(value)).decode()
    return body


def container_of(service: str) -> str:
    return docker_ps(f"label=com.docker.compose.project={PROJECT}",
                     f"label=com.docker.compose.service={service}")[0]["Names"]


def echo_from(container: str, url: str, headers: dict) -> dict:
    """GET `url` from inside `container` (through its sidecar) and return the JSON it answered."""
    code = ("import sys, json, urllib.request as u\n"
            "req = u.Request(sys.argv[1], headers=json.loads(sys.argv[2]))\n"
            "print(u.urlopen(req, timeout=5).read().decode())")
    return json.loads(run(["docker", "exec", container, "python3", "-c", code, url, json.dumps(headers)]).stdout)


@pytest.fixture
def collector(mesh):
    col = Collector(shop_gateway_ip())
    meshctl("tracing", "--sampling", "100", "--endpoint", col.url, "--access-log", "sampled")
    yield col
    meshctl("tracing", "--sampling", "1", "--endpoint", "", "--access-log", "errors", check=False)
    col.close()


def expected_chain(spans: list[dict]) -> None:
    """gateway -> orders (server) -> orders->payments (client) -> payments (server), and inventory alike."""
    by_id = {s["span_id"]: s for s in spans}

    def one(service: str, kind: str, dest: str | None = None) -> dict:
        found = [s for s in spans if s["service"] == service and s["kind"] == kind
                 and (dest is None or s["attributes"].get("mesh.destination") == dest)]
        assert len(found) == 1, f"{service} {kind} {dest}: {len(found)} spans in {[(s['service'], s['kind'], s['name']) for s in spans]}"
        return found[0]

    gateway = one("gateway", "SERVER")
    orders = one("orders", "SERVER")
    to_payments = one("orders", "CLIENT", "payments")
    payments = one("payments", "SERVER")
    to_inventory = one("orders", "CLIENT", "inventory")
    inventory = one("inventory", "SERVER")
    assert orders["parent_id"] == gateway["span_id"]
    assert to_payments["parent_id"] == orders["span_id"] and payments["parent_id"] == to_payments["span_id"]
    assert to_inventory["parent_id"] == orders["span_id"] and inventory["parent_id"] == to_inventory["span_id"]
    # Children start after their parents (real timings, one host clock; each end is taken after the
    # response is written, so a callee's end may trail its caller's by a scheduling slice).
    for child in (orders, to_payments, payments, to_inventory, inventory):
        parent = by_id[child["parent_id"]]
        assert child["start"] >= parent["start"] - 0.002, (child["name"], parent["name"])
        assert 0 < child["duration_ms"] < 10_000


def test_one_trace_covers_gateway_orders_payments_inventory(collector):
    trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
    status, _, body = http("GET", f"{GATEWAY}/api/orders/7",
                           headers={"traceparent": f"00-{trace_id}-{client_span}-01"}, timeout=10)
    assert status == 200, body
    wanted = {("gateway", "SERVER"), ("orders", "SERVER"), ("orders", "CLIENT"), ("payments", "SERVER"),
              ("inventory", "SERVER"), ("users", "SERVER"), ("notifications", "SERVER")}

    def stored():
        status, _, raw = http("GET", f"{ADMIN}/v1/traces/{trace_id}")
        if status != 200:
            return None
        data = json.loads(raw)
        have = {(s["service"], s["kind"]) for s in data["spans"]}
        return data if wanted <= have and len(data["spans"]) >= 10 else None

    data = wait_for(stored, 20, what="the trace's spans in meshd's store")
    spans = data["spans"]
    assert {s["trace_id"] for s in spans} == {trace_id}
    expected_chain(spans)
    gateway = next(s for s in spans if s["service"] == "gateway")
    assert gateway["parent_id"] == client_span and gateway["depth"] == 0 and gateway["orphan"]
    assert all(not s["error"] for s in spans)

    out = meshctl("trace", trace_id).stdout
    print("\n" + out)
    lines = out.splitlines()
    order = [next(i for i, line in enumerate(lines) if needle in line)
             for needle in ("gateway server", "orders server", "payments server")]
    assert order == sorted(order), "the tree prints parents before children"
    assert "inventory server" in out and "ms" in out

    # The external endpoint received the same spans (checked against the OTLP schema on receipt).
    def external():
        got = {s["span_id"] for s in collector.spans if s["trace_id"] == trace_id}
        return got if got >= {s["span_id"] for s in spans} else None

    got = wait_for(external, 20, what="the same spans at the external OTLP endpoint")
    assert not collector.errors, collector.errors
    assert got == {s["span_id"] for s in spans}
    ext = {s["span_id"]: s for s in collector.spans if s["trace_id"] == trace_id}
    assert all(ext[s["span_id"]]["parent_id"] == s["parent_id"] for s in spans)

    # Every hop logged the request as JSON with the trace id (access log mode "sampled").
    # (a node writes its access lines together, at most 0.1 s after the request: polled)
    def access_lines():
        logs = run(["docker", "logs", container_of("payments") + "-mesh"])
        entries = [json.loads(line) for line in (logs.stdout + logs.stderr).splitlines()
                   if line.startswith("{") and trace_id in line]
        return [e for e in entries if e.get("event") == "request"] or None

    access = wait_for(access_lines, 10, what="payments' sidecar's access line for the trace")
    assert access[0]["status"] == 200 and access[0]["destination"] == "payments"
    assert access[0]["direction"] == "inbound" and access[0]["source"] == "orders"


def test_the_gateway_starts_a_trace_when_the_client_sends_none(collector):
    before = {t["trace_id"] for t in get_json(f"{ADMIN}/v1/traces?limit=500")["traces"]}
    status, _, _ = http("GET", f"{GATEWAY}/api/orders/8", timeout=10)
    assert status == 200

    def new_trace():
        for t in get_json(f"{ADMIN}/v1/traces?limit=50&service=gateway")["traces"]:
            if t["trace_id"] not in before and t["spans"] >= 10:
                return t
        return None

    summary = wait_for(new_trace, 20, what="a new trace rooted at the gateway")
    data = get_json(f"{ADMIN}/v1/traces/{summary['trace_id']}")
    root = data["spans"][0]
    assert root["service"] == "gateway" and root["parent_id"] is None and not root["orphan"]
    expected_chain(data["spans"])
    out = meshctl("traces", "--service", "payments").stdout
    assert summary["trace_id"] in out


def test_sampling_zero_records_nothing_but_still_propagates(mesh):
    meshctl("tracing", "--sampling", "0")
    try:
        trace_id = secrets.token_hex(16)
        # An unsampled caller (flags 00): no span anywhere, whatever the mesh's own rate.
        status, _, _ = http("GET", f"{GATEWAY}/api/orders/9",
                            headers={"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-00"}, timeout=10)
        assert status == 200
        # An app's call through two sidecars keeps the trace id and the decision; the parent span
        # id is the caller sidecar's, not the app's.
        app_span = secrets.token_hex(8)
        seen = echo_from(container_of("orders"), "http://payments:8080/echo",
                         {"traceparent": f"00-{trace_id}-{app_span}-00"})["headers"]
        tp = {k.lower(): v for k, v in seen.items()}["traceparent"].split("-")
        assert tp[1] == trace_id and tp[3] == "00" and tp[2] != app_span
        # B3 alone (multi-header form) is understood: the app sees traceparent and updated x-b3-*.
        b3_trace = secrets.token_hex(16)
        seen = echo_from(container_of("orders"), "http://payments:8080/echo",
                         {"X-B3-TraceId": b3_trace, "X-B3-SpanId": app_span, "X-B3-Sampled": "0"})["headers"]
        seen = {k.lower(): v for k, v in seen.items()}
        assert seen["traceparent"].split("-")[1] == b3_trace and seen["x-b3-traceid"] == b3_trace
        assert seen["x-b3-parentspanid"] != app_span and seen["x-b3-sampled"] == "0"
        time.sleep(2.5)  # a batch interval and more: nothing may arrive for an unsampled trace
        for tid in (trace_id, b3_trace):
            status, _, _ = http("GET", f"{ADMIN}/v1/traces/{tid}")
            assert status == 404, f"unsampled trace {tid} was recorded"
    finally:
        meshctl("tracing", "--sampling", "1")


def test_bad_tracing_settings_are_refused_by_name(mesh):
    before = get_json(f"{ADMIN}/v1/telemetry/settings")["settings"]
    bad = meshctl("tracing", "--sampling", "150", check=False)
    assert bad.returncode != 0 and "sampling" in (bad.stdout + bad.stderr)
    bad = meshctl("tracing", "--endpoint", "jaeger:4318", check=False)
    assert bad.returncode != 0 and "otlp endpoint" in (bad.stdout + bad.stderr)
    bad = meshctl("trace", "not-a-trace-id", check=False)
    assert bad.returncode != 0 and "TRACE_ID" in (bad.stdout + bad.stderr)
    assert get_json(f"{ADMIN}/v1/telemetry/settings")["settings"] == before


def test_dashboard_lists_traces_and_draws_one_in_chromium(collector, tmp_path):
    import urllib.parse

    from playwright.sync_api import sync_playwright

    from meshctl.api import load_admin_token

    from ..adapters.test_dashboard_browser import CHROMIUM_ARGS, _chromium

    trace_id = secrets.token_hex(16)
    assert http("GET", f"{GATEWAY}/api/orders/11", headers={"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"},
                timeout=10)[0] == 200
    wait_for(lambda: http("GET", f"{ADMIN}/v1/traces/{trace_id}")[0] == 200, 20, what="the trace in meshd's store")
    url = f"{ADMIN}/dashboard#token={urllib.parse.quote(load_admin_token() or '')}"
    shot = tmp_path / "traces.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1400})
            page.goto(url)
            row = page.wait_for_selector(f'#traces tr[data-trace="{trace_id}"]', timeout=15_000)
            row.click()
            page.wait_for_selector("#trace .span", timeout=10_000)
            lines = page.eval_on_selector_all("#trace .span", "els => els.map(e => e.textContent)")
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert len(lines) >= 10 and lines[0].startswith("gateway server")
    assert any(line.startswith("payments server") for line in lines)
    assert shot.stat().st_size > 10_000
