"""The retries layer (`Retries`): the retry budget counts the request, and a retriable one's body is held."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..wire import NEXT
from .base import Layer

if TYPE_CHECKING:
    from ..downstream import _Downstream
    from ..exchange import Exchange


class Retries(Layer):
    """retries: the budget counts the request; the body is held (HOLD_LIMIT) for a retry by the
    response head's decision (_Dispatcher._response_head: backoff, budget, per-try timeout, URX)."""

    def __init__(self):
        Layer.__init__(self, "retries + budget", True)

    def on_request(self, down: _Downstream, ex: Exchange) -> int:
        lane = ex.lane
        if lane is None:
            return NEXT
        lane.budget.start_request()
        ex.budgeted = True
        if lane.retry_on is not None:
            ex.retry_on = lane.retry_on
            ex.keep_held = True
        return NEXT

    def on_end(self, down: _Downstream, ex: Exchange) -> None:
        if ex.budgeted:
            ex.budgeted = False
            ex.lane.budget.finish_request()
        if ex.in_retry:
            ex.in_retry = False
            ex.lane.budget.finish_retry()
        if ex.try_timer is not None:
            ex.try_timer.cancel()
            ex.try_timer = None
        if ex.wait is not None:
            ex.wait.cancel()
            ex.wait = None
