"""Idle keep-alive upstream connections per endpoint (`UpstreamPools`), and every open one (`live`)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from .speedups import monotonic
from .wire import POOL_IDLE_TIMEOUT_S, POOL_MAX_IDLE

if TYPE_CHECKING:
    from .upstream import _Upstream

class UpstreamPools:
    """Idle keep-alive upstream connections, per endpoint key (address, port); newest reused first.

    `live` registers every open HTTP upstream connection per key (idle or carrying an exchange;
    added when connected, removed when lost: no work per request), so that the exchanges in flight
    to an endpoint a snapshot removes can be found (`ProxyState.apply_snapshot`).
    """

    def __init__(self, max_idle: int = POOL_MAX_IDLE, idle_timeout: float = POOL_IDLE_TIMEOUT_S):
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.idle: dict[tuple[str, int], list[_Upstream]] = {}
        self.live: dict[tuple[str, int], set[_Upstream]] = {}
        self.count = 0      # idle connections now
        self.opened = 0     # upstream connections ever opened (HTTP)
        self._timer: asyncio.TimerHandle | None = None

    def acquire(self, key: tuple[str, int]) -> _Upstream | None:
        lst = self.idle.get(key)
        if not lst:
            return None
        now = monotonic()
        while lst:
            up = lst.pop()
            self.count -= 1
            up.pooled = False
            if up.closed or now - up.idle_since > self.idle_timeout:
                up.close()
                continue
            return up
        return None

    def release(self, up: _Upstream) -> None:
        if up.closed or up.doomed or up.transport.is_closing():
            up.close()
            return
        if up.read_paused:
            up.read_paused = False
            up.transport.resume_reading()
        lst = self.idle.get(up.key)
        if lst is None:
            lst = self.idle[up.key] = []
        if len(lst) >= self.max_idle:
            up.close()
            return
        up.idle_since = monotonic()
        up.pooled = True
        lst.append(up)
        self.count += 1
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._sweep_every(), self._sweep)

    def register(self, up: _Upstream) -> None:
        conns = self.live.get(up.key)
        if conns is None:
            conns = self.live[up.key] = set()
        conns.add(up)

    def unregister(self, up: _Upstream) -> None:
        conns = self.live.get(up.key)
        if conns is not None:
            conns.discard(up)
            if not conns:
                del self.live[up.key]

    def discard(self, up: _Upstream) -> None:
        if up.pooled:
            up.pooled = False
            lst = self.idle.get(up.key)
            if lst is not None and up in lst:
                lst.remove(up)
                self.count -= 1

    def _sweep_every(self) -> float:
        return max(0.05, min(15.0, self.idle_timeout / 2))

    def _sweep(self) -> None:
        self._timer = None
        limit = monotonic() - self.idle_timeout
        for key, lst in list(self.idle.items()):
            keep = [up for up in lst if not up.closed and up.idle_since >= limit]
            for up in lst:
                if up.closed or up.idle_since < limit:
                    up.pooled = False
                    up.close()
            self.count -= len(lst) - len(keep)
            if keep:
                self.idle[key] = keep
            else:
                del self.idle[key]
        if self.count:
            self._timer = asyncio.get_running_loop().call_later(self._sweep_every(), self._sweep)

    def drop(self, gone: set) -> None:
        """Close idle connections to endpoints that left the mesh: a peer whose network namespace
        vanished sends no FIN, so its pooled connections would swallow requests silently."""
        for key in [k for k in self.idle if k in gone]:
            for up in self.idle.pop(key):
                up.pooled = False
                up.close()
                self.count -= 1

    def close(self) -> None:
        """Close every idle connection (in-use ones close when their exchange ends)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for lst in self.idle.values():
            for up in lst:
                up.pooled = False
                up.close()
        self.idle.clear()
        self.count = 0

