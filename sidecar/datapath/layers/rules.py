"""The rules and split layer (`Rules`): the version subset a request goes to; none healthy: 503 UH."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from ..wire import FLAG_NO_HEALTHY_UPSTREAM, HELD, NEXT
from .base import Layer

if TYPE_CHECKING:
    from ..downstream import _Downstream
    from ..exchange import Exchange


class Rules(Layer):
    """rules and split: a version's endpoints (`choose(ex, traffic, rand)`); none: 503 UH."""

    __slots__ = ("choose",)

    def __init__(self, choose: Callable):
        Layer.__init__(self, "rules + split")
        self.choose = choose

    def on_request(self, down: _Downstream, ex: Exchange) -> int:
        lane = ex.lane
        if lane is None or lane.rules is None:
            return NEXT
        sub = self.choose(ex, lane.tr, down.state.random())
        if sub is None:
            down._reply(ex, 503, FLAG_NO_HEALTHY_UPSTREAM, b"no healthy upstream for the version\n")
            return HELD
        ex.subset = sub
        ex.cluster = sub.cluster
        return NEXT
