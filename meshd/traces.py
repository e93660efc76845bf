"""meshd's built-in trace store (an OTLP/HTTP JSON receiver for mesh members) and the mesh-wide
telemetry settings (sampling, external OTLP endpoint, access logs), persisted and pushed."""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Awaitable, Callable

import structlog
from aiohttp import web

from certs.holder import peer_identity
from meshcore.otlp import OtlpError, decode_otlp
from meshcore.spans import KIND_NAMES, SpanRecord, build_trace_tree
from meshcore.telemetry_settings import SettingsError, TelemetrySettings, decode_settings, encode_settings

from .store import Store

log = structlog.get_logger("meshd.traces")

STORE_KEY = "telemetry_settings"
MAX_TRACES = 5000            # the oldest trace goes first beyond this
MAX_SPANS_PER_TRACE = 1000
MAX_BODY = 8 * 1024 * 1024   # one OTLP request; sidecars batch at most 512 spans


class TraceStore:
    """Recent traces in memory, bounded (oldest first out); lost on restart, like Jaeger's memory store."""

    def __init__(self, max_traces: int = MAX_TRACES, max_spans: int = MAX_SPANS_PER_TRACE):
        self.max_traces = max_traces
        self.max_spans = max_spans
        self.traces: OrderedDict[str, dict[str, SpanRecord]] = OrderedDict()
        self.received = 0
        self.dropped = 0

    def add(self, spans: list[SpanRecord]) -> int:
        """Keep `spans`; the number kept (a full trace keeps its first spans)."""
        kept = 0
        for span in spans:
            trace = self.traces.get(span.trace_id)
            if trace is None:
                trace = self.traces[span.trace_id] = {}
                while len(self.traces) > self.max_traces:
                    self.traces.popitem(last=False)
            if span.span_id not in trace and len(trace) >= self.max_spans:
                self.dropped += 1
                continue
            trace[span.span_id] = span
            kept += 1
        self.received += len(spans)
        return kept

    def spans(self, trace_id: str) -> list[SpanRecord] | None:
        trace = self.traces.get(trace_id.lower())
        return list(trace.values()) if trace is not None else None

    def recent(self, limit: int = 20, service: str | None = None, errors: bool = False) -> list[dict]:
        """Summaries of the newest traces first, optionally only those touching `service` or failing."""
        out = []
        for trace_id in reversed(self.traces):
            spans = list(self.traces[trace_id].values())
            if service and not any(s.service == service or s.attr("mesh.destination") == service for s in spans):
                continue
            if errors and not any(s.error for s in spans):
                continue
            out.append(summarize(trace_id, spans))
            if len(out) >= limit:
                break
        return out


def summarize(trace_id: str, spans: list[SpanRecord]) -> dict:
    """One trace in a line: root, services, span count, duration, errors."""
    rows = build_trace_tree(spans)
    root = rows[0].span if rows else None
    start = min(s.start_ns for s in spans)
    end = max(s.end_ns for s in spans)
    services = sorted({s.service for s in spans})
    return {"trace_id": trace_id, "root": f"{root.service}: {root.name}" if root else "",
            "services": services, "spans": len(spans), "errors": sum(1 for s in spans if s.error),
            "start": start / 1e9, "duration_ms": round((end - start) / 1e6, 3)}


def encode_span(span: SpanRecord, depth: int | None = None, orphan: bool = False) -> dict:
    out = {"trace_id": span.trace_id, "span_id": span.span_id, "parent_id": span.parent_id,
           "name": span.name, "kind": KIND_NAMES.get(span.kind, str(span.kind)), "service": span.service,
           "start": span.start_ns / 1e9, "duration_ms": round(span.duration_ms, 3), "error": span.error,
           "attributes": {k: v for k, v in span.attributes}}
    if depth is not None:
        out["depth"] = depth
        out["orphan"] = orphan
    return out


class SettingsBook:
    """The mesh's telemetry settings: the environment's defaults, overridden by `meshctl tracing`
    (persisted in meshd's store, so they survive a restart)."""

    def __init__(self, store: Store, defaults: TelemetrySettings):
        self.store = store
        self.defaults = defaults
        self.settings = defaults
        raw = store.get(STORE_KEY)
        if raw:
            try:
                self.settings = decode_settings(raw, defaults)
            except SettingsError as exc:
                log.warning("telemetry_settings_dropped", error=str(exc))

    def change(self, raw: dict) -> TelemetrySettings:
        """Apply a partial change (raises SettingsError before anything is stored)."""
        settings = decode_settings(raw, self.settings)
        self.settings = settings
        self.store.put(STORE_KEY, encode_settings(settings))
        return settings


def settings_from_env(env: dict[str, str]) -> TelemetrySettings:
    """MESH_TRACE_SAMPLING, MESH_OTLP_ENDPOINT, MESH_ACCESS_LOG; raises SettingsError naming the variable."""
    settings = TelemetrySettings()
    for var, key in (("MESH_TRACE_SAMPLING", "sampling"), ("MESH_OTLP_ENDPOINT", "otlp_endpoint"),
                     ("MESH_ACCESS_LOG", "access_log")):
        if env.get(var, "").strip():
            try:
                settings = decode_settings({key: env[var]}, settings)
            except SettingsError as exc:
                raise SettingsError(f"{var}: {exc}") from None
    return settings


def add_receiver(app: web.Application, store: TraceStore, trust_domain: str) -> None:
    """POST /v1/traces (OTLP/HTTP, JSON encoding) on the control listener, for mesh members only."""
    prefix = f"spiffe://{trust_domain}/"

    async def receive(req: web.Request) -> web.Response:
        sslobj = req.transport.get_extra_info("ssl_object") if req.transport is not None else None
        identity = peer_identity(sslobj) if sslobj is not None else None
        if identity is None or not identity.startswith(prefix):
            return web.json_response({"error": "a mesh workload certificate is required"}, status=401)
        ctype = req.content_type
        if ctype != "application/json":
            return web.json_response({"error": f"content type {ctype!r}: meshd's store takes OTLP/HTTP "
                                               "JSON (application/json)"}, status=415)
        if req.content_length is not None and req.content_length > MAX_BODY:
            return web.json_response({"error": f"body over {MAX_BODY} bytes"}, status=413)
        try:
            spans = decode_otlp(await req.json())
        except (ValueError, OtlpError) as exc:
            return web.json_response({"error": f"OTLP body: {exc}"}, status=400)
        store.add(spans)
        return web.json_response({})  # ExportTraceServiceResponse: no partial success to report

    app.router.add_post("/v1/traces", receive)


def add_routes(app: web.Application, store: TraceStore, book: SettingsBook,
               publish: Callable[[], Awaitable[int]]) -> None:
    """GET /v1/traces, GET /v1/traces/{id}, GET and PUT /v1/telemetry/settings on meshd's admin API."""

    async def recent(req: web.Request) -> web.Response:
        try:
            limit = max(1, min(500, int(req.query.get("limit", "20"))))
        except ValueError:
            return web.json_response({"error": "query parameter limit: not a number"}, status=400)
        errors = req.query.get("errors", "").lower() in ("1", "true", "yes")
        return web.json_response({"traces": store.recent(limit, req.query.get("service") or None, errors),
                                  "stored": len(store.traces), "received": store.received,
                                  "at": time.time()})

    async def one(req: web.Request) -> web.Response:
        trace_id = req.match_info["trace_id"].lower()
        spans = store.spans(trace_id)
        if spans is None:
            return web.json_response({"error": f"no trace {trace_id!r} in meshd's store (sampled? "
                                               "spans arrive about a second after the request)"}, status=404)
        rows = build_trace_tree(spans)
        return web.json_response({"trace": summarize(trace_id, spans),
                                  "spans": [encode_span(r.span, r.depth, r.orphan) for r in rows]})

    async def show_settings(_req: web.Request) -> web.Response:
        return web.json_response({"settings": encode_settings(book.settings),
                                  "defaults": encode_settings(book.defaults)})

    async def change_settings(req: web.Request) -> web.Response:
        try:
            body = await req.json()
        except ValueError:
            return web.json_response({"error": "the request body is not JSON"}, status=400)
        try:
            settings = book.change(body)
        except SettingsError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        version = await publish()
        return web.json_response({"settings": encode_settings(settings), "version": version})

    app.router.add_get("/v1/traces", recent)
    app.router.add_get("/v1/traces/{trace_id}", one)
    app.router.add_get("/v1/telemetry/settings", show_settings)
    app.router.add_put("/v1/telemetry/settings", change_settings)
