"""The trace context layer (`StartTrace`): this hop's trace and the header fields that carry it to the next hop."""

from __future__ import annotations

from typing import TYPE_CHECKING

from meshcore.tracecontext import TRACESTATE

from ..hoptrace import begin_trace
from ..wire import NEXT
from .base import Layer

if TYPE_CHECKING:
    from ..downstream import _Downstream
    from ..exchange import Exchange


class StartTrace(Layer):
    """trace context: this hop's trace (begin_trace) and the header fields that carry it to the next hop."""

    def __init__(self):
        Layer.__init__(self, "trace context")

    def on_request(self, down: _Downstream, ex: Exchange) -> int:
        ex.trace, ex.traceparent, ex.trace_fields = begin_trace(down.state.tracing, ex.tp, ex.b3)
        trace = ex.trace
        # No context made (begin_trace): a child exactly when the request had a traceparent.
        if ex.ts is not None and (ex.tp is not None if trace is None else trace.is_child):
            # tracestate belongs to the caller's trace: dropped when a new one starts (W3C 3.3.1).
            ex.trace_fields = (ex.trace_fields or ()) + ((TRACESTATE, ex.ts),)
        return NEXT
