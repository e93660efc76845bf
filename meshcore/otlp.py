"""Spans as OTLP/HTTP JSON and back: opentelemetry-proto's JSON mapping, OTLP 1.0 "JSON Protobuf
Encoding" (ids as lowercase hex, 64-bit integers as decimal strings, enums as integers).

Pure, standard library only; decoding checks every field it reads and names the bad one.
"""

from __future__ import annotations

import json
from json.encoder import encode_basestring_ascii as _json_str
from typing import Any, Iterable

from .spans import KIND_NAMES, STATUS_ERROR, SpanRecord

_HEX = frozenset(b"0123456789abcdef")


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


# One span of OtlpJsonWriter: encode_otlp's keys in its order, json.dumps's separators.
_SPAN_JSON = ('{"traceId": "%s", "spanId": "%016x", "parentSpanId": %s, "name": %s, "kind": %d, '
              '"startTimeUnixNano": "%d", "endTimeUnixNano": "%d", "attributes": [%s], "status": %s}')
_STATUS_JSON = (json.dumps({}), json.dumps({"code": STATUS_ERROR}))
_MAX_CACHED = 512            # attribute texts kept (~150 KiB at most; the recurring ones are few)


class OtlpJsonWriter:
    """The OTLP/HTTP JSON body of one resource's spans, byte for byte what json.dumps(encode_otlp(...))
    makes of them, without building the dicts: the resource and scope are encoded once, and each
    string attribute (key and value) once while it recurs (methods, services, and paths often).

    A span here is a queued hop: (its meshcore.tracecontext.TraceContext, name, kind, attributes
    dict, start ns, end ns, error). Safe to use from several threads (its caches only gain entries
    equal to any other writing).
    """

    def __init__(self, resource: Iterable[tuple[str, Any]], service: str, scope: str):
        res = dict(resource)
        res.setdefault("service.name", service)
        shell = json.dumps({"resourceSpans": [{"resource": {"attributes": _attributes(res.items())},
                                               "scopeSpans": [{"scope": {"name": scope}, "spans": [0]}]}]})
        head, _, tail = shell.rpartition("[0]")   # the spans go between these brackets
        self._head, self._tail = head + "[", "]" + tail
        # (key, str value) -> its KeyValue; a key with a value of another type never equals one
        self._strings: dict[tuple[str, str], str] = {}
        self._keys: dict[str, str] = {}           # key -> its KeyValue up to the AnyValue

    def body(self, spans: Iterable[tuple]) -> bytes:
        """The ExportTraceServiceRequest carrying `spans` (an empty one when there are none)."""
        known, attribute = self._strings.get, self._attribute
        texts = []
        for ctx, name, kind, attributes, start_ns, end_ns, error in spans:
            parent_id = ctx.parent_id
            texts.append(_SPAN_JSON % (
                ctx.trace_hex, ctx.span_id, '"%016x"' % parent_id if parent_id is not None else '""',
                _json_str(name), kind, start_ns, end_ns,
                ", ".join([known(pair) or attribute(pair) for pair in attributes.items()]),   # texts are never ""
                _STATUS_JSON[bool(error)]))
        if not texts:
            return json.dumps({"resourceSpans": []}).encode()
        return (self._head + ", ".join(texts) + self._tail).encode()

    def _attribute(self, pair: tuple[str, Any]) -> str:
        """One KeyValue as json.dumps writes it, remembered when a str (bounded: paths may not recur)."""
        key, value = pair
        head = self._keys.get(key)
        if head is None:
            head = _remember(self._keys, key, json.dumps({"key": key, "value": 0})[:-2])
        cls = value.__class__
        if cls is str:
            return _remember(self._strings, pair, f'{head}{{"stringValue": {_json_str(value)}}}}}')
        if cls is int:
            return f'{head}{{"intValue": "{value:d}"}}}}'
        return head + json.dumps(_any_value(value)) + "}"


def _remember(cache: dict, key: Any, text: str) -> str:
    if len(cache) >= _MAX_CACHED:
        cache.clear()
    cache[key] = text
    return text


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
