"""meshctl trace / traces / tracing against a fake meshd admin API that serves meshd's own trace routes
(meshd.traces.add_routes over a TraceStore and a SettingsBook), in a thread, on loopback."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import urllib.request

import pytest
from aiohttp import web
from typer.testing import CliRunner

from meshcore.spans import KIND_CLIENT, KIND_SERVER, SpanRecord
from meshcore.telemetry_settings import TelemetrySettings
from meshctl.cli import app
from meshd.store import Store
from meshd.traces import SettingsBook, TraceStore, add_routes

WIDE = {"COLUMNS": "200", "MESHD_API": "", "MESHD_ADMIN_TOKEN": "test-token"}
T0 = 1_700_000_000_000_000_000
FIRST = "a1" * 16          # the older trace: gateway -> orders -> payments (503), plus a late orphan
SECOND = "b2" * 16         # the newer one: gateway -> catalog


def run(*args: str):
    return CliRunner().invoke(app, list(args), env=WIDE)


def s(trace: str, span_id: str, parent: str | None, start_ms: float, dur_ms: float, name: str, kind: int,
      service: str, status: int = 200, flags: str = "-") -> SpanRecord:
    start = T0 + int(start_ms * 1e6)
    return SpanRecord(trace, span_id * 16, parent * 16 if parent else None, name, kind, start,
                      start + int(dur_ms * 1e6), service,
                      (("http.response.status_code", status), ("mesh.response_flags", flags)),
                      error=status >= 500)


def first_trace() -> list[SpanRecord]:
    return [
        s(FIRST, "3", "2", 2, 3, "GET payments", KIND_CLIENT, "orders", 503, "URX"),
        s(FIRST, "1", None, 0, 10, "GET orders", KIND_CLIENT, "gateway"),
        s(FIRST, "4", "3", 2.5, 2, "GET /pay", KIND_SERVER, "payments", 503),
        s(FIRST, "2", "1", 1, 8, "GET /orders/1", KIND_SERVER, "orders"),
        s(FIRST, "5", "9", 12, 1, "POST /audit", KIND_SERVER, "audit"),
    ]


def second_trace() -> list[SpanRecord]:
    return [s(SECOND, "6", None, 1000, 4, "GET catalog", KIND_CLIENT, "gateway"),
            s(SECOND, "7", "6", 1001, 2, "GET /catalog", KIND_SERVER, "catalog")]


class FakeMeshd:
    """meshd's trace and settings routes, a /v1/status whose nodes ACK every published version."""

    def __init__(self, tmp_path):
        self.db = Store(str(tmp_path / "state.db"))
        self.traces = TraceStore()
        self.book = SettingsBook(self.db, TelemetrySettings())
        self.version = 0
        self.tokens: set[str] = set()

    async def publish(self) -> int:
        self.version += 1
        return self.version

    async def status(self, request: web.Request) -> web.Response:
        nodes = [{"node": n, "kind": "sidecar", "service": n, "connected": True, "acked_version": self.version,
                  "nacked_version": None, "nack_reason": None} for n in ("orders-mesh", "payments-mesh")]
        return web.json_response({"meshd": {"version": "t", "uptime_s": 1, "snapshot_version": self.version},
                                  "nodes": nodes, "label_errors": [], "sidecars": []})

    @web.middleware
    async def note_token(self, request: web.Request, handler):
        self.tokens.add(request.headers.get("Authorization", ""))
        return await handler(request)

    def start(self) -> str:
        application = web.Application(middlewares=[self.note_token])
        add_routes(application, self.traces, self.book, self.publish)
        application.router.add_get("/v1/status", self.status)
        self.loop = asyncio.new_event_loop()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.runner = web.AppRunner(application, access_log=None)
        self.loop.run_until_complete(self.runner.setup())
        self.loop.run_until_complete(web.SockSite(self.runner, sock).start())
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        return self.url

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(timeout=5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()
        self.db.close()

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=5) as r:
            return json.loads(r.read())


@pytest.fixture
def meshd(tmp_path):
    fake = FakeMeshd(tmp_path)
    fake.traces.add(first_trace())
    fake.traces.add(second_trace())
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture
def empty_meshd(tmp_path):
    fake = FakeMeshd(tmp_path)
    fake.start()
    yield fake
    fake.stop()


# ---- meshctl traces ------------------------------------------------------------------------------------

def test_traces_table_newest_first(meshd):
    result = run("traces", "--api", meshd.url)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "traces (2 of 2 stored)" in out
    assert out.index(SECOND) < out.index(FIRST)                       # newest first
    # Not a terminal: a header line, then a row per line, columns apart by 3 spaces or more.
    lines = out.splitlines()
    assert re.split(r" {3,}", lines[1]) == ["TIME", "TRACE ID", "ROOT", "SPANS", "DURATION", "ERRORS"]
    rows = {cells[1]: cells for cells in (re.split(r" {3,}", line) for line in lines[2:])}
    assert re.fullmatch(r"\d\d:\d\d:\d\d", rows[FIRST][0])
    assert rows[FIRST][2:] == ["gateway: GET orders", "5", "13 ms", "2"]     # root, spans, 0..13 ms, errors
    assert rows[SECOND][2:] == ["gateway: GET catalog", "2", "4.0 ms", "0"]
    assert meshd.tokens == {"Bearer test-token"}                      # the admin token is sent


@pytest.mark.parametrize("args, expected", [
    (["--service", "catalog"], [SECOND]),
    (["--service", "payments"], [FIRST]),
    (["--errors"], [FIRST]),
    (["--limit", "1"], [SECOND]),
    (["--service", "nobody"], []),
])
def test_traces_filters_reach_meshd(meshd, args, expected):
    result = run("traces", "--api", meshd.url, "--json", *args)
    assert result.exit_code == 0, result.output
    assert [t["trace_id"] for t in json.loads(result.output)["traces"]] == expected


def test_traces_json_is_the_api_answer(meshd):
    result = run("traces", "--api", meshd.url, "--json")
    assert result.exit_code == 0, result.output
    got = json.loads(result.output)
    want = meshd.get("/v1/traces?limit=20")
    got.pop("at"), want.pop("at")
    assert got == want


def test_traces_empty_store_says_how_to_get_some(empty_meshd):
    result = run("traces", "--api", empty_meshd.url)
    assert result.exit_code == 0, result.output
    assert "no traces stored yet" in result.output and "meshctl tracing --sampling" in result.output


# ---- meshctl trace ID ----------------------------------------------------------------------------------

def column_of(out: str, text: str) -> tuple[int, int]:
    """(line number, column) of the first line containing `text`."""
    for n, line in enumerate(out.splitlines()):
        if text in line:
            return n, line.index(text)
    raise AssertionError(f"{text!r} not in\n{out}")


@pytest.mark.parametrize("given", [FIRST, FIRST.upper(), f"00-{FIRST}-{'3' * 16}-01", f"  {FIRST} "])
def test_trace_tree_shows_spans_in_order_with_depth(meshd, given):
    result = run("trace", given, "--api", meshd.url)
    assert result.exit_code == 0, result.output
    out = result.output
    assert f"trace {FIRST}  5 spans  13 ms  services: audit, gateway, orders, payments" in out
    lines = [column_of(out, text) for text in
             ("gateway client GET orders", "orders server GET /orders/1", "orders client GET payments",
              "payments server GET /pay", "audit server POST /audit")]
    assert [n for n, _ in lines] == sorted(n for n, _ in lines)        # depth-first order
    depths = [col for _, col in lines]
    assert depths[0] < depths[1] < depths[2] < depths[3]               # each a level deeper
    assert depths[4] == depths[0]                                      # the orphan is a root
    orphan_line = out.splitlines()[lines[4][0]]
    assert "(parent span not received)" in orphan_line
    assert out.count("(parent span not received)") == 1
    payments_line = out.splitlines()[lines[2][0]]
    assert "503" in payments_line and "URX" in payments_line            # status and response flags
    assert "+2.0 ms" in payments_line and "3.0 ms" in payments_line     # offset and duration


def test_trace_json_is_the_api_answer(meshd):
    result = run("trace", FIRST, "--api", meshd.url, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data == meshd.get(f"/v1/traces/{FIRST}")
    assert [(sp["depth"], sp["span_id"][0]) for sp in data["spans"]] == [(0, "1"), (1, "2"), (2, "3"), (3, "4"),
                                                                          (0, "5")]


@pytest.mark.parametrize("bad", ["xyz", FIRST[:-1], FIRST + "0", "g" * 32, f"01-{FIRST}-{'3' * 16}-01", ""])
def test_trace_bad_id_is_a_usage_error_naming_trace_id(meshd, bad):
    result = run("trace", bad, "--api", meshd.url)
    assert result.exit_code == 2, result.output
    assert "TRACE_ID" in result.output and "not a trace id (32 hex digits)" in result.output
    assert meshd.tokens == set()                                        # meshd was not asked


def test_trace_unknown_id_prints_meshds_explanation(meshd):
    result = run("trace", "c" * 32, "--api", meshd.url)
    assert result.exit_code == 1
    assert f"no trace '{'c' * 32}' in meshd's store" in result.output


# ---- meshctl tracing -----------------------------------------------------------------------------------

def test_tracing_shows_the_settings(meshd):
    result = run("tracing", "--api", meshd.url)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == ["sampling: 1%", "otlp endpoint: none (meshd store only)",
                                          "access log: errors"]
    assert meshd.version == 0                                           # showing publishes nothing


def test_tracing_changes_are_stored_pushed_and_acked(meshd):
    result = run("tracing", "--api", meshd.url, "--sampling", "12.5%", "--endpoint", "http://jaeger:4318",
                 "--access-log", "full")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[:3] == ["sampling: 12.5%", "otlp endpoint: http://jaeger:4318/v1/traces", "access log: full"]
    assert re.match(r"snapshot version 1 ACKed by 2/2 connected nodes in \d+ ms", lines[3]), lines
    assert meshd.book.settings == TelemetrySettings(12.5, "http://jaeger:4318/v1/traces", "full")
    # One setting at a time keeps the others; an empty endpoint turns the external collector off.
    result = run("tracing", "--api", meshd.url, "--endpoint", "")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[:3] == ["sampling: 12.5%", "otlp endpoint: none (meshd store only)",
                                              "access log: full"]
    assert meshd.version == 2


@pytest.mark.parametrize("args, named", [
    (["--sampling", "150"], "sampling"),
    (["--sampling", "lots"], "sampling"),
    (["--access-log", "loud"], "access log"),
    (["--endpoint", "jaeger:4318"], "otlp endpoint"),
])
def test_tracing_bad_values_are_refused_by_meshd_and_nothing_changes(meshd, args, named):
    result = run("tracing", "--api", meshd.url, *args)
    assert result.exit_code == 1, result.output
    assert f"error: {named}: " in result.output
    assert meshd.version == 0 and meshd.book.settings == TelemetrySettings()
