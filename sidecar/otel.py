"""OpenTelemetry SDK glue of sidecar.tracing: sampled hops as SDK spans, batched by the SDK and
exported as OTLP/HTTP JSON (no protobuf runtime) to meshd's store and the external collector."""

from __future__ import annotations

import http.client
import json
import ssl
from typing import TYPE_CHECKING, Any, Sequence
from urllib.parse import urlsplit

import structlog
from opentelemetry import trace as api
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from meshcore.tracing import KIND_CLIENT, KIND_SERVER, SpanRecord, TraceContext, encode_otlp

if TYPE_CHECKING:
    from sidecar.tracing import Tracing

log = structlog.get_logger("sidecar.tracing")

EXPORT_TIMEOUT_S = 5.0
BATCH_DELAY_MS = 1000          # a span reaches the store within about a second
MAX_QUEUE = 2048               # spans waiting for export; more are dropped by the SDK, never block
MAX_BATCH = 512
SCOPE = "meshd.sidecar"
_KINDS = {KIND_SERVER: SpanKind.SERVER, KIND_CLIENT: SpanKind.CLIENT}
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_ERROR = Status(StatusCode.ERROR)


class PresetIds(IdGenerator):
    """The ids this node already sent downstream: decided per request before the span is recorded."""

    next_span = 1
    next_trace = 1

    def generate_span_id(self) -> int:
        return self.next_span

    def generate_trace_id(self) -> int:
        return self.next_trace


class SdkSpans:
    """A TracerProvider for one node; `record` runs on the event loop thread only."""

    def __init__(self, tracing: "Tracing"):
        resource = Resource.create({"service.name": tracing.service, "service.version": tracing.version,
                                    "service.instance.id": tracing.node or tracing.service})
        self.ids = PresetIds()
        # Sampling is decided per request by meshcore.tracing.start_hop; the SDK records what it is given.
        self.provider = TracerProvider(resource=resource, sampler=ALWAYS_ON, id_generator=self.ids)
        self.provider.add_span_processor(BatchSpanProcessor(
            OtlpJsonExporter(tracing), max_queue_size=MAX_QUEUE, schedule_delay_millis=BATCH_DELAY_MS,
            max_export_batch_size=MAX_BATCH, export_timeout_millis=int(EXPORT_TIMEOUT_S * 2000)))
        self.tracer = self.provider.get_tracer(SCOPE)

    def record(self, ctx: TraceContext, name: str, kind: int, attrs: dict, start_ns: int, end_ns: int,
               error: bool) -> None:
        """One finished hop as an SDK span with the ids already propagated."""
        self.ids.next_span = ctx.span_id
        self.ids.next_trace = ctx.trace_id
        parent = None
        if ctx.parent_id is not None:
            remote = SpanContext(ctx.trace_id, ctx.parent_id, is_remote=True, trace_flags=_SAMPLED)
            parent = api.set_span_in_context(NonRecordingSpan(remote))
        span = self.tracer.start_span(name, context=parent, kind=_KINDS[kind], attributes=attrs,
                                      start_time=start_ns)
        if error:
            span.set_status(_ERROR)
        span.end(end_time=end_ns)

    def close(self) -> None:
        self.provider.shutdown()


def span_records(spans: Sequence[ReadableSpan]) -> list[SpanRecord]:
    """SDK spans as SpanRecords (the SDK's SpanKind values are the proto's minus one)."""
    out = []
    for s in spans:
        ctx = s.context
        parent = s.parent
        attrs = s.resource.attributes
        out.append(SpanRecord(
            trace_id="%032x" % ctx.trace_id, span_id="%016x" % ctx.span_id,
            parent_id="%016x" % parent.span_id if parent is not None else None,
            name=s.name, kind=s.kind.value + 1, start_ns=s.start_time or 0, end_ns=s.end_time or 0,
            service=str(attrs.get("service.name", "unknown")),
            attributes=tuple((s.attributes or {}).items()),
            error=s.status.status_code == StatusCode.ERROR,
            resource=tuple(sorted((k, v) for k, v in attrs.items() if isinstance(v, (str, int, float, bool))))))
    return out


def post_json(url: str, body: bytes, context: ssl.SSLContext | None, timeout: float = EXPORT_TIMEOUT_S) -> int:
    """POST `body` as application/json; the response status (raises OSError on transport errors)."""
    parts = urlsplit(url)
    if parts.scheme == "https":
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            parts.hostname, parts.port or 443, timeout=timeout, context=context)
    else:
        conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
    try:
        conn.request("POST", parts.path or "/v1/traces", body=body,
                     headers={"Content-Type": "application/json", "User-Agent": "meshd-sidecar"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


class OtlpJsonExporter(SpanExporter):
    """Posts each batch to every current target of a Tracing (read at export: settings may change)."""

    def __init__(self, tracing: "Tracing"):
        self.tracing = tracing

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        targets = self.tracing.targets()
        if not targets:
            return SpanExportResult.SUCCESS  # nowhere to send (no meshd receiver, no endpoint): no encoding
        body = json.dumps(encode_otlp(span_records(spans), scope=SCOPE)).encode()
        ok_all = True
        for label, url, factory in targets:
            try:
                status = post_json(url, body, factory() if factory is not None else None)
                ok = 200 <= status < 300
                if not ok:
                    log.warning("span_export_refused", target=label, url=url, status=status)
            except (OSError, http.client.HTTPException) as exc:
                ok = False
                log.warning("span_export_failed", target=label, url=url, error=str(exc) or type(exc).__name__)
            self.tracing.counts.add(label, ok, len(spans))
            ok_all = ok_all and ok
        return SpanExportResult.SUCCESS if ok_all else SpanExportResult.FAILURE

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True
