"""HTTP/2 on the layered HTTP/1.1 engine: each HTTP/2 request stream is one exchange that runs the
stack's layers (route, authorize, split, retries, timeouts, balance per request, metrics, trace).

- Downstream (`serve_h2`): a connection of an HTTP listener whose first bytes are the HTTP/2 preface
  (an app's h2c with prior knowledge, gRPC's default; a gateway client's) is handed to an
  H2Downstream. Each request stream gets a fresh `_Downstream` of the same stack over a
  `StreamTransport`: the stream's request goes in as HTTP/1.1 (chunked body, trailers), the
  HTTP/1.1 response that comes out is sent back on the stream (trailers included; a gRPC answer
  without a body is trailers-only).
- Upstream (`H2AppConnector`): for an app that speaks only HTTP/2 (mesh.protocol grpc / http2), the
  inbound stack's connections to it are `AppStreamTransport`s over one pool of h2c connections:
  the engine writes HTTP/1.1 requests, each becomes an HTTP/2 stream, its response comes back as
  HTTP/1.1.
- Between sidecars (`H2PeerConnector`): to a service of protocol grpc / http2 the outbound offers
  ALPN `h2` (RFC 7301) on the mutual-TLS hop; a peer that picks it gets each request as a stream on a
  pooled connection (the peer's inbound serves it with `serve_h2`, as a preface on any listener is);
  a peer that picks http/1.1 gets HTTP/1.1 (chunked bodies, chunked trailers for gRPC's status).
  Either way requests are balanced per request by the layers.

Flow control holds end to end: a stream's body is read only while the engine reads (pause_reading),
and the engine stops reading its upstream (pause_writing) while a stream's unsent bytes are over
STREAM_HIGH_WATER, which the stream's peer drains within its window.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any

from httptools import HttpParserError, HttpRequestParser, HttpResponseParser

from .h2 import CANCEL, INTERNAL_ERROR, PREFACE, H2Error, RequestHead, ResponseHead
from .h2client import H2Pool, NoH2
from .peers import probe_peer
from .h2server import H2Downstream, H2ServerStream
from .http1 import status_line

log = logging.getLogger("sidecar.h2")

H2_PROTOCOLS = ("grpc", "http2")   # mesh.protocol values whose apps speak HTTP/2 (h2c)
STREAM_HIGH_WATER = 64 * 1024   # a stream's unsent response bytes above which the engine pauses
NO_H2_RECHECK_S = 300.0         # a peer that picked http/1.1 by ALPN is offered h2 again after this
MAX_PEER_POOLS = 256            # peers' HTTP/2 pools kept; above it the ones without connections go
# Fields HTTP/2 forbids (RFC 9113 8.2.2) or that HTTP/1.1 framing owns here.
_NOT_FORWARDED = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                            b"upgrade", b"te", b"host", b"content-length"))


def is_preface_start(data: bytes) -> bool:
    """Whether a connection's first bytes begin the HTTP/2 client preface (RFC 9113 3.4)."""
    n = min(len(data), len(PREFACE))
    return n > 0 and data[:n] == PREFACE[:n]


def _field_lines(fields) -> list:
    out: list = []
    for name, value in fields:
        if name not in _NOT_FORWARDED and name[:1] != b":":
            out += (name, b": ", value, b"\r\n")
    return out


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def _last_chunk(trailers) -> bytes:
    return b"".join([b"0\r\n", *_field_lines(trailers or ()), b"\r\n"])


# ---- downstream: HTTP/2 streams into the engine ------------------------------------------------------

def serve_h2(down: Any, first: bytes) -> None:
    """Take over `down`'s connection (its first bytes `first` begin the preface) as HTTP/2; each
    request stream runs `down`'s stack as an exchange of its own."""
    transport = down.transport
    down.switched = True          # no longer an HTTP/1 connection: out of the listener's HTTP limits
    state, stack, listener = down.state, down.stack, down.listener
    conn = H2Downstream(lambda stream: _serve_stream(type(down), state, stack, listener, transport, stream),
                        on_closed=lambda _: stack.gauge.dec())
    # The connection stays counted in the listener's gauge (the HTTP/1 side's count moves to it);
    # each stream is counted as a connection too while it runs.
    down.listener.guard.release(down)
    transport.set_protocol(conn)
    conn.connection_made(transport)
    conn.data_received(first)


async def _serve_stream(downstream_type, state, stack, listener, transport, stream: H2ServerStream) -> None:
    head = stream.head
    if head.method == b"CONNECT":
        stream.send_head(ResponseHead(501, [(b"content-length", b"0")]), end=True)
        return   # extended CONNECT (RFC 8441) is not supported: no tunnel over a stream
    tr = StreamTransport(transport, stream)
    down = downstream_type(state, stack, listener)
    tr.protocol = down
    down.connection_made(tr)
    if tr.closing:
        await tr.done
        return
    # A stream is out of the listener's HTTP/1 timers (idle, body): a call may be quiet as long as
    # it likes; HTTP/2 flow control bounds what it holds, the route's timeout how long it may take.
    listener.guard.release(down)
    length = head.get(b"content-length")
    chunked = length is None and not stream.at_end
    parts = [head.method, b" ", head.path, b" HTTP/1.1\r\nhost: ", head.authority, b"\r\n",
             *_field_lines(head.fields)]
    if length is not None:
        parts += (b"content-length: ", length, b"\r\n")
    if chunked:
        parts.append(b"transfer-encoding: chunked\r\n")
    parts.append(b"connection: close\r\n\r\n")   # one exchange per stream: closed after its response
    down.data_received(b"".join(parts))
    try:
        while not tr.closing:
            if not tr.reading.is_set():
                await tr.reading.wait()
                continue
            chunk = await stream.read()
            if tr.closing:
                break
            if not chunk:
                if chunked:
                    down.data_received(_last_chunk(stream.trailers))
                break
            down.data_received(_chunk(chunk) if chunked else chunk)
    except H2Error as exc:   # the client reset the stream (or its connection went): end the exchange
        tr.lost(exc)
    await tr.done


class _EngineSide(asyncio.Transport):
    """What both bridge transports are to the engine's protocol on them: the HTTP/1.1 it writes is
    parsed (`parser_type`, callbacks on the subclass), its pause_reading holds the HTTP/2 side's
    feeding (`reading`), and it can never become a byte tunnel."""

    what = "message"   # what the engine writes, for the log

    def __init__(self, parser_type):
        super().__init__()
        self.protocol: Any = None
        self.loop = asyncio.get_running_loop()
        self.parser = parser_type(self)
        self.closing = False
        self.reading = asyncio.Event()
        self.reading.set()
        self.engine_paused = False   # the engine was told pause_writing (the HTTP/2 side is behind)

    def write(self, data) -> None:
        if self.closing:
            return
        try:
            self.parser.feed_data(bytes(data))
        except HttpParserError as exc:
            log.warning("h2: the engine's %s did not parse: %r", self.what, exc)
            self.abort()

    def writelines(self, parts) -> None:
        self.write(b"".join(parts))

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        pass

    def pause_reading(self) -> None:
        self.reading.clear()

    def resume_reading(self) -> None:
        self.reading.set()

    def is_reading(self) -> bool:
        return self.reading.is_set()

    def is_closing(self) -> bool:
        return self.closing

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        pass

    def set_protocol(self, protocol) -> None:
        raise RuntimeError("an HTTP/2 stream cannot become a tunnel")

    def get_protocol(self):
        return self.protocol


class StreamTransport(_EngineSide):
    """What a per-stream `_Downstream` writes its HTTP/1.1 response to: sent on the HTTP/2 stream.
    Socket facts (peer, original destination, TLS) are the real connection's."""

    what = "response"

    def __init__(self, real: asyncio.Transport, stream: H2ServerStream):
        super().__init__(HttpResponseParser)
        self.real = real
        self.stream = stream
        self.fields: list = []
        self.trailers: list | None = None
        self.status = 0
        self.head_sent = False
        self.deferred = False        # a gRPC head held back: it may be a trailers-only answer
        self.complete = False
        self.queue: collections.deque = collections.deque()
        self.queued = 0
        self.writer: asyncio.Task | None = None
        self.done = self.loop.create_future()   # the exchange is over (answered, or failed)

    # -- what the engine calls
    def get_extra_info(self, name, default=None):
        return self.real.get_extra_info(name, default)

    def write(self, data) -> None:
        if not self.complete:
            _EngineSide.write(self, data)

    def get_write_buffer_size(self) -> int:
        return self.queued

    def close(self) -> None:
        """The engine is done with this exchange: what it answered is sent, an unanswered stream reset."""
        if self.closing:
            return
        self.closing = True
        if not self.complete:
            self._queue(("reset", INTERNAL_ERROR))
        self.reading.set()
        self.loop.call_soon(self._lost_now, None)

    def abort(self) -> None:
        if self.closing:
            return
        self.closing = True
        self.queue.clear()
        self.stream.reset(INTERNAL_ERROR if not self.complete else CANCEL)
        self.reading.set()
        self.loop.call_soon(self._lost_now, None)

    def lost(self, exc: Exception) -> None:
        """The stream failed under the exchange (the client reset it)."""
        if self.closing:
            return
        self.closing = True
        self.queue.clear()
        self.reading.set()
        self._lost_now(exc)

    def _lost_now(self, exc) -> None:
        if self.protocol is not None:
            protocol, self.protocol = self.protocol, None
            protocol.connection_lost(exc)
        if self.writer is None and not self.done.done():
            self.done.set_result(None)

    # -- the engine's HTTP/1.1 response, parsed
    def on_header(self, name: bytes, value: bytes) -> None:
        if self.status:
            if self.trailers is None:
                self.trailers = []
            self.trailers.append((name.lower(), value))
        else:
            self.fields.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:   # an interim answer (100 Continue): HTTP/2 clients need none
            self.fields = []
            return
        self.status = status
        fields = [(n, v) for n, v in self.fields if n not in _NOT_FORWARDED]
        self.fields = fields
        if any(n == b"grpc-status" for n, _ in fields):
            self.deferred = True   # sent with the first body bytes, or alone as a trailers-only answer
        else:
            self._send_head(False)

    def on_body(self, data: bytes) -> None:
        if not self.status:
            return
        if self.deferred:
            self.deferred = False
            self._send_head(False)
        self._queue(("data", bytes(data)))

    def on_message_complete(self) -> None:
        if not self.status:
            return   # the end of an interim answer
        self.complete = True
        if self.deferred and not self.trailers:
            self.deferred = False
            self._send_head(True)   # trailers-only (gRPC): the head ends the stream
        else:
            if self.deferred:
                self.deferred = False
                self._send_head(False)
            self._queue(("end", self.trailers))

    def _send_head(self, end: bool) -> None:
        try:
            self.stream.send_head(ResponseHead(self.status, self.fields), end=end)
        except (H2Error, RuntimeError) as exc:
            self.lost(exc)
            return
        self.head_sent = True

    # -- the stream's side, in order, within its window
    def _queue(self, item: tuple) -> None:
        if item[0] == "data":
            self.queued += len(item[1])
            if self.queued > STREAM_HIGH_WATER and not self.engine_paused and self.protocol is not None:
                self.engine_paused = True
                self.protocol.pause_writing()
        self.queue.append(item)
        if self.writer is None:
            self.writer = self.loop.create_task(self._drain())

    async def _drain(self) -> None:
        stream = self.stream
        try:
            while self.queue:
                kind, item = self.queue.popleft()
                if kind == "data":
                    self.queued -= len(item)
                    await stream.send_data(item)
                    if self.engine_paused and self.queued <= STREAM_HIGH_WATER // 2:
                        self.engine_paused = False
                        if self.protocol is not None:
                            self.protocol.resume_writing()
                elif kind == "end":
                    if item:
                        stream.send_trailers(item)
                    else:
                        stream.end()
                else:   # reset: the engine closed without a whole answer
                    stream.reset(item)
        except H2Error as exc:
            self.writer = None
            self.lost(exc)
        finally:
            self.writer = None
            if (self.closing or self.complete) and not self.queue and self.protocol is None \
                    and not self.done.done():
                self.done.set_result(None)


# ---- upstream: the engine's HTTP/1.1 requests to an HTTP/2-only app ----------------------------------

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
            self.http1_until[key] = loop.time() + NO_H2_RECHECK_S
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


class AppStreamTransport(_EngineSide):
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

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.request is not None:
            if self.trailers is None:
                self.trailers = []
            self.trailers.append((name.lower(), value))
        else:
            self.fields.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        fields = self.fields
        authority = next((v for n, v in fields if n == b"host"), b"")
        head = RequestHead(self.parser.get_method(), self.target, authority, b"http",
                           [(n, v) for n, v in fields if n not in _NOT_FORWARDED or n == b"content-length"]
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
        parts = [status_line(head.status), *_field_lines(head.fields)]
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
            self.protocol.data_received(_chunk(chunk))
        self.stream = None
        self.protocol.data_received(_last_chunk(stream.trailers))
