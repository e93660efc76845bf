"""sidecar.proxy.begin_trace, the data path's trace context: the same result as Tracing.begin_hop.

begin_trace does the two common cases itself (no trace headers; a canonical traceparent and no
B3) and hands the rest to begin_hop, so each case below is run both ways from the same randomness
and must give the same context, the same header fields and the same number of draws.
"""

from __future__ import annotations

import itertools

import pytest

from meshcore.telemetry_settings import TelemetrySettings
from meshcore.tracecontext import B3_MULTI_FORM, B3_SINGLE_FORM, continue_traceparent
from sidecar.proxy import begin_trace, canonical_traceparent, trace_of
from sidecar.tracing import Tracing

TID = "4bf92f3577b34da6a3ce929d0e0e4736"
SID = "00f067aa0ba902b7"


class Draws:
    """A fixed sequence of uniform numbers and random bits; counts what was drawn."""

    def __init__(self, uniforms, bits):
        self._uniforms = itertools.cycle(uniforms)
        self._bits = itertools.cycle(bits)
        self.drawn: list = []

    def rand(self) -> float:
        value = next(self._uniforms)
        self.drawn.append(("rand", value))
        return value

    def bits(self, k: int) -> int:
        value = next(self._bits) & ((1 << k) - 1)
        self.drawn.append(("bits", k))
        return value


def tracing_with(draws: Draws, sampling: float) -> Tracing:
    tracing = Tracing("payments", "v1", node="n1", rand=draws.rand, bits=draws.bits)
    tracing.configure(TelemetrySettings(sampling=sampling))
    return tracing


def both_ways(tp, b3, sampling, uniforms, bits):
    results = []
    for fast in (True, False):
        draws = Draws(uniforms, bits)
        tracing = tracing_with(draws, sampling)
        if fast:
            ctx, traceparent, rest = begin_trace(tracing, tp, b3)
            fields = ((b"traceparent", traceparent), *(rest or ()))
            assert rest is None or len(rest) > 0
        else:
            ctx, fields = tracing.begin_hop(tp, b3)
        if ctx is None:   # begin_trace's common cases: made when asked for, from this hop's traceparent
            assert rest is None
            ctx = trace_of(tp, traceparent)
        results.append((ctx._key(), ctx.is_child, ctx.trace_hex, fields, draws.drawn))
    return results


RANDOM_BITS = [
    [0x0123456789ABCDEF0123456789ABCDEF, 0xFEDCBA9876543210],
    [0, 0],                                    # all-zero ids become 1 (W3C: all zeros is invalid)
    [1 << 127 | 5, 1 << 63 | 7],               # the top bit set: no sign, full width
    [0xFF, 0x1],                               # small values: zero-padded to 32 and 16 digits
]


@pytest.mark.parametrize("bits", RANDOM_BITS)
@pytest.mark.parametrize("sampling, uniform", [(1.0, 0.0099), (1.0, 0.01), (0.0, 0.0), (100.0, 0.9999)])
def test_a_new_trace_is_begin_hops(bits, sampling, uniform):
    fast, slow = both_ways(None, None, sampling, [uniform], bits)
    assert fast == slow
    (name, value), = fast[3]
    assert name == b"traceparent" and value.startswith(b"00-") and len(value) == 55


CANONICAL = [f"00-{TID}-{SID}-{flags}" for flags in ("00", "01", "03", "02", "ff", "0b", "0a", "fe")]
NOT_CANONICAL = [
    f"00-{'0' * 32}-{SID}-01", f"00-{TID}-{'0' * 16}-01",           # an all-zero id
    f"01-{TID}-{SID}-01", f"ff-{TID}-{SID}-01", f"0a-{TID}-{SID}-01",  # another version
    f"00-{TID.upper()}-{SID}-01", f"00-{TID}-{SID}-0F",             # uppercase hex
    f" 00-{TID}-{SID}-01", f"00-{TID}-{SID}-01 ", f"00-{TID}-{SID}-01-",
    f"00_{TID}-{SID}-01", f"00-{TID}_{SID}-01", f"00-{TID}-{SID}_01",
    f"00-{TID[:-1]}g-{SID}-01", f"00-{TID}-{SID[:-1]}-01", f"00-{TID}-{SID}-0",
    f"00-{TID[:16]}-{TID[16:]}-{SID}", f"00-{TID}-{SID}-0x", "00-" + "-" * 52, "junk", "",
]


@pytest.mark.parametrize("value", CANONICAL + NOT_CANONICAL)
@pytest.mark.parametrize("bits", RANDOM_BITS)
def test_a_traceparent_is_begin_hops(value, bits):
    fast, slow = both_ways(value.encode(), None, 1.0, [0.5], bits)
    assert fast == slow


@pytest.mark.parametrize("value", CANONICAL + NOT_CANONICAL)
def test_canonical_is_what_continue_traceparent_takes(value):
    tp = value.encode()
    assert canonical_traceparent(tp) is (continue_traceparent(tp, 1) is not None)
    assert canonical_traceparent(tp) is (value in CANONICAL)


@pytest.mark.parametrize("b3", [
    {b"b3": b"80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"},
    {b"x-b3-traceid": b"80f198ee56343ba864fe8b2a57d3eff7", b"x-b3-spanid": b"e457b5a2e4d86bd1",
     b"x-b3-sampled": b"1"},
    {b"x-b3-sampled": b"0"},
])
@pytest.mark.parametrize("tp", [None, f"00-{TID}-{SID}-01".encode()])
def test_b3_is_left_to_begin_hop(b3, tp):
    fast, slow = both_ways(tp, b3, 1.0, [0.5], RANDOM_BITS[0])
    assert fast == slow


def test_the_cases_above_reach_both_b3_forms():
    """The B3 table is not vacuous: begin_hop reads those headers into both B3 forms."""
    draws = Draws([0.5], RANDOM_BITS[0])
    tracing = tracing_with(draws, 1.0)
    single, _ = tracing.begin_hop(None, {b"b3": b"80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"})
    multi, _ = tracing.begin_hop(None, {b"x-b3-traceid": b"80f198ee56343ba864fe8b2a57d3eff7",
                                        b"x-b3-spanid": b"e457b5a2e4d86bd1", b"x-b3-sampled": b"1"})
    assert (single.b3, multi.b3) == (B3_SINGLE_FORM, B3_MULTI_FORM)
