"""Span export: sampled hops queued on the event loop, batched by one thread and posted as OTLP/HTTP
JSON (no protobuf runtime, no SDK) to the targets it is given (meshd's store, the external collector).

The exporter knows nothing of sidecar.tracing: the node's tracing gives it the resource, a function
that lists the current targets and one that counts what became of the spans.

Why not the OpenTelemetry SDK: it only batched here (ids and sampling are decided per request by
meshcore.tracecontext, the encoding is meshcore.otlp's OtlpJsonWriter), and at 1% sampling under load its
import and its queued spans (a lock, two deques and a copy of the attributes each) cost a sidecar
about 3.5 MiB; a span here is one tuple until its batch is encoded.
"""

from __future__ import annotations

import ssl
import threading
from collections import deque
from typing import Any, Callable, Iterable

import structlog

from meshcore.otlp import OtlpJsonWriter
from meshcore.spans import SpanRecord
from meshcore.tracecontext import TraceContext

log = structlog.get_logger("sidecar.tracing")

EXPORT_TIMEOUT_S = 5.0
BATCH_DELAY_MS = 1000          # a span reaches the store within about a second
MAX_QUEUE = 2048               # spans waiting for export; more are dropped (counted), never block
MAX_BATCH = 512                # spans per POST (OTLP/HTTP bodies stay well under receivers' limits)
SCOPE = "meshd.sidecar"

# One finished hop: (context, name, kind, attributes, start ns, end ns, error), as OtlpJsonWriter takes it
Span = tuple[TraceContext, str, int, dict, int, int, bool]
# Where spans go now: (label, URL, TLS client context factory or None)
Target = tuple[str, str, Callable[[], ssl.SSLContext] | None]


def node_resource(service: str, version: str, node: str = "") -> tuple[tuple[str, Any], ...]:
    """A node's OTLP resource attributes, sorted (service.instance.id: the node, else the service)."""
    return tuple(sorted({"service.name": service, "service.version": version,
                         "service.instance.id": node or service}.items()))


def resource_service(resource: tuple[tuple[str, Any], ...]) -> str:
    """The service.name of a node's resource attributes."""
    return dict(resource).get("service.name", "unknown")


def span_records(spans: Iterable[Span], resource: tuple[tuple[str, Any], ...]) -> list[SpanRecord]:
    """Queued spans as SpanRecords of one node (`resource`: its sorted resource attributes): what
    meshd's receiver decodes their OTLP body to."""
    service = resource_service(resource)
    return [SpanRecord(trace_id=ctx.trace_hex, span_id="%016x" % ctx.span_id,
                       parent_id="%016x" % ctx.parent_id if ctx.parent_id is not None else None,
                       name=name, kind=kind, start_ns=start_ns, end_ns=end_ns, service=service,
                       attributes=tuple(attrs.items()), error=error, resource=resource)
            for ctx, name, kind, attrs, start_ns, end_ns, error in spans]


def post_json(url: str, body: bytes, context: ssl.SSLContext | None, timeout: float = EXPORT_TIMEOUT_S) -> int:
    """POST `body` as application/json; the response status (raises OSError on transport errors)."""
    import http.client   # on the exporter's thread, and only once there is somewhere to send
    from urllib.parse import urlsplit

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


class SpanExporter:
    """A bounded queue of a node's finished spans and the thread that posts them in batches.

    `record` runs on the event loop only (a deque append; the thread starts with the first span);
    the thread wakes every BATCH_DELAY_MS, or at once when a full batch waits, and posts each batch
    to every target `targets()` returns (called at export: settings may change), then calls
    `count(label, ok, n)` per target. With no target the batch is dropped unencoded. `close` flushes
    what is queued, bounded by the export timeout.
    """

    def __init__(self, resource: tuple[tuple[str, Any], ...], targets: Callable[[], list[Target]],
                 count: Callable[[str, bool, int], None], *, delay_s: float = BATCH_DELAY_MS / 1000,
                 max_queue: int = MAX_QUEUE, max_batch: int = MAX_BATCH):
        self.resource = resource
        self.writer = OtlpJsonWriter(resource, resource_service(resource), SCOPE)
        self.targets = targets
        self.count = count
        self.delay_s = delay_s
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.queue: deque[Span] = deque()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False

    def record(self, span: Span) -> bool:
        """Queue one finished span; False (not queued) when the queue is full or the exporter closed."""
        queue = self.queue
        if self._closed or len(queue) >= self.max_queue:
            return False
        queue.append(span)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="span-export", daemon=True)
            self._thread.start()
        elif len(queue) == self.max_batch:
            self._wake.set()
        return True

    def _run(self) -> None:
        while True:
            self._wake.wait(self.delay_s)
            self._wake.clear()
            closed = self._closed
            self.flush()
            if closed:
                return

    def _take(self) -> list[Span]:
        """Up to max_batch spans off the queue (another thread may be taking too)."""
        batch: list[Span] = []
        pop = self.queue.popleft
        try:
            for _ in range(self.max_batch):
                batch.append(pop())
        except IndexError:
            pass
        return batch

    def flush(self) -> None:
        """Export everything queued now, a batch at a time (the exporter thread's work; safe beside it)."""
        while batch := self._take():
            try:
                self.export(batch)
            except Exception:  # noqa: BLE001 - a bad batch must not end the exporter
                log.exception("span_export_error", spans=len(batch))

    def export(self, spans: list[Span]) -> bool:
        """Post one batch to every target; True when all accepted it (or there is none)."""
        targets = self.targets()
        if not targets:
            return True   # nowhere to send (no meshd receiver, no endpoint): no encoding
        body = self.writer.body(spans)   # json.dumps(encode_otlp(span_records(...))), byte for byte
        ok_all = True
        for label, url, factory in targets:
            try:
                status = post_json(url, body, factory() if factory is not None else None)
                ok = 200 <= status < 300
                if not ok:
                    log.warning("span_export_refused", target=label, url=url, status=status)
            except Exception as exc:  # noqa: BLE001 - OSError, http.client.HTTPException, a bad context
                ok = False
                log.warning("span_export_failed", target=label, url=url, error=str(exc) or type(exc).__name__)
            self.count(label, ok, len(spans))
            ok_all = ok_all and ok
        return ok_all

    def close(self, timeout: float = 2 * EXPORT_TIMEOUT_S) -> None:
        """Stop taking spans; the thread exports what is queued and ends (waited for up to `timeout`)."""
        self._closed = True
        thread = self._thread
        if thread is None:
            return
        self._wake.set()
        thread.join(timeout)
