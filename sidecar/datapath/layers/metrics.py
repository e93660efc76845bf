"""The metrics layer (`Metrics`): at an exchange's end, its Istio request series, and its span and access
log line when sampled, logged or failed; `metric_labels` names the exchange's series."""

from __future__ import annotations

from typing import TYPE_CHECKING

from meshcore.telemetry_settings import ACCESS_FULL

from ...routing import UNKNOWN
from ...telemetry import MUTUAL_TLS, NO_FLAGS, NO_TLS, REPORTER_DESTINATION, REPORTER_SOURCE
from ..hoptrace import _SAMPLED_AT, count_request, trace_of
from ..speedups import monotonic
from .base import Layer

if TYPE_CHECKING:
    from ..exchange import Exchange
    from ..respond import _Responder


class Metrics(Layer):
    """metrics: the chain's outermost layer; its end runs last, once the others have released theirs."""

    def __init__(self):
        Layer.__init__(self, "metrics", True)

    def on_end(self, down: _Responder, ex: Exchange) -> None:
        state = down.state
        ms = (monotonic() - ex.start) * 1000.0
        cluster = ex.cluster
        reporter, src, srcv, dst, ver = metric_labels(down, ex)
        if reporter == REPORTER_DESTINATION:
            security = MUTUAL_TLS if down.peer_identity else NO_TLS   # the caller's verified certificate
        else:
            security = MUTUAL_TLS if cluster is not None and cluster.mesh and state.tls is not None else NO_TLS
        count_request(state.telemetry, reporter, src, srcv, dst, ver, ex.status, ex.flags, ms, ex.grpc_status,
                      security)
        trace = ex.trace
        traceparent = ex.traceparent
        if trace is None and traceparent is None:
            return   # never dispatched: no trace began
        # The C tests first: the tracing settings' attribute read only decides the quiet, unsampled case.
        if ((trace.sampled if trace is not None else traceparent[_SAMPLED_AT] == 0x31)
                or ex.status >= 500 or ex.status == 0 or ex.flags != NO_FLAGS
                or state.tracing.access_mode == ACCESS_FULL):
            if trace is None:
                trace = ex.trace = trace_of(ex.tp, traceparent)
            upstream = None
            if cluster is not None and ex.index is not None:
                key = cluster.keys[ex.index]
                upstream = f"{key[0]}:{key[1]}"
            # positional: a keyword call from C builds a dict of them for every line
            state.tracing.finish(trace, down.stack.direction, ex.method, ex.target, ex.status, ex.flags, ms, src,
                                 srcv, dst, ver, upstream, ex.attempt + 1, NO_FLAGS)


def metric_labels(down: _Responder, ex: Exchange) -> tuple:
    """(reporter, source workload, its version, destination service, its version) of `ex`."""
    state = down.state
    if down.stack.reporter == REPORTER_DESTINATION:
        sent = ex.source_version   # bytes (typed in the .pxd: a C decode, not a method call)
        srcv = sent.decode("latin-1") if sent else UNKNOWN
        return REPORTER_DESTINATION, down.caller_of(ex), srcv, state.table.own or state.service, state.version
    cluster = ex.cluster
    if cluster is None:
        dst, ver = UNKNOWN, UNKNOWN
    else:
        dst = cluster.name
        ver = cluster.endpoints[ex.index].version if ex.index is not None else UNKNOWN
    return REPORTER_SOURCE, down.stack.source_name, state.version, dst, ver
