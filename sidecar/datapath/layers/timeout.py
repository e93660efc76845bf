"""The timeout layer (`Timeout`): the whole request's deadline (gRPC's capped by the mesh's), else 504 UT."""

from __future__ import annotations

from typing import TYPE_CHECKING

from meshcore.grpc import cap_grpc_timeout

from ..wire import NEXT
from .base import Layer

if TYPE_CHECKING:
    from ..downstream import _Downstream
    from ..exchange import Exchange


class Timeout(Layer):
    """timeout: the whole request's (a fault delay, backoffs and every try), 504 UT."""

    def __init__(self):
        Layer.__init__(self, "timeout", True)

    def on_request(self, down: _Downstream, ex: Exchange) -> int:
        lane = ex.lane
        timeout = lane.timeout if lane is not None else None
        if ex.grpc_timeout is not None:
            # gRPC's own deadline is honoured, the mesh's timeout its cap; the next hop is told the
            # smaller one (gRPC over HTTP/2: grpc-timeout).
            timeout, sent_on = cap_grpc_timeout(timeout, ex.grpc_timeout)
            ex.grpc_timeout = sent_on.encode("latin-1") if sent_on is not None else None
        if timeout is not None:
            ex.timer = down.loop.call_later(timeout, down._timed_out, ex)
        return NEXT

    def on_end(self, down: _Downstream, ex: Exchange) -> None:
        if ex.timer is not None:
            ex.timer.cancel()
            ex.timer = None
