"""Per-request tracing and access logs of one node (sidecar or gateway).

Every HTTP request gets a trace context (meshcore.tracecontext: W3C `traceparent`, B3 understood and
forwarded). Sampled hops are queued for sidecar.otel's SpanExporter, whose thread posts them in
batches as OTLP/HTTP JSON to meshd's trace store (mTLS, the control address) and to the external
collector named in the snapshot's telemetry settings. The exporter is made by the first sampled
span, so a node that samples nothing does not carry it.
"""

from __future__ import annotations

import json
import random
import ssl
import time
from typing import Any, Callable
from urllib.parse import urlsplit

import structlog

from meshcore.metrics import Counter
from meshcore.spans import KIND_CLIENT, KIND_SERVER
from meshcore.telemetry_settings import ACCESS_FULL, TelemetrySettings, should_log_access
from meshcore.tracecontext import (
    TRACEPARENT, Parent, TraceContext, continue_traceparent, decode_parent, start_hop, trace_fields,
)
from meshproc.runtime import RECURRING, EventLine, json_str

log = structlog.get_logger("sidecar.tracing")
access = structlog.get_logger("access")

# The access log line, written past structlog's processor chain (a line per request under
# access_log=full); the same fields as `access.info("request", ...)`, in this order.
ACCESS_LINE = EventLine("request", (
    ("direction", RECURRING), ("method", RECURRING), ("path", "%s"), ("status", RECURRING), ("flags", RECURRING),
    ("duration_ms", "%s"), ("source", RECURRING), ("source_version", RECURRING), ("destination", RECURRING),
    ("destination_version", RECURRING), ("upstream", RECURRING), ("attempts", RECURRING),
    ("trace_id", '"%s"'), ("span_id", '"%s"'), ("sampled", RECURRING)))   # ids: hex the node made

_SHORTEST_BELOW = 1e15   # "%.3f" then trailing zeros off is float repr's text of the rounded value below this


def duration_text(ms: float) -> str:
    """json.dumps(round(ms, 3)): the duration as the structlog line writes it, without round's and
    repr's two conversions (both are correctly rounded, so the digits agree)."""
    if not 0.0 <= ms < _SHORTEST_BELOW:
        return json.dumps(round(ms, 3))   # a negative, huge or non-finite value: as the chain writes it
    text = ("%.3f" % ms).rstrip("0")
    return text + "0" if text[-1] == "." else text


OTLP_PATH = "/v1/traces"       # OTLP/HTTP 1.0 default path for traces


def collector_url(control_url: str) -> str:
    """meshd's OTLP/HTTP receiver beside its control channel (`wss://h:p/...` -> `https://h:p/v1/traces`)."""
    parts = urlsplit(control_url)
    scheme = "https" if parts.scheme in ("wss", "https") else "http"
    return f"{scheme}://{parts.netloc}{OTLP_PATH}"


class Tracing:
    """Trace decisions, spans and access logs for the requests of one node."""

    def __init__(self, service: str, version: str, node: str = "", registry: Any = None,
                 rand: Callable[[], float] = random.random, bits: Callable[[int], int] = random.getrandbits):
        self.service = service
        self.version = version
        self.node = node
        self.settings = TelemetrySettings()
        self.rate = self.settings.rate
        self.access_mode = self.settings.access_log
        self.rand = rand
        self.bits = bits
        # meshd's receiver: (URL, TLS client context factory or None); set by the node's CLI.
        self.collector: tuple[str, Callable[[], ssl.SSLContext] | None] | None = None
        self._exporter = None       # sidecar.otel.SpanExporter: made by the first sampled span
        self._closed = False
        self.counts = _SpanCounters(registry)

    # -- settings (from each snapshot)

    def configure(self, settings: TelemetrySettings) -> None:
        """Apply the snapshot's telemetry settings; the exporter reads the endpoints at each export."""
        if settings == self.settings:
            return
        self.settings = settings
        self.rate = settings.rate
        self.access_mode = settings.access_log
        log.info("telemetry_settings", sampling=settings.sampling, otlp_endpoint=settings.otlp_endpoint,
                 access_log=settings.access_log)

    def targets(self) -> list[tuple[str, str, Callable[[], ssl.SSLContext] | None]]:
        """Where spans go now: (label, URL, TLS context factory)."""
        out = []
        if self.collector is not None:
            out.append(("meshd", self.collector[0], self.collector[1]))
        if self.settings.otlp_endpoint:
            out.append(("external", self.settings.otlp_endpoint, None))
        return out

    # -- per request

    def begin_hop(self, traceparent: bytes | None, b3: dict | None) -> tuple[TraceContext, tuple]:
        """This hop's trace context and the header fields, (name, value) pairs, that carry it onward."""
        if traceparent is not None and b3 is None:
            fast = continue_traceparent(traceparent, self.bits(64))
            if fast is not None:
                return fast[0], ((TRACEPARENT, fast[1]),)
        ctx = self.begin(traceparent, b3)
        return ctx, trace_fields(ctx)

    def begin(self, traceparent: bytes | None, b3: dict | None) -> TraceContext:
        """This hop's trace context for a request carrying these headers."""
        parent: Parent | None = decode_parent(traceparent, b3) if (traceparent is not None or b3) else None
        bits = self.bits
        return start_hop(parent, self.rate, self.rand(), bits(128), bits(64))

    def finish(self, ctx: TraceContext, direction: str, method: bytes, target: bytes, status: int,
               flags: str, ms: float, source: str, source_version: str,
               destination: str, destination_version: str, upstream: str | None, attempts: int,
               no_flags: str) -> None:
        """The request ended: its span when sampled, its access log line when the mode says so."""
        sampled = ctx.sampled
        mode = self.access_mode
        log_it = mode == ACCESS_FULL or should_log_access(mode, sampled, status, flags, no_flags)
        if not (sampled or log_it):
            return
        end_ns = time.time_ns()
        path = target.split(b"?", 1)[0].decode("latin-1")
        method_text = method.decode("latin-1")
        if sampled:
            self._record(ctx, direction, method_text, path, status, flags, end_ns - int(ms * 1e6), end_ns,
                         source, source_version, destination, destination_version, upstream, attempts, no_flags)
        if log_it:
            if ACCESS_LINE.write(
                    (direction, method_text, status, flags, source, source_version, destination,
                     destination_version, upstream, attempts, sampled),
                    (json_str(path), duration_text(ms), ctx.trace_hex, "%016x" % ctx.span_id), end_ns):
                return
            access.info("request", direction=direction, method=method_text, path=path,
                        status=status, flags=flags, duration_ms=round(ms, 3), source=source,
                        source_version=source_version, destination=destination,
                        destination_version=destination_version, upstream=upstream, attempts=attempts,
                        trace_id=ctx.trace_hex, span_id="%016x" % ctx.span_id, sampled=sampled)

    # -- spans (sidecar.otel: queued, batched, posted as OTLP/HTTP JSON)

    def _record(self, ctx: TraceContext, direction: str, method: str, path: str, status: int, flags: str,
                start_ns: int, end_ns: int, source: str, source_version: str, destination: str,
                destination_version: str, upstream: str | None, attempts: int, no_flags: str) -> None:
        attrs = {
            "http.request.method": method, "url.path": path, "http.response.status_code": status,
            "mesh.direction": direction, "mesh.response_flags": flags,
            "mesh.source": source, "mesh.source_version": source_version,
            "mesh.destination": destination, "mesh.destination_version": destination_version,
            "mesh.node": self.node,
        }
        if upstream:
            attrs["server.address"] = upstream
        if attempts > 1:
            attrs["mesh.attempts"] = attempts
        name = f"{method} {destination}" if direction != "inbound" else f"{method} {path}"
        kind = KIND_CLIENT if direction == "outbound" else KIND_SERVER
        error = status >= 500 or status == 0 or flags != no_flags
        exporter = self._exporter
        if exporter is None:
            if self._closed:
                self.counts.dropped.inc()
                return
            exporter = self._exporter = self.make_exporter()
        if not exporter.record((ctx, name, kind, attrs, start_ns, end_ns, error)):
            self.counts.dropped.inc()

    def make_exporter(self, **options: Any):
        """A sidecar.otel.SpanExporter of this node's spans, to its current targets, counted in its
        counters (`options`: SpanExporter's queue and batch settings)."""
        # made by the first sampled span: nodes that sample none do not load sidecar.otel
        from sidecar.otel import SpanExporter, node_resource
        return SpanExporter(node_resource(self.service, self.version, self.node), self.targets,
                            self.counts.add, **options)

    def close(self) -> None:
        """Flush what is queued (bounded by the export timeout) and stop the exporter thread."""
        self._closed = True
        exporter = self._exporter
        if exporter is not None:
            exporter.close()


class _SpanCounters:
    """mesh_trace_spans_total{target,result}: what the exporter did with the spans (`add` runs on the
    exporter's thread; `dropped`, spans refused by a full or closed queue, on the event loop: each
    series has one writer)."""

    def __init__(self, registry: Any):
        self.counter = Counter("mesh_trace_spans", "Spans exported by this node, by target and result",
                               ["target", "result"], registry=registry)
        self.dropped = self.counter.labels("queue", "dropped")

    def add(self, target: str, ok: bool, n: int) -> None:
        self.counter.labels(target, "exported" if ok else "failed").inc(n)
