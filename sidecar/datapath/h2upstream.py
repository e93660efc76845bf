"""HTTP/2 upstream of the engine: its HTTP/1.1 requests sent as HTTP/2 streams, to an app that speaks
only HTTP/2 (`H2AppConnector`, h2c) and to a peer sidecar that picked ALPN `h2` (`H2PeerConnector`).
Each connection the engine opens is an `AppStreamTransport` over a pool of HTTP/2 connections."""

from __future__ import annotations

import asyncio
import logging

from httptools import HttpRequestParser

from .h2 import CANCEL, RequestHead
from .h2bridge import NOT_FORWARDED, STREAM_HIGH_WATER, EngineSide, h1_chunk, h1_field_lines, h1_last_chunk
from .h2client import H2Pool, NoH2
from .http1 import status_line
from .peers import probe_peer

log = logging.getLogger("sidecar.h2")

NO_H2_RECHECK_S = 300.0         # a peer that picked http/1.1 by ALPN is offered h2 again after this
MAX_PEER_POOLS = 256            # peers' HTTP/2 pools kept; above it the ones without connections go


class H2AppConnector:
    """The inbound stack's connect function for an app that speaks only HTTP/2 (h2c): every
    connection the engine opens is an AppStreamTransport over one H2Pool per app address."""

    def __init__(self):
        self.pools: dict[tuple[str, int], H2Pool] = {}

    async def __call__(self, loop, factory, host: str, port: int, ssl=None, server_hostname=None, verify=None):
        pool = self.pools.get((host, port))
        if pool is None or pool._closed:
            pool = self.pools[(host, port)] = H2Pool(host, port)
        return _stream_connection(pool, (host, port), factory, None)

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()
        self.pools.clear()


def _peer_checked(transport: asyncio.BaseTransport, verify) -> None:
    verify(transport)      # the endpoint's identity
    # The connection outlives any one request: a peer whose namespace vanished (no FIN, no RST) is
    # found by the kernel's keepalive probes and unacknowledged-data timeout, in seconds, instead of
    # holding the streams put on it.
    probe_peer(transport)


def _retrieved(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()


def _stream_connection(pool: H2Pool, address: tuple[str, int], factory, ssl_object) -> tuple:
    transport = AppStreamTransport(pool, address, ssl_object)
    protocol = factory()
    transport.protocol = protocol
    protocol.connection_made(transport)
    return transport, protocol


class H2PeerConnector:
    """The outbound stack's connect function for the mesh hops to an HTTP/2 service: a pool of TLS
    connections per peer offering ALPN h2 then http/1.1; the engine's connections are
    AppStreamTransports on it. A peer that picks http/1.1 gets an ordinary TLS connection, and is not
    asked for h2 again for NO_H2_RECHECK_S. `verify(transport)` checks the peer of each connection."""

    def __init__(self, tls, connect_timeout: float):
        self.tls = tls
        self.connect_timeout = connect_timeout
        self.pools: dict[tuple[str, int], H2Pool] = {}
        self.http1_until: dict[tuple[str, int], float] = {}   # peer -> when to offer it h2 again

    @classmethod
    def for_tls(cls, tls, connect_timeout: float) -> "H2PeerConnector | None":
        """A connector when the TLS hook has an h2 client context (`client_context_h2`), else None."""
        if tls is None or getattr(tls, "client_context_h2", None) is None:
            return None
        return cls(tls, connect_timeout)

    async def __call__(self, loop, factory, host: str, port: int, ssl, server_hostname, verify):
        key = (host, port)
        if self.http1_until.get(key, 0.0) > loop.time():
            return await self._http1(loop, factory, key, ssl, server_hostname, verify)
        pool = self.pools.get(key)
        if pool is None or pool._closed:
            if len(self.pools) >= MAX_PEER_POOLS:
                self._forget_idle()
            pool = self.pools[key] = H2Pool(host, port, ssl=self.tls.client_context_h2,
                                            server_hostname=server_hostname,
                                            connect_timeout=self.connect_timeout)
        pool.verify = lambda transport: _peer_checked(transport, verify)   # as the latest snapshot says
        try:
            conn = await pool.connection()
        except NoH2:
            pool.close()
            self.pools.pop(key, None)
            now = loop.time()
            if len(self.http1_until) >= MAX_PEER_POOLS:   # bounded: the expired go, else the soonest to
                self.http1_until = {k: t for k, t in self.http1_until.items() if t > now}
                if len(self.http1_until) >= MAX_PEER_POOLS:
                    del self.http1_until[min(self.http1_until, key=self.http1_until.__getitem__)]
            self.http1_until[key] = now + NO_H2_RECHECK_S
            return await self._http1(loop, factory, key, ssl, server_hostname, verify)
        return _stream_connection(pool, key, factory, conn.transport.get_extra_info("ssl_object"))

    async def _http1(self, loop, factory, key, ssl, server_hostname, verify) -> tuple:
        transport, protocol = await loop.create_connection(factory, key[0], key[1], ssl=ssl,
                                                           server_hostname=server_hostname)
        verify(transport)
        return transport, protocol

    def _forget_idle(self) -> None:
        for key, pool in list(self.pools.items()):
            if not pool.connections and pool._pending is None:
                pool.close()
                del self.pools[key]

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()
        self.pools.clear()


class AppStreamTransport(EngineSide):
    """One keep-alive 'connection' of the engine to an HTTP/2 app: each HTTP/1.1 request written to
    it is sent as an HTTP/2 stream on the pool, its response fed back as HTTP/1.1 (chunked, trailers)."""

    what = "request"

    def __init__(self, pool: H2Pool, address: tuple[str, int], ssl_object=None):
        super().__init__(HttpRequestParser)
        self.pool = pool
        self.address = address
        self.ssl_object = ssl_object   # a TLS hop's (the first connection's): what the peer check read
        self.request: tuple | None = None    # (method, target, fields) being parsed
        self.target = b""
        self.fields: list = []
        self.trailers: list | None = None
        self.body: asyncio.Queue | None = None   # the current request's body and end, for its task
        self.body_bytes = 0
        self.stream = None
        self.task: asyncio.Task | None = None

    # -- what the engine calls
    def get_extra_info(self, name, default=None):
        if name == "peername":
            return self.address
        if name == "ssl_object" and self.ssl_object is not None:
            return self.ssl_object
        if name == "socket":
            # The socket of the connection the request's stream is on: the dead-peer checks
            # (ProxyState) read its TCP_INFO. No ACK since the stream was written means the peer's
            # kernel has not received the stream either (TCP delivers in order).
            stream = self.stream
            transport = stream.conn.transport if stream is not None else None
            return transport.get_extra_info("socket", default) if transport is not None else default
        return default

    def get_write_buffer_size(self) -> int:
        return self.body_bytes

    def close(self) -> None:
        self._end(None, CANCEL)

    def abort(self) -> None:
        self._end(None, CANCEL)

    def _end(self, exc, code: int) -> None:
        if self.closing:
            return
        self.closing = True
        self.reading.set()
        if self.stream is not None and not self.stream.finished:
            self.stream.reset(code)
        if self.task is not None:
            self.task.cancel()
        self.loop.call_soon(self._lost_now, exc)

    def _lost_now(self, exc) -> None:
        if self.protocol is not None:
            protocol, self.protocol = self.protocol, None
            protocol.connection_lost(exc)

    # -- the engine's HTTP/1.1 request, parsed
    def on_message_begin(self) -> None:
        self.target = b""
        self.fields = []
        self.trailers = None
        self.request = None

    def on_url(self, url: bytes) -> None:
        self.target += url

    def head_done(self) -> bool:
        return self.request is not None

    def on_headers_complete(self) -> None:
        fields = self.fields
        authority = next((v for n, v in fields if n == b"host"), b"")
        head = RequestHead(self.parser.get_method(), self.target, authority, b"http",
                           [(n, v) for n, v in fields if n not in NOT_FORWARDED or n == b"content-length"]
                           + [(b"te", b"trailers")])   # gRPC servers require it (gRPC over HTTP/2)
        self.request = head
        self.body = asyncio.Queue()
        self.task = self.loop.create_task(self._exchange(head, self.body))

    def on_body(self, data: bytes) -> None:
        self.body_bytes += len(data)
        self.body.put_nowait(bytes(data))
        if self.body_bytes > STREAM_HIGH_WATER and not self.engine_paused and self.protocol is not None:
            self.engine_paused = True
            self.protocol.pause_writing()

    def on_message_complete(self) -> None:
        self.body.put_nowait(("end", self.trailers))

    # -- one request's HTTP/2 stream
    async def _exchange(self, head: RequestHead, body: asyncio.Queue) -> None:
        try:
            first = await body.get()
            no_body = isinstance(first, tuple) and not first[1]
            stream = self.stream = await self.pool.open_stream(head, end=no_body)
            response = self.loop.create_task(self._respond(stream))
            response.add_done_callback(_retrieved)   # a reset stream fails it after this task is cancelled
            item = None if no_body else first
            while item is not None:
                if isinstance(item, tuple):
                    if item[1]:
                        stream.send_trailers(item[1])
                    else:
                        stream.end()
                    break
                self.body_bytes -= len(item)
                await stream.send_data(item)
                if self.engine_paused and self.body_bytes <= STREAM_HIGH_WATER // 2:
                    self.engine_paused = False
                    if self.protocol is not None:
                        self.protocol.resume_writing()
                item = await body.get()
            await response
        except asyncio.CancelledError:
            raise
        except Exception as exc:   # noqa: BLE001 - refused, reset, connection gone: the engine decides
            log.debug("h2: a request to %s:%s failed: %r", *self.address, exc)
            self._end(exc if isinstance(exc, OSError) else ConnectionResetError(str(exc)), CANCEL)

    async def _respond(self, stream) -> None:
        head = await stream.response()
        feed = self.protocol.data_received
        parts = [status_line(head.status), *h1_field_lines(head.fields)]
        bodyless = self.request.method == b"HEAD" or head.status in (204, 304)
        if not bodyless:
            parts.append(b"transfer-encoding: chunked\r\n")
        parts.append(b"\r\n")
        feed(b"".join(parts))
        if bodyless:
            return
        while True:
            if not self.reading.is_set():
                await self.reading.wait()
                continue
            chunk = await stream.read()
            if self.protocol is None:
                return
            if not chunk:
                break
            self.protocol.data_received(h1_chunk(chunk))
        self.stream = None
        self.protocol.data_received(h1_last_chunk(stream.trailers))
