"""Traffic mirroring (shadowing): fire-and-forget copies of requests to another version of a service.

The proxy hands over a complete request (head and held body) and an endpoint; the copy goes out on a
connection of its own (kept alive and reused per endpoint), the response is read and dropped. A copy
never delays or fails the primary request: errors are counted and logged at debug level, at most
`MAX_IN_FLIGHT` copies are outstanding (more are dropped), and each has `MIRROR_TIMEOUT_S`.
Like Envoy, the copy's Host gets the suffix `-shadow` (`payments:8080` -> `payments-shadow:8080`), so
the shadow can tell copies from real traffic.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from httptools import HttpParserError, HttpResponseParser

log = logging.getLogger("sidecar.mirror")

MAX_IN_FLIGHT = 256
MAX_IDLE = 8               # idle mirror connections kept per endpoint
MIRROR_TIMEOUT_S = 10.0

Key = tuple[str, int]


def shadow_host(host: bytes) -> bytes:
    """Envoy's shadow authority: `-shadow` after the host name, before any port."""
    if host.startswith(b"["):
        end = host.find(b"]")
        if end > 0:
            return host[:end + 1] + b"-shadow" + host[end + 1:]
    name, sep, port = host.rpartition(b":")
    if sep and port.isdigit() and b":" not in name:
        return name + b"-shadow:" + port
    return host + b"-shadow"


class _MirrorConn(asyncio.Protocol):
    """One connection to a shadow endpoint: writes a request, reads and drops its response."""

    __slots__ = ("sender", "key", "transport", "parser", "status", "busy", "done", "keep", "timer", "head_only",
                 "tag")

    def __init__(self, sender: "MirrorSender", key: Key):
        self.sender = sender
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser: HttpResponseParser | None = None
        self.status = 0
        self.busy = False
        self.done = False
        self.keep = False
        self.timer: asyncio.TimerHandle | None = None
        self.head_only = False
        self.tag: Any = None

    def send(self, parts: list, head_only: bool, tag: Any) -> None:
        self.parser = HttpResponseParser(self)
        self.status = 0
        self.busy = True
        self.done = False
        self.keep = False
        self.head_only = head_only
        self.tag = tag
        self.timer = asyncio.get_running_loop().call_later(MIRROR_TIMEOUT_S, self._expired)
        self.transport.writelines(parts)

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if not self.busy:
            self.transport.close()
            return
        try:
            self.parser.feed_data(data)
        except HttpParserError:
            self.keep = False
            self.done = True
        if self.done:
            self._finish()

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if self.head_only and self.status >= 200:
            self.done = True  # a HEAD response has no body (httptools cannot be told)

    def on_message_complete(self) -> None:
        if self.status >= 200:
            self.keep = self.parser.should_keep_alive() and not self.head_only
            self.done = True

    def _expired(self) -> None:
        self.timer = None
        if self.busy:
            self.keep = False
            self._finish()

    def _finish(self) -> None:
        if not self.busy:
            return
        self.busy = False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.sender._finished(self, self.status if self.done else 0, self.keep)

    def connection_lost(self, exc: Exception | None) -> None:
        self.keep = False
        self.sender._forget(self)
        if self.busy:
            self._finish()


class MirrorSender:
    """Sends request copies. `connect(key, protocol_factory, tag)` is a coroutine function opening a
    connection (TLS and peer checks are its business); `on_result(tag, status)` hears each outcome."""

    def __init__(self, connect: Callable[[Key, Callable[[], asyncio.Protocol], Any], Any],
                 on_result: Callable[[Any, int], None] | None = None):
        self._connect = connect
        self._on_result = on_result
        self.idle: dict[Key, list[_MirrorConn]] = {}
        self.in_flight = 0
        self.sent = 0
        self.dropped = 0
        self.failed = 0

    def send(self, key: Key, parts: list, *, head_only: bool = False, tag: Any = None) -> bool:
        """Send `parts` (a whole request) to `key` in the background; False when dropped (too many)."""
        if self.in_flight >= MAX_IN_FLIGHT:
            self.dropped += 1
            return False
        self.in_flight += 1
        self.sent += 1
        lst = self.idle.get(key)
        while lst:
            conn = lst.pop()
            if conn.transport is not None and not conn.transport.is_closing():
                conn.send(parts, head_only, tag)
                return True
        asyncio.get_running_loop().create_task(self._open(key, parts, head_only, tag))
        return True

    async def _open(self, key: Key, parts: list, head_only: bool, tag: Any) -> None:
        try:
            _, conn = await self._connect(key, lambda: _MirrorConn(self, key), tag)
        except asyncio.CancelledError:
            self.in_flight -= 1
            raise
        except Exception as exc:  # noqa: BLE001 - a shadow that cannot be reached only costs a count
            log.debug("mirror connect to %s:%s failed: %r", key[0], key[1], exc)
            self.in_flight -= 1
            self.failed += 1
            if self._on_result is not None:
                self._on_result(tag, 0)
            return
        conn.send(parts, head_only, tag)

    def _finished(self, conn: _MirrorConn, status: int, keep: bool) -> None:
        self.in_flight -= 1
        if not status:
            self.failed += 1
        if self._on_result is not None:
            self._on_result(conn.tag, status)
        conn.tag = None
        lst = self.idle.setdefault(conn.key, [])
        if keep and len(lst) < MAX_IDLE and not conn.transport.is_closing():
            lst.append(conn)
        else:
            conn.transport.close()

    def _forget(self, conn: _MirrorConn) -> None:
        lst = self.idle.get(conn.key)
        if lst and conn in lst:
            lst.remove(conn)

    def close(self) -> None:
        for lst in self.idle.values():
            for conn in lst:
                if conn.transport is not None:
                    conn.transport.close()
        self.idle.clear()
