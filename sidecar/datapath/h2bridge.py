"""HTTP/2 on the layered HTTP/1.1 engine: each HTTP/2 request stream is one exchange that runs the
stack's layers (route, authorize, split, retries, timeouts, balance per request, metrics, trace).

- Downstream (`serve_h2`): a connection of an HTTP listener whose first bytes are the HTTP/2 preface
  (an app's h2c with prior knowledge, gRPC's default; a gateway client's) is handed to an
  H2Downstream. Each request stream gets a fresh `_Downstream` of the same stack over a
  `StreamTransport`: the stream's request goes in as HTTP/1.1 (chunked body, trailers), the
  HTTP/1.1 response that comes out is sent back on the stream (trailers included; a gRPC answer
  without a body is trailers-only).
- Upstream (h2upstream.py, `H2AppConnector`): for an app that speaks only HTTP/2 (mesh.protocol grpc / http2), the
  inbound stack's connections to it are `AppStreamTransport`s over one pool of h2c connections:
  the engine writes HTTP/1.1 requests, each becomes an HTTP/2 stream, its response comes back as
  HTTP/1.1.
- Between sidecars (h2upstream.py, `H2PeerConnector`): to a service of protocol grpc / http2 the outbound offers
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

from httptools import HttpParserError, HttpResponseParser

from .h2 import CANCEL, INTERNAL_ERROR, PREFACE, H2Error, ResponseHead
from .h2server import H2Downstream, H2ServerStream
from .http1 import put_fields

log = logging.getLogger("sidecar.h2")

H2_PROTOCOLS = ("grpc", "http2")   # mesh.protocol values whose apps speak HTTP/2 (h2c)
STREAM_HIGH_WATER = 64 * 1024   # a stream's unsent response bytes above which the engine pauses
# Fields HTTP/2 forbids (RFC 9113 8.2.2) or that HTTP/1.1 framing owns here.
NOT_FORWARDED = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                            b"upgrade", b"te", b"host", b"content-length"))


def is_preface_start(data: bytes) -> bool:
    """Whether a connection's first bytes begin the HTTP/2 client preface (RFC 9113 3.4)."""
    n = min(len(data), len(PREFACE))
    return n > 0 and data[:n] == PREFACE[:n]


def h1_field_lines(fields) -> list:
    """The HTTP/1.1 line pieces (http1.put_fields) of the fields that HTTP/1.1 carries: no
    pseudo-header, none that its framing owns."""
    out: list = []
    put_fields(out, [field for field in fields if field[0] not in NOT_FORWARDED and field[0][:1] != b":"])
    return out


def h1_chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def h1_last_chunk(trailers) -> bytes:
    return b"".join([b"0\r\n", *h1_field_lines(trailers or ()), b"\r\n"])


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
    down.writes = None   # its "transport" frames the response for the stream at once (the batch is for sockets)
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
             *h1_field_lines(head.fields)]
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
                    down.data_received(h1_last_chunk(stream.trailers))
                break
            down.data_received(h1_chunk(chunk) if chunked else chunk)
    except H2Error as exc:   # the client reset the stream (or its connection went): end the exchange
        tr.lost(exc)
    await tr.done


class EngineSide(asyncio.Transport):
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

    def head_done(self) -> bool:
        """Whether the message's head is parsed (a field now is a trailer)."""
        raise NotImplementedError

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.head_done():
            if self.trailers is None:
                self.trailers = []
            self.trailers.append((name.lower(), value))
        else:
            self.fields.append((name.lower(), value))


class StreamTransport(EngineSide):
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
            EngineSide.write(self, data)

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
    def head_done(self) -> bool:
        return bool(self.status)

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:   # an interim answer (100 Continue): HTTP/2 clients need none
            self.fields = []
            return
        self.status = status
        fields = [(n, v) for n, v in self.fields if n not in NOT_FORWARDED]
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
