"""Trace context, spans and telemetry settings; pure, standard library only.

Propagation follows W3C Trace Context (https://www.w3.org/TR/trace-context/, `traceparent`) and
understands B3 (https://github.com/openzipkin/b3-propagation, single `b3` and multi `x-b3-*`).
Spans travel as OTLP/HTTP JSON (opentelemetry-proto's JSON mapping, OTLP 1.0 "JSON Protobuf
Encoding": ids as lowercase hex, 64-bit integers as decimal strings, enums as integers).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable
from urllib.parse import urlsplit

# W3C Trace Context 3.2.2.5: bit 0 of trace-flags is `sampled`.
FLAG_SAMPLED = 0x01
TRACEPARENT = b"traceparent"
TRACESTATE = b"tracestate"
B3_SINGLE = b"b3"
B3_TRACE_ID = b"x-b3-traceid"
B3_SPAN_ID = b"x-b3-spanid"
B3_PARENT_SPAN_ID = b"x-b3-parentspanid"
B3_SAMPLED = b"x-b3-sampled"
B3_FLAGS = b"x-b3-flags"
B3_MULTI = (B3_TRACE_ID, B3_SPAN_ID, B3_PARENT_SPAN_ID, B3_SAMPLED, B3_FLAGS)

B3_NONE, B3_SINGLE_FORM, B3_MULTI_FORM = 0, 1, 2

# OTLP Span.SpanKind and Status.StatusCode (opentelemetry/proto/trace/v1/trace.proto).
KIND_INTERNAL, KIND_SERVER, KIND_CLIENT = 1, 2, 3
KIND_NAMES = {0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}
STATUS_UNSET, STATUS_OK, STATUS_ERROR = 0, 1, 2

ACCESS_OFF, ACCESS_ERRORS, ACCESS_SAMPLED, ACCESS_FULL = "off", "errors", "sampled", "full"
ACCESS_LOG_MODES = (ACCESS_OFF, ACCESS_ERRORS, ACCESS_SAMPLED, ACCESS_FULL)
DEFAULT_SAMPLING = 1.0        # percent, Istio's default (meshConfig defaultConfig.tracing.sampling)
# Failures only by default: the lines an operator reads (Envoy users' common status/flag filter), and
# nothing per successful request on the hot path (bench/RESULTS.md, "Cost of metrics and tracing").
DEFAULT_ACCESS_LOG = ACCESS_ERRORS
_HEX = frozenset(b"0123456789abcdef")
_MASK128 = (1 << 128) - 1
_MASK64 = (1 << 64) - 1


class TraceContext:
    """One hop's place in a trace: the span it reports and the parent it was called from.

    A plain class rather than a dataclass: one is made per request. A context continued from a
    canonical `traceparent` (`continue_traceparent`) keeps the header and decodes its trace and
    parent ids only when read: most requests are neither sampled nor logged, and never read them.
    """

    __slots__ = ("_trace_id", "span_id", "_parent_id", "sampled", "b3", "short", "_header")

    def __init__(self, trace_id: int, span_id: int, parent_id: int | None, sampled: bool,
                 b3: int = B3_NONE, short: bool = False):
        self._trace_id = trace_id
        self.span_id = span_id
        self._parent_id = parent_id     # None: this hop starts the trace
        self.sampled = sampled
        self.b3 = b3                    # the B3 form the request came with, re-emitted in the same form
        self.short = short              # a 64-bit B3 trace id (emitted back as 16 hex digits)
        self._header = None             # a canonical traceparent whose ids are not decoded yet

    @property
    def trace_id(self) -> int:
        if self._header is not None:
            self._decode()
        return self._trace_id

    @property
    def parent_id(self) -> int | None:
        if self._header is not None:
            self._decode()
        return self._parent_id

    @property
    def is_child(self) -> bool:
        """This hop continues a caller's trace (it has a parent span)."""
        return self._header is not None or self._parent_id is not None

    def _decode(self) -> None:
        header, self._header = self._header, None
        self._trace_id = int(header[3:35], 16)
        self._parent_id = int(header[36:52], 16)

    @property
    def trace_hex(self) -> str:
        header = self._header
        if header is not None:
            return header[3:35].decode("ascii")
        return "%032x" % self._trace_id

    def _key(self) -> tuple:
        return self.trace_id, self.span_id, self.parent_id, self.sampled, self.b3, self.short

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not TraceContext:
            return NotImplemented
        return self._key() == other._key()

    __hash__ = None  # mutable, like the dataclass it replaces

    def __repr__(self) -> str:
        return ("TraceContext(trace_id=%r, span_id=%r, parent_id=%r, sampled=%r, b3=%r, short=%r)"
                % self._key())


@dataclass(slots=True)
class Parent:
    """Trace context read from a request's headers. Ids 0: a B3 sampling decision without ids
    (`b3: 0`); `sampled` None: B3 left the decision to the receiver."""

    trace_id: int
    span_id: int
    sampled: bool | None
    b3: int = B3_NONE
    short: bool = False


def _hex_field(value: bytes, width: int) -> int | None:
    if len(value) != width or not _HEX.issuperset(value):
        return None
    n = int(value, 16)
    return n or None  # all zeros is invalid (W3C 3.2.2.3, 3.2.2.4; B3 likewise)


_TRACEPARENT_00 = re.compile(rb"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


def decode_traceparent(value: bytes) -> Parent | None:
    """A `traceparent` header (W3C Trace Context 3.2), or None when it is not valid."""
    m = _TRACEPARENT_00.fullmatch(value)
    if m is not None:  # the canonical form, as every hop of this mesh sends it
        trace_id, span_id = int(m[1], 16), int(m[2], 16)
        if trace_id and span_id:
            return Parent(trace_id, span_id, bool(int(m[3], 16) & FLAG_SAMPLED))
        return None
    value = value.strip().lower()
    parts = value.split(b"-")
    if len(parts) < 4 or len(parts[0]) != 2 or not _HEX.issuperset(parts[0]) or parts[0] == b"ff":
        return None
    if parts[0] == b"00" and len(parts) != 4:
        return None  # version 00 has exactly four fields; later versions may append more (3.3)
    trace_id = _hex_field(parts[1], 32)
    span_id = _hex_field(parts[2], 16)
    if trace_id is None or span_id is None or len(parts[3]) != 2 or not _HEX.issuperset(parts[3]):
        return None
    return Parent(trace_id, span_id, bool(int(parts[3], 16) & FLAG_SAMPLED))


def _b3_trace_id(value: bytes) -> tuple[int, bool] | None:
    if len(value) == 16:
        n = _hex_field(value, 16)
        return (n, True) if n is not None else None
    n = _hex_field(value, 32)
    return (n, False) if n is not None else None


_B3_STATES = {b"0": False, b"1": True, b"d": True}


def decode_b3_single(value: bytes) -> Parent | None:
    """A single `b3` header `{trace}-{span}[-{sampled}[-{parent}]]`, or a bare sampling state
    (`0`, `1`, `d`: a decision without ids)."""
    parts = value.strip().lower().split(b"-")
    if len(parts) == 1 and parts[0] in _B3_STATES:
        return Parent(0, 0, _B3_STATES[parts[0]], B3_SINGLE_FORM)
    if len(parts) < 2 or len(parts) > 4:
        return None
    tid = _b3_trace_id(parts[0])
    span_id = _hex_field(parts[1], 16)
    if tid is None or span_id is None:
        return None
    if len(parts) < 3:
        sampled = None  # deferred: the receiver decides
    elif parts[2] in _B3_STATES:
        sampled = _B3_STATES[parts[2]]
    else:
        return None
    return Parent(tid[0], span_id, sampled, B3_SINGLE_FORM, tid[1])


def decode_b3_multi(headers: dict[bytes, bytes]) -> Parent | None:
    """`x-b3-traceid` and `x-b3-spanid` (lowercase names), with `x-b3-sampled` / `x-b3-flags`
    (debug implies sampled; neither: deferred to the receiver); a decision alone has ids 0."""
    flag = headers.get(B3_SAMPLED)
    sampled: bool | None = None
    if headers.get(B3_FLAGS, b"").strip() == b"1":
        sampled = True
    elif flag is not None:
        sampled = flag.strip().lower() in (b"1", b"true")
    raw_tid, raw_sid = headers.get(B3_TRACE_ID), headers.get(B3_SPAN_ID)
    if raw_tid is None and raw_sid is None:
        return Parent(0, 0, sampled, B3_MULTI_FORM) if sampled is not None else None
    if raw_tid is None or raw_sid is None:
        return None
    tid = _b3_trace_id(raw_tid.strip().lower())
    span_id = _hex_field(raw_sid.strip().lower(), 16)
    if tid is None or span_id is None:
        return None
    return Parent(tid[0], span_id, sampled, B3_MULTI_FORM, tid[1])


def decode_parent(traceparent: bytes | None, b3: dict[bytes, bytes] | None) -> Parent | None:
    """The request's parent context: `traceparent` when valid (W3C wins when both are present,
    as Linkerd does), else B3; the B3 form is remembered so it is forwarded in kind."""
    parent = decode_traceparent(traceparent) if traceparent is not None else None
    if not b3:
        return parent
    single = b3.get(B3_SINGLE)
    from_b3 = decode_b3_single(single) if single is not None else decode_b3_multi(b3)
    if parent is None:
        return from_b3
    # A 64-bit B3 trace id travels in traceparent zero-padded; it goes on 64-bit in B3.
    short = from_b3 is not None and from_b3.short and from_b3.trace_id == parent.trace_id
    form = B3_SINGLE_FORM if single is not None else B3_MULTI_FORM
    return Parent(parent.trace_id, parent.span_id, parent.sampled, form, short)


def start_hop(parent: Parent | None, rate: float, rand: float, new_trace_id: int,
              new_span_id: int) -> TraceContext:
    """This hop's context: a child of `parent` keeping its sampling decision, or a new trace
    sampled when `rand` (in [0, 1)) falls below `rate` (a fraction). A parent without ids (a bare
    B3 decision) starts a new trace with its decision; a deferred decision is made here."""
    span_id = (new_span_id & _MASK64) or 1
    if parent is None:
        return TraceContext((new_trace_id & _MASK128) or 1, span_id, None, rand < rate)
    sampled = parent.sampled if parent.sampled is not None else rand < rate
    if parent.trace_id == 0:
        return TraceContext((new_trace_id & _MASK128) or 1, span_id, None, sampled, parent.b3)
    return TraceContext(parent.trace_id, span_id, parent.span_id, sampled, parent.b3, parent.short)


_TRACEPARENT_CHARS = b"0123456789abcdef-"
_ZERO_TRACE, _ZERO_SPAN = b"0" * 32, b"0" * 16
_DASH = 0x2D
_SAMPLED_LAST_DIGIT = frozenset(b"13579bdf")    # trace-flags with bit 0 set (FLAG_SAMPLED)


def continue_traceparent(traceparent: bytes, new_span_id: int) -> tuple[TraceContext, bytes] | None:
    """The fast path of start_hop + encode_trace_headers for a canonical version-00 `traceparent`
    and no B3 (every mesh hop after the first): this hop's context and its header line, or None
    when the slow path must decide.

    Canonical: `00-` 32 and 16 lowercase hex digits, `-` 2 hex digits (W3C Trace Context 3.2.2),
    ids not all zeros; checked with byte compares, no regular expression, and the ids stay hex
    until read (TraceContext).
    """
    tp = traceparent
    if (len(tp) != 55 or tp[2] != _DASH or tp[35] != _DASH or tp[52] != _DASH or tp[:2] != b"00"
            or tp.count(b"-") != 3 or tp.translate(None, _TRACEPARENT_CHARS)
            or tp[3:35] == _ZERO_TRACE or tp[36:52] == _ZERO_SPAN):
        return None
    span_id = (new_span_id & _MASK64) or 1
    sampled = tp[54] in _SAMPLED_LAST_DIGIT
    ctx = TraceContext(0, span_id, None, sampled)
    ctx._header = tp
    return ctx, b"traceparent: %b%016x-%b\r\n" % (tp[:36], span_id, b"01" if sampled else b"00")


def encode_trace_headers(ctx: TraceContext) -> bytes:
    """The header lines (CRLF-ended) that carry `ctx` to the next hop: `traceparent` always, and
    B3 in the form the request came with."""
    flags = FLAG_SAMPLED if ctx.sampled else 0
    out = b"traceparent: 00-%032x-%016x-%02x\r\n" % (ctx.trace_id, ctx.span_id, flags)
    if ctx.b3 == B3_NONE:
        return out
    tid = b"%016x" % ctx.trace_id if ctx.short else b"%032x" % ctx.trace_id
    sampled = b"1" if ctx.sampled else b"0"
    if ctx.b3 == B3_SINGLE_FORM:
        out += b"b3: %b-%016x-%b" % (tid, ctx.span_id, sampled)
        if ctx.parent_id is not None:
            out += b"-%016x" % ctx.parent_id
        return out + b"\r\n"
    out += b"x-b3-traceid: %b\r\nx-b3-spanid: %016x\r\nx-b3-sampled: %b\r\n" % (tid, ctx.span_id, sampled)
    if ctx.parent_id is not None:
        out += b"x-b3-parentspanid: %016x\r\n" % ctx.parent_id
    return out


# ---- spans -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class SpanRecord:
    """One finished span, as stored, exported and printed."""

    trace_id: str                  # 32 lowercase hex digits
    span_id: str                   # 16 lowercase hex digits
    parent_id: str | None
    name: str
    kind: int                      # KIND_*
    start_ns: int                  # Unix epoch nanoseconds
    end_ns: int
    service: str                   # resource service.name
    attributes: tuple[tuple[str, Any], ...] = ()
    error: bool = False
    resource: tuple[tuple[str, Any], ...] = ()

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6

    def attr(self, key: str, default: Any = None) -> Any:
        for k, v in self.attributes:
            if k == key:
                return v
        return default


class OtlpError(ValueError):
    """An OTLP/HTTP JSON body that does not decode; the message names the field."""


def _any_value(value: Any) -> dict:
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)}  # int64 as a decimal string (proto3 JSON mapping)
    if isinstance(value, float):
        return {"doubleValue": value}
    return {"stringValue": str(value)}


def _attributes(pairs: Iterable[tuple[str, Any]]) -> list[dict]:
    return [{"key": k, "value": _any_value(v)} for k, v in pairs]


def encode_otlp(spans: Iterable[SpanRecord], scope: str = "meshd") -> dict:
    """An OTLP ExportTraceServiceRequest in JSON form, one ResourceSpans per (service, resource)."""
    groups: dict[tuple, list[SpanRecord]] = {}
    for span in spans:
        groups.setdefault((span.service, span.resource), []).append(span)
    out = []
    for (service, resource), members in groups.items():
        res = dict(resource)
        res.setdefault("service.name", service)
        out.append({
            "resource": {"attributes": _attributes(res.items())},
            "scopeSpans": [{"scope": {"name": scope}, "spans": [{
                "traceId": s.trace_id, "spanId": s.span_id, "parentSpanId": s.parent_id or "",
                "name": s.name, "kind": s.kind,
                "startTimeUnixNano": str(s.start_ns), "endTimeUnixNano": str(s.end_ns),
                "attributes": _attributes(s.attributes),
                "status": {"code": STATUS_ERROR} if s.error else {},
            } for s in members]}],
        })
    return {"resourceSpans": out}


def _decode_value(raw: Any, where: str) -> Any:
    if not isinstance(raw, dict) or len(raw) != 1:
        raise OtlpError(f"{where}: expected an AnyValue object")
    (kind, value), = raw.items()
    if kind == "stringValue" and isinstance(value, str):
        return value
    if kind == "boolValue" and isinstance(value, bool):
        return value
    if kind == "intValue" and isinstance(value, (str, int)) and not isinstance(value, bool):
        try:
            return int(value)
        except ValueError:
            raise OtlpError(f"{where}.intValue: {value!r} is not an integer") from None
    if kind == "doubleValue" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind in ("arrayValue", "kvlistValue", "bytesValue"):
        return str(value)  # kept as text: meshd only displays them
    raise OtlpError(f"{where}: unsupported AnyValue {kind!r}")


def _decode_attributes(raw: Any, where: str) -> tuple[tuple[str, Any], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise OtlpError(f"{where}: expected a list")
    out = []
    for i, kv in enumerate(raw):
        if not isinstance(kv, dict) or not isinstance(kv.get("key"), str):
            raise OtlpError(f"{where}[{i}].key: missing")
        out.append((kv["key"], _decode_value(kv.get("value"), f"{where}[{i}].value")))
    return tuple(out)


def _hex_id(raw: Any, width: int, where: str, optional: bool = False) -> str | None:
    if optional and raw in (None, ""):
        return None
    if not isinstance(raw, str) or len(raw) != width or not _HEX.issuperset(raw.lower().encode()) \
            or int(raw, 16) == 0:
        raise OtlpError(f"{where}: expected {width} hex digits, not all zero")
    return raw.lower()


def _nanos(raw: Any, where: str) -> int:
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise OtlpError(f"{where}: expected nanoseconds since the epoch") from None
    if value < 0 or isinstance(raw, bool):
        raise OtlpError(f"{where}: expected nanoseconds since the epoch")
    return value


def decode_otlp(body: Any) -> list[SpanRecord]:
    """The spans of an OTLP ExportTraceServiceRequest in JSON form; raises OtlpError naming the field."""
    if not isinstance(body, dict):
        raise OtlpError("body: expected an object")
    rs_list = body.get("resourceSpans", [])
    if not isinstance(rs_list, list):
        raise OtlpError("resourceSpans: expected a list")
    out: list[SpanRecord] = []
    for i, rs in enumerate(rs_list):
        where = f"resourceSpans[{i}]"
        if not isinstance(rs, dict):
            raise OtlpError(f"{where}: expected an object")
        res = rs.get("resource") or {}
        if not isinstance(res, dict):
            raise OtlpError(f"{where}.resource: expected an object")
        resource = _decode_attributes(res.get("attributes"), f"{where}.resource.attributes")
        service = str(dict(resource).get("service.name", "unknown"))
        scopes = rs.get("scopeSpans", rs.get("instrumentationLibrarySpans", []))
        if not isinstance(scopes, list):
            raise OtlpError(f"{where}.scopeSpans: expected a list")
        for j, ss in enumerate(scopes):
            spans = ss.get("spans", []) if isinstance(ss, dict) else None
            if not isinstance(spans, list):
                raise OtlpError(f"{where}.scopeSpans[{j}].spans: expected a list")
            for k, s in enumerate(spans):
                w = f"{where}.scopeSpans[{j}].spans[{k}]"
                if not isinstance(s, dict):
                    raise OtlpError(f"{w}: expected an object")
                name = s.get("name")
                if not isinstance(name, str):
                    raise OtlpError(f"{w}.name: expected a string")
                kind = s.get("kind", 0)
                if not isinstance(kind, int) or isinstance(kind, bool) or kind not in KIND_NAMES:
                    raise OtlpError(f"{w}.kind: {kind!r} is not a SpanKind")
                start = _nanos(s.get("startTimeUnixNano"), f"{w}.startTimeUnixNano")
                end = _nanos(s.get("endTimeUnixNano"), f"{w}.endTimeUnixNano")
                status = s.get("status") or {}
                out.append(SpanRecord(
                    trace_id=_hex_id(s.get("traceId"), 32, f"{w}.traceId"),
                    span_id=_hex_id(s.get("spanId"), 16, f"{w}.spanId"),
                    parent_id=_hex_id(s.get("parentSpanId"), 16, f"{w}.parentSpanId", optional=True),
                    name=name, kind=kind, start_ns=start, end_ns=max(start, end), service=service,
                    attributes=_decode_attributes(s.get("attributes"), f"{w}.attributes"),
                    error=isinstance(status, dict) and status.get("code") == STATUS_ERROR,
                    resource=resource))
    return out


@dataclass(frozen=True)
class TreeRow:
    """One line of a printed trace: a span at its depth."""

    depth: int
    span: SpanRecord
    orphan: bool = False  # its parent span was not received (yet)


def build_trace_tree(spans: Iterable[SpanRecord]) -> list[TreeRow]:
    """Spans in depth-first order, children by start time; spans whose parent is missing are
    roots marked orphan. Duplicate span ids keep the first seen."""
    by_id: dict[str, SpanRecord] = {}
    for s in spans:
        by_id.setdefault(s.span_id, s)
    children: dict[str | None, list[SpanRecord]] = {}
    orphans: set[str] = set()
    for s in by_id.values():
        parent = s.parent_id if s.parent_id in by_id else None
        if s.parent_id is not None and parent is None:
            orphans.add(s.span_id)
        children.setdefault(parent, []).append(s)
    for members in children.values():
        members.sort(key=lambda s: (s.start_ns, s.kind, s.span_id))
    rows: list[TreeRow] = []
    seen: set[str] = set()

    def walk(top: SpanRecord, orphan: bool) -> None:
        stack = [(0, top)]
        while stack:
            depth, s = stack.pop()
            if s.span_id in seen:
                continue
            seen.add(s.span_id)
            rows.append(TreeRow(depth, s, orphan if s is top else s.span_id in orphans))
            stack.extend((depth + 1, c) for c in reversed(children.get(s.span_id, [])))

    for s in children.get(None, []):
        walk(s, s.span_id in orphans)
    # Spans in a parent cycle (bad input) reach no root: each unreached one becomes an orphan root.
    for s in sorted(by_id.values(), key=lambda s: (s.start_ns, s.kind, s.span_id)):
        if s.span_id not in seen:
            walk(s, True)
    return rows


# ---- settings --------------------------------------------------------------------------------

class SettingsError(ValueError):
    """A telemetry setting that is not valid; the message names it."""


@dataclass(frozen=True)
class TelemetrySettings:
    """Mesh-wide tracing and access-log settings, pushed in every snapshot."""

    sampling: float = DEFAULT_SAMPLING      # percent of new traces sampled, 0-100
    otlp_endpoint: str | None = None        # external OTLP/HTTP collector (Jaeger, Tempo), .../v1/traces
    access_log: str = DEFAULT_ACCESS_LOG    # off | errors | sampled (sampled traces and errors) | full

    @property
    def rate(self) -> float:
        return self.sampling / 100.0


def decode_otlp_endpoint(value: str) -> str:
    """An OTLP/HTTP traces URL from `http(s)://host[:port][/path]`; a bare base gets `/v1/traces`
    (OTLP 1.0 default path)."""
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SettingsError(f"otlp endpoint: {value!r} is not an http(s)://host[:port] URL")
    try:
        parts.port
    except ValueError:
        raise SettingsError(f"otlp endpoint: {value!r} has a bad port") from None
    if parts.query or parts.fragment:
        raise SettingsError(f"otlp endpoint: {value!r} must not have a query or fragment")
    path = parts.path.rstrip("/") or "/v1/traces"
    return f"{parts.scheme}://{parts.netloc}{path}"


def decode_sampling(value: Any) -> float:
    """A sampling percentage 0-100 from a number or text (`"10"`, `"0.5"`, `"10%"`)."""
    text = str(value).strip().rstrip("%")
    try:
        rate = float(text)
    except ValueError:
        raise SettingsError(f"sampling: {value!r} is not a percentage") from None
    if not 0.0 <= rate <= 100.0 or rate != rate:
        raise SettingsError(f"sampling: {value!r} is not between 0 and 100")
    return rate


def decode_access_log(value: Any) -> str:
    mode = str(value).strip().lower()
    if mode not in ACCESS_LOG_MODES:
        raise SettingsError(f"access log: {value!r} is not one of {', '.join(ACCESS_LOG_MODES)}")
    return mode


def decode_settings(raw: Any, base: TelemetrySettings = TelemetrySettings()) -> TelemetrySettings:
    """Settings from a JSON object (`sampling`, `otlp_endpoint`, `access_log`), unspecified keys
    from `base`; `otlp_endpoint` null or "" clears it. Raises SettingsError naming the key."""
    if not isinstance(raw, dict):
        raise SettingsError("telemetry: expected an object")
    unknown = set(raw) - {"sampling", "otlp_endpoint", "access_log"}
    if unknown:
        raise SettingsError(f"telemetry: unknown setting {sorted(unknown)[0]!r}")
    sampling = decode_sampling(raw["sampling"]) if "sampling" in raw else base.sampling
    endpoint = base.otlp_endpoint
    if "otlp_endpoint" in raw:
        value = raw["otlp_endpoint"]
        if value is not None and not isinstance(value, str):
            raise SettingsError("otlp endpoint: expected a URL or null")
        endpoint = decode_otlp_endpoint(value) if value else None
    access = decode_access_log(raw["access_log"]) if "access_log" in raw else base.access_log
    return TelemetrySettings(sampling=sampling, otlp_endpoint=endpoint, access_log=access)


def encode_settings(settings: TelemetrySettings) -> dict:
    return {"sampling": settings.sampling, "otlp_endpoint": settings.otlp_endpoint,
            "access_log": settings.access_log}


def should_log_access(mode: str, sampled: bool, status: int, flags: str, no_flags: str = "-") -> bool:
    """Whether one finished request is access-logged: `full` always, `errors` when it failed (5xx,
    no response, or any response flag), `sampled` when it failed or its trace is sampled, `off` never."""
    if mode == ACCESS_FULL:
        return True
    if mode == ACCESS_OFF:
        return False
    failed = status >= 500 or status == 0 or flags != no_flags
    return failed or (sampled and mode == ACCESS_SAMPLED)
