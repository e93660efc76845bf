"""The circuit breaker layer (`Breaker`): a request slot of the destination's breaker, overflow 503 UO."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..wire import FLAG_OVERFLOW, HELD, NEXT
from .base import Layer

if TYPE_CHECKING:
    from ..downstream import _Downstream
    from ..exchange import Exchange


class Breaker(Layer):
    """circuit breaker: a request slot of the service's breaker, overflow 503 UO (also guards connects)."""

    def __init__(self):
        Layer.__init__(self, "circuit breaker", True)

    def on_request(self, down: _Downstream, ex: Exchange) -> int:
        lane = ex.lane
        if lane is None:
            return NEXT
        if not lane.breaker.try_acquire_request():
            down._reply(ex, 503, FLAG_OVERFLOW, b"upstream overflow\n")
            return HELD
        ex.admitted = True
        return NEXT

    def on_end(self, down: _Downstream, ex: Exchange) -> None:
        if ex.admitted:
            ex.admitted = False
            ex.lane.breaker.release_request()
