"""The client side of HTTP/2 (RFC 9113): H2Upstream is one connection to an endpoint, multiplexing
request streams up to the peer's SETTINGS_MAX_CONCURRENT_STREAMS; H2Pool keeps an endpoint's
connections (h2c with prior knowledge, or TLS with ALPN `h2`) and opens another when they are full.
The pool is per endpoint: choosing the endpoint per request is the caller's (the balancing layer's)."""

from __future__ import annotations

import asyncio
import ssl as ssl_module
from typing import Callable

import h2.events
import h2.exceptions

from .h2 import (PROTOCOL_ERROR, ConnectionGone, H2Error, Limits, MalformedHead, RequestHead, ResponseHead,
                 parse_response_head, request_headers)
from .h2conn import H2Connection, H2Stream

ALPN_H2 = "h2"   # RFC 9113 3.2


class NoH2(H2Error):
    """The peer's TLS did not pick `h2` by ALPN: speak HTTP/1.1 (alpn) to it instead."""

    def __init__(self, alpn: str | None):
        self.alpn = alpn
        super().__init__(f"the peer does not offer h2 (ALPN picked {alpn!r})")


class ConnectFailed(ConnectionGone):
    """No connection to the endpoint (refused, timed out, TLS failed): no stream was sent."""

    def __init__(self, reason: str):
        super().__init__(reason, retriable=True)


class H2ClientStream(H2Stream):
    """A request stream: the request body (send_data(), send_trailers(), end()); response() for the
    response head, then its body (read()) and trailers; reset() to cancel."""

    __slots__ = ("request", "_head")

    def __init__(self, conn: H2Upstream, stream_id: int, request: RequestHead):
        super().__init__(conn, stream_id)
        self.request = request
        self._head: asyncio.Future = asyncio.get_running_loop().create_future()

    async def response(self) -> ResponseHead:
        """The final response head (1xx skipped); raises the stream's error (StreamReset,
        ConnectionGone) when it fails first."""
        if not self._head.done():
            await asyncio.shield(self._head)
        if self._head.exception() is not None:
            raise self._head.exception()
        return self._head.result()

    def _fail(self, error: H2Error) -> None:
        super()._fail(error)
        if not self._head.done():
            self._head.set_exception(error)
            self._head.exception()   # retrieved: a caller that never asks is no "never retrieved" error

    def _end_in(self, trailers=None) -> None:
        super()._end_in(trailers)
        if not self._head.done():   # ended without a final head: h2 rejects that, so never reached
            self._fail(ConnectionGone("stream ended without a response"))


class H2Upstream(H2Connection):
    """An asyncio protocol for one client connection: open_stream() sends a request head on a new
    stream. `ready` resolves with the peer's first SETTINGS (or fails when the connection ends first
    or ALPN picked another protocol)."""

    client_side = True

    def __init__(self, limits: Limits | None = None, on_change=None):
        super().__init__(limits)
        self.ready: asyncio.Future = asyncio.get_running_loop().create_future()
        self.on_change = on_change   # called when capacity frees or the connection ends (the pool's wakeup)
        self.max_streams_seen = 0
        self._full = False

    def connection_made(self, transport) -> None:
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None and ssl_object.selected_alpn_protocol() != ALPN_H2:
            self.transport = transport
            self.alpn = ssl_object.selected_alpn_protocol()
            self.closed = True
            self.close_reason = "ALPN did not pick h2"
            self.ready.set_exception(NoH2(self.alpn))
            self.ready.exception()
            transport.close()
            return
        super().connection_made(transport)

    @property
    def capacity(self) -> int:
        """How many more streams this connection may open now."""
        if self.closed or self.goaway_sent or self.goaway_received or self._full:
            return 0
        peer_max = self.h2.remote_settings.max_concurrent_streams
        return max(0, min(peer_max, self.limits.max_concurrent_streams) - len(self.streams))

    def open_stream(self, head: RequestHead, end: bool = False) -> H2ClientStream:
        """Send `head` on a new stream (END_STREAM too when end: no body)."""
        if self.closed:
            raise ConnectionGone(self.close_reason or "connection closed", retriable=True)
        try:
            sid = self.h2.get_next_available_stream_id()
        except h2.exceptions.NoAvailableStreamIDError:
            self.goaway()   # stream ids used up (RFC 9113 5.1.1): drain and let the pool open another
            raise ConnectionGone("stream ids exhausted", retriable=True) from None
        stream = H2ClientStream(self, sid, head)
        try:
            self.h2.send_headers(sid, request_headers(head), end_stream=end)
        except h2.exceptions.TooManyStreamsError:
            self._full = True   # the peer lowered its limit under our count: no slot until a stream ends
            raise ConnectionGone("the peer's stream limit is reached", retriable=True) from None
        except h2.exceptions.ProtocolError as exc:
            raise ConnectionGone(f"cannot open a stream: {exc}", retriable=True) from None
        self.streams[sid] = stream
        self.max_streams_seen = max(self.max_streams_seen, len(self.streams))
        if end:
            stream._out_end = stream._out_closed = True
        self._write()
        return stream

    def _on_other_event(self, event) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            s = self.streams.get(event.stream_id)
            if s is None:
                return
            try:
                head = parse_response_head(event.headers)
            except MalformedHead:
                s.reset(PROTOCOL_ERROR)   # RFC 9113 8.1.1
                return
            if not s._head.done():
                s._head.set_result(head)

    def _on_settings(self, event) -> None:
        if not self.ready.done():
            self.ready.set_result(None)
        self._changed()

    def _on_stream_removed(self, s) -> None:
        self._full = False
        self._changed()

    def _on_closed(self) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectFailed(self.close_reason or "connection closed"))
            self.ready.exception()
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()


class H2Pool:
    """HTTP/2 connections to one endpoint (host, port): open_stream() puts a request on a connection
    with a free stream slot, opening a new connection when all are full (up to max_connections, then
    waiting for a slot). With ssl (a context, or a function returning the current one: certificates
    rotate), the context's ALPN offer is the caller's and peer_alpn tells what the peer picked: NoH2
    when it is not h2, for the caller to fall back to HTTP/1.1. `verify(transport)`, when set, checks
    each new TLS connection before it is used (the peer's identity) and raises to refuse it."""

    def __init__(self, host: str, port: int, *,
                 ssl: ssl_module.SSLContext | Callable[[], ssl_module.SSLContext] | None = None,
                 server_hostname: str | None = None, limits: Limits | None = None,
                 max_connections: int = 16, connect_timeout: float = 5.0,
                 verify: Callable[[asyncio.BaseTransport], None] | None = None):
        self.host, self.port = host, port
        self.ssl = ssl
        self.server_hostname = server_hostname
        self.verify = verify
        self.limits = limits or Limits()
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.connections: list[H2Upstream] = []
        self.peer_alpn: str | None = None       # what the last TLS handshake's ALPN picked
        self.opened = 0                         # connections opened over the pool's life
        self._pending: asyncio.Task | None = None   # the connect under way
        self._slot: asyncio.Event | None = None
        self._closed = False

    @property
    def buffered_bytes(self) -> int:
        """Bytes held by the pool's connections (stream buffers and unsent socket bytes)."""
        return sum(c.buffered_bytes for c in self.connections)

    async def open_stream(self, head: RequestHead, end: bool = False) -> H2ClientStream:
        """A new stream carrying `head` to the endpoint. Raises NoH2 (peer's ALPN is not h2),
        ConnectFailed (no connection; nothing sent), ConnectionGone."""
        while True:
            conn = await self.connection()
            try:
                return conn.open_stream(head, end)
            except ConnectionGone:
                if conn.capacity > 0:   # not a full connection: a closed one, say so
                    raise
                # full or draining now: another connection

    async def connection(self) -> H2Upstream:
        """A ready connection with a free stream slot, opened when none has one (same errors as
        open_stream)."""
        while True:
            if self._closed:
                raise ConnectionGone("pool closed", retriable=True)
            conn = self._with_capacity()
            if conn is not None:
                return conn
            if self._pending is not None:   # one connect at a time: its capacity may be enough
                await asyncio.shield(self._pending)
                continue
            if len(self.connections) < self.max_connections:
                self._pending = asyncio.get_running_loop().create_task(self._connect())
                self._pending.add_done_callback(self._connected)
                await asyncio.shield(self._pending)
                continue
            if self._slot is None:
                self._slot = asyncio.Event()
            self._slot.clear()
            await self._slot.wait()

    def _with_capacity(self) -> H2Upstream | None:
        for c in self.connections:
            if c.capacity > 0:
                return c
        return None

    async def _connect(self) -> H2Upstream:
        try:
            return await self._open_connection()
        finally:
            # cleared here, not in a done callback: an opener arriving before that callback ran would
            # find a finished connect still "under way" and spin on it without ever yielding
            self._pending = None

    async def _open_connection(self) -> H2Upstream:
        loop = asyncio.get_running_loop()
        ctx = self.ssl() if callable(self.ssl) else self.ssl
        try:
            _, conn = await asyncio.wait_for(loop.create_connection(
                lambda: H2Upstream(self.limits, on_change=self._wake), self.host, self.port, ssl=ctx,
                server_hostname=self.server_hostname if ctx is not None else None),
                self.connect_timeout)
        except (OSError, asyncio.TimeoutError, ssl_module.SSLError, RuntimeError) as exc:
            raise ConnectFailed(f"connect to {self.host}:{self.port} failed: {exc!r}") from exc
        if ctx is not None:
            self.peer_alpn = conn.alpn
            if self.verify is not None and not conn.closed:
                try:
                    self.verify(conn.transport)
                except Exception as exc:  # noqa: BLE001 - whatever the check raises refuses the peer
                    conn.close()
                    raise ConnectFailed(f"{self.host}:{self.port} refused: {exc!r}") from exc
        try:
            await asyncio.wait_for(asyncio.shield(conn.ready), self.connect_timeout)
        except asyncio.TimeoutError:
            conn.close()
            raise ConnectFailed(f"{self.host}:{self.port} sent no HTTP/2 SETTINGS") from None
        self.connections.append(conn)
        self.opened += 1
        return conn

    @staticmethod
    def _connected(task: asyncio.Task) -> None:
        if not task.cancelled():
            task.exception()   # the openers waiting on it got the error; no "never retrieved" noise

    def _wake(self) -> None:
        self.connections = [c for c in self.connections if not c.closed]
        if self._slot is not None:
            self._slot.set()

    def close(self) -> None:
        """Drain every connection (GOAWAY, then close when its streams end); no new streams."""
        self._closed = True
        for c in list(self.connections):
            c.goaway()
        self._wake()


__all__ = ["ALPN_H2", "ConnectFailed", "H2ClientStream", "H2Pool", "H2Upstream", "NoH2"]
