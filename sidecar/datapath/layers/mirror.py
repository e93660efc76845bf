"""The mirror layer (`Mirror`): a fire-and-forget copy of the request to a version subset, sent once it is whole."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from ..wire import NEXT
from .base import Layer

if TYPE_CHECKING:
    from ..downstream import _Downstream
    from ..exchange import Exchange


class Mirror(Layer):
    """mirror: a fire-and-forget copy to `choose(traffic, rand)`'s subset, sent once the request is whole."""

    __slots__ = ("choose",)

    def __init__(self, choose: Callable):
        Layer.__init__(self, "mirror")
        self.choose = choose

    def on_request(self, down: _Downstream, ex: Exchange) -> int:
        lane = ex.lane
        if lane is None or lane.mirror is None or ex.upgrade is not None:
            return NEXT   # an upgrade (a WebSocket) is a conversation, not a request to copy
        mirror = self.choose(ex.traffic, down.state.random())
        if mirror is not None:
            ex.mirror = mirror
            ex.keep_held = True
            if ex.req_done:
                down._send_mirror(ex)
        return NEXT
