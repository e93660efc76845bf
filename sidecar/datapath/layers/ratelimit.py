"""The inbound rate limit layer (`RateLimit`) and its decision (`limit_inbound`): 429 RL past the bucket."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ..speedups import monotonic
from ..wire import FLAG_RATE_LIMITED, HELD, NEXT, Reply
from .base import Layer

if TYPE_CHECKING:
    from ..downstream import _Downstream
    from ..exchange import Exchange


class RateLimit(Layer):
    """rate limit (inbound): the local service's token bucket (limit_inbound), 429 RL."""

    def __init__(self):
        Layer.__init__(self, "rate limit")

    def on_request(self, down: _Downstream, ex: Exchange) -> int:
        limited = limit_inbound(down, ex)
        if limited is None:
            return NEXT
        down._answer(ex, limited)
        return HELD


def limit_inbound(down: _Downstream, ex: Exchange) -> Reply | None:
    """Inbound rate limit (`mesh.ratelimit` of the local service): 429, `retry-after`, flag RL."""
    limiter = down.state.inbound_limiter
    if limiter is None:
        return None
    ok, after = limiter.check(down.caller_of(ex) if limiter.per_caller else "", monotonic())
    if ok:
        return None
    seconds = max(1, math.ceil(after)) if after != math.inf else 3600
    return Reply(429, FLAG_RATE_LIMITED, b"rate limited\n", headers=((b"retry-after", b"%d" % seconds),))
