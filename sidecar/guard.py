"""meshcore.limits on the data path: one `ConnectionGuard` per HTTP listener admits connections up to
`max_connections` and ends those that send a head too slowly, stall a body, or sit idle.

One timer per listener, not per connection or request: while connections are open, a sweep every
`tick` looks at each one's phase (`_Downstream.cur`, `queue`) and, for the idle and body phases, asks
the kernel how long ago data last arrived (TCP_INFO `tcpi_last_data_recv`), so the per-read path
costs nothing. A connection whose reading the proxy paused (backpressure) is never timed out: the
wait is the proxy's, not the client's. Requests waiting for their response are the route's
timeouts' business (mesh.timeout), not these.

- head timeout: a request head not complete `head_timeout` after its first byte: 408, closed (slowloris);
- body timeout: no byte of a request body for `body_timeout`: 408 `SI` when no response began, else reset;
- idle timeout: no request for `idle_timeout`: closed (RFC 9112 9.5: a server may close an idle
  persistent connection at any time);
- connections: above `max_connections` open ones (the listener's direction gauge, tunnels included)
  a new connection is reset at once.
"""

from __future__ import annotations

import asyncio
from time import monotonic
from typing import Any, Callable

from meshcore.limits import DEFAULT_LIMITS, Limits

from .tcpinfo import read_tcp_info

FLAG_STREAM_IDLE = "SI"        # Envoy's response flag of a stream idle timeout
_HEAD_TIMEOUT = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                 b"content-length: 21\r\nx-mesh-flags: SI\r\nconnection: close\r\n\r\nrequest head timeout\n")
_IDLE, _BODY = 1, 2            # the phases a sweep times by the kernel's last-data clock


def last_data_recv(transport: asyncio.BaseTransport) -> float | None:
    """Seconds since data last arrived on the connection (TCP_INFO), or None when unreadable."""
    info = read_tcp_info(transport)
    return None if info is None else info.last_data_recv_ms / 1000.0


class ConnectionGuard:
    """The time and connection limits of one listener (see the module docstring)."""

    __slots__ = ("limits", "conns", "timer", "tick", "quiet_for", "refused", "timed_out")

    def __init__(self, limits: Limits = DEFAULT_LIMITS,
                 quiet_for: Callable[[Any], float | None] = last_data_recv):
        self.limits = limits
        self.conns: dict[Any, tuple[int, float]] = {}   # _Downstream -> (phase, when the sweep saw it begin)
        self.timer: asyncio.TimerHandle | None = None
        timeouts = [t for t in (limits.head_timeout, limits.idle_timeout, limits.body_timeout) if t > 0]
        # A timeout is kept to within a quarter of itself (at most a second late, at least 50 ms apart).
        self.tick = max(0.05, min(1.0, min(timeouts) / 4)) if timeouts else 0.0
        self.quiet_for = quiet_for
        self.refused = 0       # connections reset at max_connections
        self.timed_out = 0     # connections ended by a timeout

    def admit(self, down) -> bool:
        """A new connection (already counted in its direction's gauge): False when it was reset."""
        if down.stack.gauge.get() > self.limits.max_connections:
            self.refused += 1
            down.closing = True
            down.transport.abort()
            return False
        if self.tick:
            self.conns[down] = (0, monotonic())
            if self.timer is None:
                self.timer = down.loop.call_later(self.tick, self._sweep, down.loop)
        return True

    def release(self, down) -> None:
        """The connection is gone."""
        self.conns.pop(down, None)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        self.timer = None
        now = monotonic()
        limits = self.limits
        conns = self.conns
        for down, (phase, since) in list(conns.items()):
            if down.closing or down.switched:
                del conns[down]     # closed, or a byte tunnel now (not HTTP: no HTTP limits)
                continue
            ex = down.cur
            if ex is not None and not ex.head_done:
                if limits.head_timeout and now - ex.start > limits.head_timeout:
                    self._end_head(down, ex)
                continue
            if ex is not None:
                now_phase, limit = _BODY, limits.body_timeout
            elif not down.queue and down.raw is None:
                now_phase, limit = _IDLE, limits.idle_timeout
            else:
                now_phase, limit = 0, 0.0   # responses pending (the route's timeouts), or sniffing
            if now_phase != phase:
                conns[down] = (now_phase, now)
                continue
            if not limit or down.paused or now - since <= limit:
                continue
            quiet = self.quiet_for(down.transport)
            if quiet is None or quiet > limit:
                self._end_stalled(down, ex)
        if conns:
            self.timer = loop.call_later(self.tick, self._sweep, loop)

    def _end_head(self, down, ex) -> None:
        self.timed_out += 1
        if down.queue and down.queue[0] is ex:
            down.transport.write(_HEAD_TIMEOUT)
            down._close()
        else:
            down._abort()   # responses before it are still owed: nothing can be answered in order

    def _end_stalled(self, down, ex) -> None:
        self.timed_out += 1
        if ex is None:
            down._close()   # idle: nothing in flight
        elif ex.dispatched and not ex.resp_started:
            down._reply(ex, 408, FLAG_STREAM_IDLE, b"request body timeout\n", close=True)
        else:
            down._abort()

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.conns.clear()


def body_over_limit(down, ex, size: int) -> bool:
    """Gateway: `size` more request body bytes; over `max_body` the request is answered 413 (or
    reset once its response began) and True: the rest of the body is dropped."""
    ex.body_seen += size
    if ex.body_seen <= down.listener.max_body:
        return False
    if not ex.resp_done:
        if ex.dispatched and not ex.resp_started:
            down._reply(ex, 413, "-", b"request body too large\n", close=True)
        else:
            down._abort()
    return True
