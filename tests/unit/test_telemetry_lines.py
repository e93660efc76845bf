"""The telemetry a node writes per request, written past the general-purpose encoders: the access log
line (meshproc.runtime.EventLine, sidecar.tracing.ACCESS_LINE) against what structlog's processor
chain of configure_logging makes of the same request, and the OTLP/HTTP JSON body of queued spans
(meshcore.otlp.OtlpJsonWriter, as sidecar.otel's exporter feeds it) against json.dumps(encode_otlp(...)).
Byte for byte (the timestamps aside, whose clocks differ), odd characters included. Table-driven."""

from __future__ import annotations

import contextvars
import dataclasses
import datetime
import enum
import io
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import structlog

import meshcore.otlp
from meshcore.otlp import OtlpJsonWriter, decode_otlp, encode_otlp
from meshcore.spans import KIND_CLIENT, KIND_SERVER, SpanRecord
from meshcore.telemetry_settings import ACCESS_FULL, TelemetrySettings
from meshcore.tracecontext import TraceContext, continue_traceparent
from meshproc import runtime
from meshproc.runtime import RECURRING
from sidecar.otel import SCOPE, span_records
from sidecar.tracing import ACCESS_LINE, Tracing

ROOT = Path(__file__).resolve().parents[2]
ODD = ['qu"ote', "back\\slash", "new\nline\r\ttab", "\x00\x1f\x7f\x80", "é ü 中 😀", "%s %d %% %(x)s",
       "</script>", ""]
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CANONICAL = f"00-{TRACE}-00f067aa0ba902b7-01".encode()


class Status(enum.IntEnum):
    OK = 200


# ---- OTLP JSON: OtlpJsonWriter == json.dumps(encode_otlp(...)) ------------------------------------------

def record(span_id: int, parent: int | None = None, *, name: str = "GET /x", kind: int = KIND_SERVER,
           attributes=(), error: bool = False, resource=(("service.name", "payments"),)) -> SpanRecord:
    service = dict(resource).get("service.name", "unknown")
    return SpanRecord(trace_id=TRACE, span_id="%016x" % span_id,
                      parent_id="%016x" % parent if parent is not None else None, name=name, kind=kind,
                      start_ns=1_700_000_000_000_000_000 + span_id, end_ns=1_700_000_000_000_500_000 + span_id,
                      service=service, attributes=tuple(attributes), error=error, resource=resource)


def written(records: list[SpanRecord], resource, scope: str = "test") -> bytes:
    """The records as queued hops, through OtlpJsonWriter."""
    writer = OtlpJsonWriter(resource, dict(resource).get("service.name", "unknown"), scope)
    return writer.body((TraceContext(int(r.trace_id, 16), int(r.span_id, 16),
                                     int(r.parent_id, 16) if r.parent_id else None, True),
                        r.name, r.kind, dict(r.attributes), r.start_ns, r.end_ns, r.error) for r in records)


ODD_RESOURCE = (("service.instance.id", 'n"1\n'), ("service.name", "pay%sments"), ("service.version", "v1"))


@pytest.mark.parametrize("records, resource", [
    ([], (("service.name", "payments"),)),
    ([record(1)], (("service.name", "payments"),)),
    ([record(1, name=n, kind=KIND_CLIENT) for n in ODD], ODD_RESOURCE),
    ([record(2, 1, error=True, attributes=[
        ("http.request.method", "GET"), ("url.path", "/a\"b\n%s"), ("http.response.status_code", 503),
        ("big", 2 ** 62), ("negative", -7), ("yes", True), ("no", False), ("ratio", 0.25), ("nan", float("nan")),
        ("inf", float("-inf")), ("status", Status.OK), ("none", None), *((f"odd.{i}", v) for i, v in enumerate(ODD)),
        ('odd "key"\n', "v")])], ODD_RESOURCE),
    # one key with 1, True, 1.0 and "1" in turn: each span keeps its own type (True == 1 == 1.0)
    ([record(i, attributes=[("k", v)]) for i, v in enumerate((1, True, 1.0, "1", 1, False, 0, True), 1)],
     (("service.name", "payments"),)),
    ([record(1)], (("service.version", "v1"),)),          # no service.name: encode_otlp's "unknown"
])
def test_otlp_writer_writes_what_json_dumps_of_encode_otlp_writes(records, resource):
    service = dict(resource).get("service.name", "unknown")
    records = [dataclasses.replace(r, resource=resource, service=service) for r in records]
    expected = json.dumps(encode_otlp(records, scope="test")).encode() if records else \
        json.dumps({"resourceSpans": []}).encode()
    assert written(records, resource) == expected
    assert written(records, resource) == expected    # the second time from its caches


def test_otlp_writer_stays_exact_when_its_cache_fills(monkeypatch):
    monkeypatch.setattr(meshcore.otlp, "_MAX_CACHED", 3)
    records = [record(i, attributes=[("url.path", f"/items/{i % 5}"), ("n", i % 4)]) for i in range(1, 40)]
    resource = (("service.name", "payments"),)
    assert written(records, resource) == json.dumps(encode_otlp(records, scope="test")).encode()


def queued_spans(requests: list[dict]) -> tuple[list, tuple]:
    """Spans queued by Tracing.finish for `requests` (new traces, a canonical traceparent's, B3's)."""
    tracing = Tracing("frontend", "v1", node='n-"1"')
    tracing.configure(TelemetrySettings(sampling=100.0, access_log="off"))
    exporter = tracing._exporter = tracing.make_exporter(delay_s=3600.0, max_batch=4096)
    contexts = [tracing.begin(None, None), continue_traceparent(CANONICAL, 0xABC)[0],
                tracing.begin(None, {b"b3": b"80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"}),
                TraceContext(0x1234, 0x5678, 0x9ABC, True)]
    for i, req in enumerate(requests):
        tracing.finish(contexts[i % len(contexts)], no_flags="-", **req)
    batch = list(exporter.queue)
    exporter.queue.clear()
    tracing.close()
    return batch, exporter


def request(**changes) -> dict:
    base = dict(direction="outbound", method=b"GET", target=b"/", status=200, flags="-", ms=1.22,
                source="frontend", source_version="v1", destination="payments", destination_version="v1",
                upstream="127.0.0.1:15006", attempts=1)
    return {**base, **changes}


ODD_REQUESTS = [
    request(),
    request(direction="inbound", target=b"/a%22b/\"q\"/\\/\n/\r/\t/\x00/\x7f/\xe9\xff?token=secret", status=503,
            flags="UF,URX", attempts=3, upstream=None),
    request(method=b'GE"T\n', source_version='v1"\n{"evil": 1}', destination_version="%s%d", ms=0.0),
    request(status=0, flags="DC", ms=123456.789012, source="unknown", destination="a\u2028b"),
]


def test_export_body_is_the_old_encoding_of_the_queued_spans():
    """What SpanExporter.export posts for spans Tracing queued, against the conversion and encoding
    it replaced."""
    batch, exporter = queued_spans(ODD_REQUESTS * 3)
    body = exporter.writer.body(batch)
    assert body == json.dumps(encode_otlp(span_records(batch, exporter.resource), scope=SCOPE)).encode()
    assert decode_otlp(json.loads(body)) == span_records(batch, exporter.resource)   # what meshd stores
    assert b"secret" not in body


# ---- the access log line: ACCESS_LINE == structlog's chain of configure_logging ----------------------------

STAMP = re.compile(r'"timestamp": "([^"]*)"')
CONTEXTS = [
    {"process": "sidecar", "node": "frontend-1", "service": "frontend"},       # what `sidecar run` binds
    {"process": "gateway"},
    {},
    {"process": 'si"de\ncar %s', "attempt_no": 3, "tags": ["a", "b"]},        # values not str: no cache
]
CONTEXTS_FOR = [(c, r) for c in CONTEXTS for r in ODD_REQUESTS]
TRACES = [TraceContext(0x4BF92F3577B34DA6A3CE929D0E0E4736, 0xF067AA0BA902B7, None, False),
          continue_traceparent(CANONICAL, 0xABC)[0]]


def both_lines(req: dict, context: dict, ctx: TraceContext, level: int = logging.INFO) -> tuple[str, str]:
    """(the line ACCESS_LINE writes, the line structlog's chain writes for the event the structlog path
    logs) for one finished request, in a context with `context` bound."""
    tracing = Tracing("frontend", "v1")
    tracing.access_mode = ACCESS_FULL
    out = io.StringIO()
    render = structlog.processors.JSONRenderer()

    def run() -> tuple[str, str]:
        structlog.contextvars.bind_contextvars(**context)
        runtime._lines = runtime.LogLines(out, level, render)
        tracing.finish(ctx, no_flags="-", **req)                # past the chain
        runtime._lines = None
        with structlog.testing.capture_logs() as events:
            tracing.finish(ctx, no_flags="-", **req)            # through structlog: the event it logs
        (event,) = events
        assert event.pop("log_level") == "info"
        chained = event
        for process in runtime.log_processors(render):
            chained = process(None, "info", chained)
        return out.getvalue(), chained + "\n"

    saved = runtime._lines
    try:
        return contextvars.copy_context().run(run)
    finally:
        runtime._lines = saved


def masked(line: str) -> str:
    return STAMP.sub('"timestamp": "-"', line)


@pytest.mark.parametrize("context, req", CONTEXTS_FOR)
@pytest.mark.parametrize("ctx", TRACES, ids=["new", "continued"])
def test_access_line_is_the_chains_line_byte_for_byte(context, req, ctx):
    fast, chained = both_lines(req, context, ctx)
    assert masked(fast) == masked(chained)
    assert fast.count("\n") == 1 and fast.endswith("}\n")          # one line, whatever the request held
    ours, theirs = json.loads(fast), json.loads(chained)
    assert ours.keys() == theirs.keys() and list(ours)[-2:] == ["level", "timestamp"]
    stamps = [datetime.datetime.fromisoformat(x["timestamp"].replace("Z", "+00:00")) for x in (ours, theirs)]
    assert abs(stamps[0] - stamps[1]) < datetime.timedelta(seconds=1)
    assert "secret" not in fast and "authorization" not in fast.lower()


def test_access_line_made_twice_in_one_context_is_the_same():
    """The second line comes from the format remembered for the first."""
    first, _ = both_lines(ODD_REQUESTS[1], CONTEXTS[0], TRACES[0])
    again, _ = both_lines(ODD_REQUESTS[1], CONTEXTS[0], TRACES[0])
    assert masked(first) == masked(again)


def test_context_values_equal_but_written_apart_are_each_written_as_theirs():
    """1 == True == 1.0: contexts that compare equal do not share a line's format unless their values
    are str or None."""
    for value in (1, True, 1.0, "1", None):
        fast, chained = both_lines(request(), {"process": "sidecar", "n": value}, TRACES[0])
        assert masked(fast) == masked(chained)
        assert json.loads(fast)["n"] == value and type(json.loads(fast)["n"]) is type(value)


def test_access_line_below_the_level_is_dropped_like_the_chains():
    fast, _ = both_lines(request(), CONTEXTS[0], TRACES[0], level=logging.WARNING)
    assert fast == ""


@pytest.mark.parametrize("context", [{"path": "/x"}, {"event": "e"}, {"level": "x"}, {"timestamp": 1},
                                     {"exc_info": True}])
def test_a_context_key_the_chain_would_merge_differently_sends_the_line_through_structlog(context):
    out = io.StringIO()

    def run() -> bool:
        structlog.contextvars.bind_contextvars(**context)
        runtime._lines = runtime.LogLines(out, logging.INFO, structlog.processors.JSONRenderer())
        return ACCESS_LINE.write(("outbound", "GET", 200, "-", "a", "v1", "b", "v1", None, 1, False),
                                 ('"/"', "1.0", TRACE, "%016x" % 1), 1_700_000_000_000_000_000)

    saved = runtime._lines
    try:
        assert contextvars.copy_context().run(run) is False
    finally:
        runtime._lines = saved
    assert out.getvalue() == ""


def test_without_configure_logging_the_line_goes_through_structlog():
    tracing = Tracing("frontend", "v1")
    tracing.access_mode = ACCESS_FULL
    assert runtime._lines is None
    with structlog.testing.capture_logs() as events:
        tracing.finish(TRACES[0], no_flags="-", **request())
    assert [e["event"] for e in events] == ["request"]


@pytest.mark.parametrize("ns", [0, 999, 1_000, 1_700_000_000_000_000_000, 1_700_000_000_000_001_000,
                                1_700_000_000_999_999_999, 1_700_000_001_000_000_000, 4_102_444_800_123_456_000])
def test_timestamp_is_timestampers_iso_utc_text(ns):
    lines = runtime.LogLines(io.StringIO(), logging.INFO, structlog.processors.JSONRenderer())
    micros = ns // 1000
    instant = datetime.datetime.fromtimestamp(micros // 10**6, datetime.timezone.utc).replace(
        microsecond=micros % 10**6)
    expected = instant.isoformat().replace("+00:00", "Z")        # TimeStamper(fmt="iso", utc=True)
    assert lines.timestamp(ns) == expected
    assert lines.timestamp(ns + 5_000_000_000) != expected        # the next seconds are not the cached one


@pytest.mark.parametrize("event, fields, recurring, values, own", [
    ("e%v\"", (("k%s\"\n", "%s"), ("r%", RECURRING), ("é", "%s")), ("x%s\u2028", ), ("5", '"y"'),
     {"k%s\"\n": 5, "r%": "x%s\u2028", "é": "y"}),
    ("plain", (("a", RECURRING), ("b", RECURRING)), (None, ""), (), {"a": None, "b": ""}),
])
def test_any_event_line_is_the_chains_line(event, fields, recurring, values, own):
    """EventLine beyond the access log: odd keys, events and recurring values, `%` among them."""
    out = io.StringIO()
    render = structlog.processors.JSONRenderer()
    line = runtime.EventLine(event, fields)

    def run() -> str:
        structlog.contextvars.bind_contextvars(process="p%s")
        runtime._lines = runtime.LogLines(out, logging.INFO, render)
        assert line.write(recurring, values, 1_700_000_000_123_456_000) is True
        chained = {**own, "event": event}
        for process in runtime.log_processors(render):
            chained = process(None, "info", chained)
        return chained + "\n"

    saved = runtime._lines
    try:
        chained = contextvars.copy_context().run(run)
    finally:
        runtime._lines = saved
    assert masked(out.getvalue()) == masked(chained)
    assert json.loads(out.getvalue())["timestamp"] == "2023-11-14T22:13:20.123456Z"


@pytest.mark.parametrize("ns, stamp", [(1_700_000_000_000_000_000, "2023-11-14T22:13:20Z"),
                                       (1_700_000_000_000_000_999, "2023-11-14T22:13:20Z"),
                                       (1_700_000_000_000_001_000, "2023-11-14T22:13:20.000001Z")])
def test_access_line_at_a_whole_second_leaves_out_the_microseconds(ns, stamp):
    out = io.StringIO()

    def run() -> bool:
        runtime._lines = runtime.LogLines(out, logging.INFO, structlog.processors.JSONRenderer())
        return ACCESS_LINE.write(("outbound", "GET", 200, "-", "a", "v1", "b", "v1", None, 1, False),
                                 ('"/%s"', "1.0", TRACE, "%016x" % 1), ns)

    saved = runtime._lines
    try:
        assert contextvars.copy_context().run(run) is True
    finally:
        runtime._lines = saved
    line = json.loads(out.getvalue())
    assert line["timestamp"] == stamp and line["path"] == "/%s" and line["upstream"] is None


# ---- in a node: configure_logging, stderr, MESH_LOG_LEVEL ----------------------------------------------------

NODE = """
import sys
from meshproc.runtime import configure_logging, structlog
import meshproc.runtime
configure_logging("sidecar")
structlog.contextvars.bind_contextvars(node="frontend-1", service="frontend")   # as sidecar.cli does
from meshcore.telemetry_settings import TelemetrySettings
from meshcore.tracecontext import TraceContext
from sidecar.tracing import Tracing
t = Tracing("frontend", "v1")
t.configure(TelemetrySettings(sampling=0, access_log="full"))
ctx = TraceContext(0x4BF92F3577B34DA6A3CE929D0E0E4736, 0xF067AA0BA902B7, None, False)
req = dict(direction="inbound", method=b"GET", target=b'/a"b\\n?token=secret', status=503, flags="UF", ms=2.5,
           source="frontend", source_version='v1"x', destination="payments", destination_version="v1",
           upstream=None, attempts=2, no_flags="-")
t.finish(ctx, **req)
meshproc.runtime._lines = None        # the same request through structlog's chain
t.finish(ctx, **req)
"""


@pytest.mark.parametrize("level, lines", [("info", 2), ("warning", 0)])
def test_a_node_writes_the_chains_line_on_stderr_at_its_level(level, lines):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MESH_LOG_LEVEL": level}
    proc = subprocess.run([sys.executable, "-c", NODE], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    requests = [ln for ln in proc.stderr.splitlines(keepends=True) if '"event": "request"' in ln]
    assert len(requests) == lines, proc.stderr
    if lines:
        fast, chained = requests
        assert masked(fast) == masked(chained)
        assert json.loads(fast)["node"] == "frontend-1" and "secret" not in fast


NODE_ON_A_LOOP = NODE.replace("""t.finish(ctx, **req)
meshproc.runtime._lines = None        # the same request through structlog's chain
t.finish(ctx, **req)
""", """import asyncio
async def main():
    t.finish(ctx, **req)              # held: the loop's flush is 0.1 s away
    t.finish(ctx, **req)
asyncio.run(main())                   # ends before the flush: the exit writes them
""")


def test_a_node_on_a_loop_writes_its_held_lines_at_exit():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MESH_LOG_LEVEL": "info"}
    proc = subprocess.run([sys.executable, "-c", NODE_ON_A_LOOP], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    requests = [json.loads(ln) for ln in proc.stderr.splitlines() if '"event": "request"' in ln]
    assert [r["status"] for r in requests] == [503, 503]


# ---- held lines: on an event loop, written together ------------------------------------------------------

def held_lines_run(body) -> str:
    """Run `body(lines, out)` (a coroutine function) on an event loop with a LogLines writing to `out`
    installed, then flush it as the process's exit does; what reached `out`."""
    import asyncio

    out = io.StringIO()
    saved = runtime._lines
    runtime._lines = lines = runtime.LogLines(out, logging.INFO, structlog.processors.JSONRenderer())
    try:
        asyncio.run(body(lines, out))
        runtime._flush_at_exit()
    finally:
        runtime._lines = saved
    return out.getvalue()


def test_on_a_loop_lines_are_held_then_written_in_one_write_by_the_flush():
    import asyncio

    async def body(lines, out):
        writes = []
        real = lines.out.msg
        lines.out.msg = lambda text: (writes.append(text), real(text))
        for i in range(3):
            lines.add(f"line {i}")
        assert out.getvalue() == ""                       # held: nothing written yet
        deadline = asyncio.get_running_loop().time() + 5.0
        while not out.getvalue() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        assert writes == ["line 0\nline 1\nline 2"]      # one write, oldest first

    assert held_lines_run(body) == "line 0\nline 1\nline 2\n"


def test_on_a_busy_loop_the_lines_go_out_every_max_held():
    async def body(lines, out):
        for i in range(runtime.MAX_HELD * 2 + 1):
            lines.add(str(i))
        assert out.getvalue().splitlines() == [str(i) for i in range(runtime.MAX_HELD * 2)]
        assert lines.held == [str(runtime.MAX_HELD * 2)]

    written_out = held_lines_run(body)
    assert written_out.splitlines()[-1] == str(runtime.MAX_HELD * 2)    # the exit's flush


def test_an_event_through_the_chain_comes_after_the_lines_held_before_it():
    render = structlog.processors.JSONRenderer()

    async def body(lines, out):
        lines.add("held 1")
        lines.add("held 2")
        event = {"event": "upstream reset"}
        for process in runtime.log_processors(render):   # the chain runs its steps, then prints
            event = process(None, "warning", event)
        out.write(event + "\n")
        assert lines.held == []

    written_out = held_lines_run(body)
    assert written_out.splitlines()[:2] == ["held 1", "held 2"]
    assert json.loads(written_out.splitlines()[2])["event"] == "upstream reset"


def test_on_a_loop_only_the_first_held_line_asks_asyncio_for_the_loop(monkeypatch):
    """asyncio's running-loop lookup makes a getpid() system call: once per flush, not per line."""
    asked = []
    real = runtime._get_running_loop
    monkeypatch.setattr(runtime, "_get_running_loop", lambda: asked.append(1) or real())

    async def body(lines, out):
        for i in range(10):
            lines.add(str(i))
        assert len(asked) == 1 and lines.held == [str(i) for i in range(10)]

    assert held_lines_run(body).splitlines() == [str(i) for i in range(10)]


def test_a_line_of_another_thread_is_written_at_once_while_a_loop_holds_lines():
    import threading

    async def body(lines, out):
        lines.add("held on the loop")
        thread = threading.Thread(target=lines.add, args=("from a thread",))
        thread.start()
        thread.join()
        assert out.getvalue() == "held on the loop\nfrom a thread\n" and lines.held == []

    held_lines_run(body)


def test_lines_a_finished_loop_left_held_go_out_with_the_next_line():
    import asyncio

    out = io.StringIO()
    saved = runtime._lines
    runtime._lines = lines = runtime.LogLines(out, logging.INFO, structlog.processors.JSONRenderer())

    async def hold():
        lines.add("from the first loop")

    async def second():
        lines.add("from the second loop")     # a new loop: it gets its own flush
        deadline = asyncio.get_running_loop().time() + 5.0
        while lines.held and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)

    try:
        asyncio.run(hold())
        assert out.getvalue() == "" and lines.held == ["from the first loop"]
        asyncio.run(second())
        assert out.getvalue() == "from the first loop\nfrom the second loop\n"
        asyncio.run(hold())
        lines.add("off any loop")             # no loop: written at once, with what was held
        assert out.getvalue().splitlines()[2:] == ["from the first loop", "off any loop"]
    finally:
        runtime._lines = saved


# ---- the duration's text: json.dumps(round(ms, 3)) without either conversion --------------------------------

@pytest.mark.parametrize("ms", [0.0, 1e-4, 0.0005, 0.0015, 0.0625, 1.2345, 2.5, 999.9995, 123456.7, 5e-324,
                                1e14 + 0.5, 1e15, 1e16, -1.5, float("inf"), float("nan"), 3.0004999999999997])
def test_duration_text_is_the_chains_number(ms):
    from sidecar.tracing import duration_text
    assert duration_text(ms) == json.dumps(round(ms, 3))


def test_duration_text_agrees_on_random_durations():
    import random

    from sidecar.tracing import duration_text
    rng = random.Random(7)
    for _ in range(20_000):
        ms = rng.random() * 10 ** rng.randint(-5, 9)
        assert duration_text(ms) == json.dumps(round(ms, 3)), ms


@pytest.mark.parametrize("text", ["%d", '"%s%s"', "plain"])
def test_an_event_line_field_without_one_place_for_its_value_is_refused(text):
    with pytest.raises(ValueError, match=r"field 'k'"):
        runtime.EventLine("e", (("a", RECURRING), ("k", text)))
