"""Hot-path micro-benchmark: the CPU one request spends in metrics and tracing, in-process.

    python -m bench.hotpath [--quick] [--json]

No sockets, no event loop: the product's own objects called the way sidecar/proxy.py calls them
once per request (`_Downstream._dispatch`: begin_trace; `_finish_metrics`: count_request, and
Tracing.finish when the request is sampled or access-logged).

Each piece is timed as CPU time of the calling thread (time.thread_time: user + kernel, so the
access log's write system call counts), `number` calls per repeat, the median of the repeats, minus
the same loop calling an empty function. A sampled span also costs its export (sidecar/otel.py:
SpanExporter's thread takes the queued spans in batches, which with a target are converted and
JSON-encoded); that part is the process's CPU (time.process_time, every thread, the queue
flushed at the end of each repeat) minus the calling thread's. The spans are sent nowhere:
Tracing.collector is None (meshd's receiver is set only by `sidecar run`) and the settings name no
OTLP endpoint, so Tracing.targets() is empty (checked). The access log is structlog configured as
the product does (meshproc.runtime.configure_logging: JSON lines on stderr), stderr being /dev/null.

Run by `python -m bench` in a fresh interpreter (it configures structlog and logging globally).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from itertools import repeat
from typing import Callable

SPAN_BATCH = 2000   # sampled spans per repeat: below the exporter queue's 2048, so none is dropped

# The realistic request: wrk's `GET /` through frontend's outbound sidecar to payments' inbound.
SOURCE, DEST, VERSION = "frontend", "payments", "v1"
UPSTREAM = "127.0.0.1:15006"
MS = 1.22                                                                    # c32's median latency
TRACEPARENT = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"   # unsampled (the 99%)
TRACEPARENT_SAMPLED = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

# key -> (title, the sidecar that runs it for each request of the pair)
PIECES = {
    "metrics_source": ("metrics: sidecar.proxy.count_request, reporter=source, a known series", "outbound"),
    "metrics_destination": ("metrics: sidecar.proxy.count_request, reporter=destination, a known series",
                            "inbound"),
    "trace_new": ("trace context: sidecar.proxy.begin_trace, no traceparent (starts the trace)", "outbound"),
    "trace_parent": ("trace context: sidecar.proxy.begin_trace, with a canonical traceparent", "inbound"),
    "span_outbound": ("sampled span: Tracing.finish, client span of a new trace (access log off)", "outbound"),
    "span_inbound": ("sampled span: Tracing.finish, server span with a remote parent (access log off)",
                     "inbound"),
    "access_log": ("access log line: Tracing.finish, access_log=full, unsampled (no span)", "both"),
    "span_encode": ("export with a target: a queued span OTLP JSON-encoded, per span "
                    "(meshcore.otlp.OtlpJsonWriter.body, batches of 512, the exporter's thread)", "both"),
}


def _loop_cost(fn: Callable[[], object], number: int) -> tuple[float, float]:
    """(thread CPU s, process CPU s) of `number` calls."""
    p0, t0 = time.process_time(), time.thread_time()
    for _ in repeat(None, number):
        fn()
    t1 = time.thread_time()
    return t1 - t0, time.process_time() - p0


def _noop() -> None:
    return None


def measure(fn: Callable[[], object], number: int, repeats: int,
            settle: Callable[[], object] | None = None) -> dict:
    """Median microseconds per call over `repeats` runs of `number` calls, net of an empty call.
    `settle` (inside the process-CPU window, outside the thread's) finishes deferred work."""
    fn()  # warm: first-use imports, caches, the series of the label tuple
    if settle is not None:
        settle()
    base = statistics.median(_loop_cost(_noop, number)[0] for _ in range(3)) / number
    thread, process = [], []
    for _ in range(repeats):
        p0 = time.process_time()
        t, _p = _loop_cost(fn, number)
        if settle is not None:
            settle()
        p = time.process_time() - p0
        thread.append((t / number - base) * 1e6)
        process.append((p / number - base) * 1e6)
    out = {"us": round(statistics.median(thread), 3), "number": number, "repeats": repeats,
           "spread_us": [round(min(thread), 3), round(max(thread), 3)],
           "empty_call_us": round(base * 1e6, 3)}
    if settle is not None:
        out["us_all_threads"] = round(statistics.median(process), 3)
        out["us_other_threads"] = round(max(0.0, out["us_all_threads"] - out["us"]), 3)
    return out


def _calls(fn: Callable[[], object], seconds: float) -> int:
    """How many calls take about `seconds` (at least 100)."""
    t0 = time.perf_counter()
    n = 0
    while n < 200 or time.perf_counter() - t0 < 0.02:
        fn()
        n += 1
    per = (time.perf_counter() - t0) / n
    return max(100, int(seconds / per))


def run_hotpath(quick: bool = False, seconds: float | None = None, repeats: int | None = None) -> dict:
    """Measure every piece; `seconds` per repeat, `repeats` per piece (quick: 0.05 s x 5)."""
    seconds = seconds if seconds is not None else (0.05 if quick else 0.2)
    repeats = repeats if repeats is not None else (5 if quick else 9)
    started = time.monotonic()

    # structlog as `sidecar run` configures it, its stream (stderr) being /dev/null.
    devnull = open(os.devnull, "w")
    real_stderr = sys.stderr
    sys.stderr = devnull
    try:
        from meshproc.runtime import configure_logging
        configure_logging("sidecar")
    finally:
        sys.stderr = real_stderr

    from meshcore.telemetry_settings import ACCESS_FULL, ACCESS_OFF, TelemetrySettings
    from sidecar.telemetry import NO_FLAGS, REPORTER_DESTINATION, REPORTER_SOURCE, Telemetry
    from sidecar.proxy import begin_trace, count_request
    from sidecar.tracing import Tracing

    res: dict = {"pieces": {}, "quick": quick, "seconds_per_repeat": seconds, "repeats": repeats,
                 "span_batch": SPAN_BATCH}
    tel = Telemetry()

    def metrics(reporter: str) -> Callable[[], None]:
        # what _Downstream._finish_metrics calls; the first call (not timed) makes the series
        return lambda: count_request(tel, reporter, SOURCE, VERSION, DEST, VERSION, 200, NO_FLAGS, MS)

    def context(tracing: Tracing, tp: bytes | None) -> Callable[[], tuple]:
        # what _Downstream._dispatch calls: the context and its header lines
        return lambda: begin_trace(tracing, tp, None)

    def finish(tracing: Tracing, ctx, direction: str) -> Callable[[], None]:
        fin = tracing.finish
        # as the metrics layer calls it: positionally
        return lambda: fin(ctx, direction, b"GET", b"/", 200, NO_FLAGS, MS, SOURCE, VERSION, DEST, VERSION, UPSTREAM,
                           1, NO_FLAGS)

    default = Tracing(DEST, VERSION, node="bench-hotpath")           # sampling 1%, access log sampled
    spans = Tracing(SOURCE, VERSION, node="bench-hotpath")
    spans.configure(TelemetrySettings(sampling=100.0, access_log=ACCESS_OFF))
    logs = Tracing(SOURCE, VERSION, node="bench-hotpath")
    logs.configure(TelemetrySettings(sampling=0.0, access_log=ACCESS_FULL))

    out_ctx = spans.begin(None, None)
    in_ctx = spans.begin(TRACEPARENT_SAMPLED, None)
    quiet_ctx = logs.begin(None, None)
    assert out_ctx.sampled and in_ctx.sampled and in_ctx.parent_id is not None and not quiet_ctx.sampled
    res["span_targets"] = [t[1] for t in spans.targets()]
    if res["span_targets"]:
        raise RuntimeError(f"spans would be exported to {res['span_targets']}: the benchmark must not send")

    def flush() -> None:
        exporter = spans._exporter  # noqa: SLF001 - made by the first sampled span
        if exporter is not None:
            exporter.flush()

    plan: list[tuple[str, Callable[[], object], Callable[[], object] | None]] = [
        ("metrics_source", metrics(REPORTER_SOURCE), None),
        ("metrics_destination", metrics(REPORTER_DESTINATION), None),
        ("trace_new", context(default, None), None),
        ("trace_parent", context(default, TRACEPARENT), None),
        ("access_log", finish(logs, quiet_ctx, "outbound"), None),
        ("span_outbound", finish(spans, out_ctx, "outbound"), flush),
        ("span_inbound", finish(spans, in_ctx, "inbound"), flush),
    ]
    async def on_a_loop() -> None:
        # as in a node, the calls run on an event loop: the access log holds its lines there and
        # writes them together (at 64 lines here, in the timed calls, as the loop is never idle)
        for key, fn, settle in plan:
            fn()  # first use: the span exporter for spans, the cached logger for logs
            number = min(SPAN_BATCH, _calls(fn, seconds)) if settle is not None else _calls(fn, seconds)
            reps = repeats * 2 if settle is not None else repeats  # smaller batches, more of them
            r = measure(fn, number, reps, settle)
            r["title"], r["sidecar"] = PIECES[key]
            res["pieces"][key] = r

    asyncio.run(on_a_loop())
    res["pieces"]["span_encode"] = _encode_cost(spans, out_ctx, in_ctx, finish, seconds, repeats)
    res["access_log_line_bytes"] = _line_bytes(devnull, finish(logs, quiet_ctx, "outbound"))
    res["exporter_made"] = spans._exporter is not None  # noqa: SLF001
    res["seconds"] = round(time.monotonic() - started, 1)
    spans.close()
    return res


def _encode_cost(spans, out_ctx, in_ctx, finish, seconds: float, repeats: int) -> dict:
    """What SpanExporter.export does to a batch before posting it (skipped in the data path here,
    which has no target), per span: half client spans of new traces, half server spans."""
    from sidecar.otel import MAX_BATCH
    from sidecar.tracing import Tracing

    probe = Tracing(spans.service, spans.version, node=spans.node)
    probe.configure(spans.settings)
    out_fin, in_fin = finish(probe, out_ctx, "outbound"), finish(probe, in_ctx, "inbound")
    exporter = probe._exporter = probe.make_exporter(delay_s=3600.0, max_batch=MAX_BATCH + 1)  # noqa: SLF001
    for i in range(MAX_BATCH):
        (out_fin if i % 2 == 0 else in_fin)()
    batch = list(exporter.queue)
    exporter.queue.clear()
    probe.close()
    encode = lambda: exporter.writer.body(batch)  # noqa: E731
    r = measure(encode, _calls(encode, seconds), repeats)
    per = len(batch)
    r = {**r, "us": round(r["us"] / per, 3), "spread_us": [round(x / per, 3) for x in r["spread_us"]],
         "spans_per_call": per, "body_bytes_per_span": round(len(encode()) / per, 1)}
    r["title"], r["sidecar"] = PIECES["span_encode"]
    return r


def _line_bytes(stream, fn: Callable[[], object]) -> int:
    """The size of one access log line: the log's file descriptor briefly pointed at a temp file."""
    stream.flush()
    fd = stream.fileno()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), fd)
        try:
            fn()
            stream.flush()
        finally:
            os.dup2(saved, fd)
            os.close(saved)
        tmp.seek(0)
        return len(tmp.read())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.hotpath", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="shorter repeats (a harness check)")
    p.add_argument("--seconds", type=float, help="seconds per repeat (default 0.2; quick 0.05)")
    p.add_argument("--repeats", type=int, help="repeats per piece (default 9; quick 5); spans twice as many")
    p.add_argument("--json", action="store_true", help="print one JSON object (what `python -m bench` reads)")
    args = p.parse_args(argv)
    res = run_hotpath(args.quick, args.seconds, args.repeats)
    if args.json:
        print("HOTPATHJSON " + json.dumps(res, sort_keys=True))
        return
    for key, r in res["pieces"].items():
        extra = f" + {r['us_other_threads']:.2f} us in the exporter thread" if "us_other_threads" in r else ""
        print(f"{r['us']:7.2f} us{extra}  {r['title']} [{r['sidecar']}]")
    print(f"access log line: {res['access_log_line_bytes']} bytes; {res['seconds']} s")


if __name__ == "__main__":
    main(sys.argv[1:])
