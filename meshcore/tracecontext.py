"""Trace context of one hop: W3C `traceparent` and B3 decoded, sampling decided, header fields made.

Pure, standard library only. Propagation follows W3C Trace Context (https://www.w3.org/TR/trace-context/,
`traceparent`) and understands B3 (https://github.com/openzipkin/b3-propagation, single `b3` and multi
`x-b3-*`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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
    """The fast path of start_hop + trace_fields for a canonical version-00 `traceparent` and no B3
    (every mesh hop after the first): this hop's context and the value of its `traceparent`, or
    None when the slow path must decide.

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
    return ctx, b"%b%016x-%b" % (tp[:36], span_id, b"01" if sampled else b"00")


def trace_fields(ctx: TraceContext) -> tuple:
    """The header fields, (name, value) pairs with lowercase names, that carry `ctx` to the next hop:
    `traceparent` first and always, then B3 in the form the request came with. The protocol's codec
    writes them (HTTP/1.1 lines, HTTP/2 fields)."""
    flags = FLAG_SAMPLED if ctx.sampled else 0
    traceparent = (TRACEPARENT, b"00-%032x-%016x-%02x" % (ctx.trace_id, ctx.span_id, flags))
    if ctx.b3 == B3_NONE:
        return (traceparent,)
    tid = b"%016x" % ctx.trace_id if ctx.short else b"%032x" % ctx.trace_id
    sampled = b"1" if ctx.sampled else b"0"
    if ctx.b3 == B3_SINGLE_FORM:
        single = b"%b-%016x-%b" % (tid, ctx.span_id, sampled)
        if ctx.parent_id is not None:
            single += b"-%016x" % ctx.parent_id
        return traceparent, (B3_SINGLE, single)
    fields = (traceparent, (B3_TRACE_ID, tid), (B3_SPAN_ID, b"%016x" % ctx.span_id), (B3_SAMPLED, sampled))
    if ctx.parent_id is not None:
        fields += ((B3_PARENT_SPAN_ID, b"%016x" % ctx.parent_id),)
    return fields
