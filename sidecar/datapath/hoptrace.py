"""This hop's trace context (`begin_trace`: W3C traceparent, B3 by meshcore.tracing) and the request
metrics series (`count_request`), their common cases done in C once compiled."""

from __future__ import annotations

from binascii import hexlify

from meshcore.tracecontext import TRACEPARENT, TraceContext

from ..telemetry import NO_TLS, Telemetry
from ..tracing import Tracing
from .speedups import bucket_of

try:
    import cython
    COMPILED = cython.compiled
except ImportError:  # Cython absent: this is the Python source
    COMPILED = False

_MASK64, _MASK128 = (1 << 64) - 1, (1 << 128) - 1
# 1 for a lowercase hex digit (W3C Trace Context 3.2.2: ids and flags are lowercase hex), else 0
_LOWER_HEX = bytes(1 if c in b"0123456789abcdef" else 0 for c in range(256))
_ODD_HEX = bytes(1 if c in b"13579bdf" else 0 for c in range(256))   # trace-flags bit 0: sampled
_DASH = 0x2D


def _trace_id_ok(tp: bytes, start: int, end: int) -> bool:
    """tp[start:end] is lowercase hex digits, not all zeros (W3C Trace Context 3.2.2.3, 3.2.2.4)."""
    p = tp
    table = _LOWER_HEX
    hexes = table
    zero = True
    i = start
    while i < end:
        c = p[i]
        if not hexes[c]:
            return False
        if c != 0x30:
            zero = False
        i += 1
    return not zero


def canonical_traceparent(tp: bytes) -> bool:
    """`tp` is a version-00 `traceparent` in canonical form, as meshcore.tracing.continue_traceparent
    takes it: `00-`, 32 and 16 lowercase hex digits, `-`, 2 hex digits (W3C Trace Context 3.2.2),
    neither id all zeros."""
    if len(tp) != 55:
        return False
    p = tp
    table = _LOWER_HEX
    hexes = table
    if p[0] != 0x30 or p[1] != 0x30 or p[2] != _DASH or p[35] != _DASH or p[52] != _DASH:
        return False
    if not (hexes[p[53]] and hexes[p[54]]):
        return False
    return _trace_id_ok(tp, 3, 35) and _trace_id_ok(tp, 36, 52)


def begin_trace(tracing: Tracing, tp: bytes | None, b3: dict | None) -> tuple:
    """`tracing.begin_hop(tp, b3)` as (this hop's context, the value of its `traceparent`, the other
    header fields that carry it on or None), its two common cases done here, in the compiled data
    path: no trace headers (a new trace) and a canonical `traceparent` without B3 (every mesh hop
    after the first; compiled only). In those the context is None, made by trace_of(tp, traceparent)
    only when asked for: most requests are neither sampled nor logged. The same randomness is drawn
    in the same order and gives the same context and fields (tests/unit/test_begin_trace.py);
    anything else is begin_hop's."""
    if b3 is not None:
        return _hop_fields(tracing.begin_hop(tp, b3))
    if tp is None:   # meshcore.tracing.start_hop with no parent, then trace_fields
        sampled = tracing.rand() < tracing.rate
        bits = tracing.bits
        trace_id = (bits(128) & _MASK128) or 1
        span_id = (bits(64) & _MASK64) or 1
        if not COMPILED:
            return None, b"".join((b"00-", hexlify(trace_id.to_bytes(16, "big")), b"-",
                                   hexlify(span_id.to_bytes(8, "big")), b"-01" if sampled else b"-00")), None
        # Compiled: the ids written as hex into a copy of the value's template (no bytes per id).
        value = _traceparent_template()
        w = PyBytes_AS_STRING(value)  # noqa: F821 - C API, compiled only
        put_hex64(w + _TRACE_ID_AT, trace_id >> 64)
        put_hex64(w + _TRACE_ID_AT + 16, trace_id & _MASK64)
        put_hex64(w + _SPAN_ID_AT, span_id)
        if sampled:
            w[_SAMPLED_AT] = 0x31
        return None, value, None
    if not (COMPILED and canonical_traceparent(tp)):
        # As Python, begin_hop's continue_traceparent (bytes methods in C) beats this byte loop 3:1.
        return _hop_fields(tracing.begin_hop(tp, b3))
    # meshcore.tracing.continue_traceparent: the caller's trace and sampling decision, a new span
    span_id = (tracing.bits(64) & _MASK64) or 1
    t = tp
    table = _ODD_HEX
    odd = table
    value = _traceparent_template()
    w = PyBytes_AS_STRING(value)  # noqa: F821
    memcpy(w, t, 36)  # noqa: F821 - the caller's `00-` trace-id `-`
    put_hex64(w + _SPAN_ID_AT, span_id)
    if odd[t[54]]:
        w[_SAMPLED_AT] = 0x31
    return None, value, None


def _hop_fields(hop: tuple) -> tuple:
    """begin_hop's (context, fields) as begin_trace returns it: (context, traceparent, the rest or None)."""
    ctx, fields = hop
    if fields[0][0] != TRACEPARENT:
        raise ValueError("begin_hop: the first trace field is not traceparent")
    return ctx, fields[0][1], fields[1:] or None


# The traceparent value begin_trace writes (`00-` trace-id `-` span-id `-0` flag), the offsets of its
# parts, and the lowercase hex digits it writes them with (W3C Trace Context 3.2.2).
_TRACEPARENT_VALUE = b"00-" + b"0" * 32 + b"-" + b"0" * 16 + b"-00"


def _traceparent_template() -> bytes:
    """Compiled only: a new bytes object holding _TRACEPARENT_VALUE, for begin_trace to write into."""
    template = _TRACEPARENT_VALUE
    src = template
    return PyBytes_FromStringAndSize(src, len(template))  # noqa: F821


# Offsets in a traceparent value: `00-` trace-id `-` span-id `-0` flag (W3C Trace Context 3.2.2).
_TRACE_ID_AT, _SPAN_ID_AT, _SAMPLED_AT = 3, 36, 54
globals().update(_SAMPLED_AT=_SAMPLED_AT)   # C ints here (hoptrace.pxd): the module dict gets the one
# the metrics layer reads (a sampled flag in the traceparent value) too


def trace_of(tp: bytes | None, traceparent: bytes) -> TraceContext:
    """The context begin_trace(tracing, tp, None) returned as None, from the value of this hop's
    traceparent that it returned with it."""
    span_id = int(traceparent[_SPAN_ID_AT:_SPAN_ID_AT + 16], 16)
    sampled = traceparent[_SAMPLED_AT] == 0x31   # b"-01": sampled, b"-00": not
    if tp is None:
        return TraceContext(int(traceparent[_TRACE_ID_AT:_TRACE_ID_AT + 32], 16), span_id, None, sampled)
    ctx = TraceContext(0, span_id, None, sampled)
    ctx._header = tp   # the caller's canonical traceparent: its ids are decoded when read
    return ctx


def count_request(telemetry: Telemetry, reporter: str, source: str, source_version: str, destination: str,
                  version: str, status: int, flags: str, ms: float, grpc_status: str | None = None,
                  security: str = NO_TLS) -> None:
    """telemetry.record_request(reporter, source, source_version, destination, destination, version,
    status, flags, ms, protocol, grpc_status, security): a series already there is counted here,
    compiled; a new one by record_request. A gRPC call (its answer has a grpc-status) is
    request_protocol grpc."""
    series = telemetry.series
    if grpc_status is None:
        s = series.get((reporter, source, source_version, destination, destination, version, "http", status,
                        flags, "", security))
    else:
        s = series.get((reporter, source, source_version, destination, destination, version, "grpc", status,
                        flags, grpc_status, security))
    if s is None:
        telemetry.record_request(reporter, source, source_version, destination, destination, version, status,
                                 flags, ms, "http" if grpc_status is None else "grpc", grpc_status or "", security)
        return
    s.count += 1
    s.sum += ms
    s.buckets[bucket_of(ms)] += 1

