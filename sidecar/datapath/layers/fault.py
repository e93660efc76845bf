"""The fault layer (`Fault`): an injected delay (DI) first, then an injected abort (FI), Envoy's order."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from ..wire import FLAG_FAULT_ABORT, FLAG_FAULT_DELAY, HELD, NEXT, _join_flags
from .base import Layer

if TYPE_CHECKING:
    from ..downstream import _Downstream
    from ..exchange import Exchange


class Fault(Layer):
    """fault: delay (DI) first, then abort (FI), Envoy's order (`fault(traffic, rand, rand)`)."""

    __slots__ = ("fault",)

    def __init__(self, fault: Callable):
        Layer.__init__(self, "fault", True)
        self.fault = fault

    def on_request(self, down: _Downstream, ex: Exchange) -> int:
        lane = ex.lane
        if lane is None or lane.fault is None:
            return NEXT
        rand = down.state.random
        abort, delay = self.fault(lane.tr, rand(), rand())
        if delay > 0:
            ex.flags = _join_flags(ex.flags, FLAG_FAULT_DELAY)
            ex.fault_abort = abort or 0
            ex.wait = down.loop.call_later(delay, down._fault_delayed, ex)
            return HELD
        if abort is not None:
            down._reply(ex, abort, FLAG_FAULT_ABORT, b"fault filter abort\n")
            return HELD
        return NEXT

    def on_end(self, down: _Downstream, ex: Exchange) -> None:
        if ex.wait is not None:
            ex.wait.cancel()
            ex.wait = None
