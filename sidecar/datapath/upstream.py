"""The server side of an exchange (`_Upstream`): a keep-alive connection to an endpoint that parses
responses and streams them back to the downstream, its head first past the retry decision."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser

from .http1 import (
    H_CL, H_CONNECTION, H_FLAGS, H_GRPC_STATUS, H_TE, H_UPGRADE, connection_tokens, drop_named, read_response_head,
    status_line,
)
from .peers import stop_probing
from .speedups import cut, head_end, join, monotonic
from .wire import (
    FLAG_UPSTREAM_PROTOCOL_ERROR, FLAG_UPSTREAM_RESET, MAX_HEAD, P_UPSTREAM, RESPONSE_HEADERS, TRAILER_DROP,
    WHOLE_HEADS, WRITE_HIGH_WATER, _RESPONSE_TABLE, _send, _Stop, last_chunk, log,
)

if TYPE_CHECKING:
    from .exchange import Exchange
    from .pools import UpstreamPools


_WAIT_HEAD, _BODY, _DONE, _SKIP, _SWITCHED = 0, 1, 2, 3, 4   # _SKIP: a response the retry layer took,
# read and dropped; _SWITCHED: a 101 answered an upgrade request (the connection becomes a tunnel)


class _Upstream:
    """A keep-alive connection to an upstream: parses responses and streams them downstream (an
    asyncio protocol by its methods, like _Downstream)."""

    __slots__ = ("pool", "key", "transport", "parser", "exchange", "idle_since", "pooled", "closed",
                 "got_bytes", "phase", "lines", "chunked_in", "has_cl", "conn_tokens", "chunked_out",
                 "until_close", "keep", "interim", "read_paused", "write_paused", "uses", "out",
                 "peer_flags", "skip", "breaker", "connected_at", "sent_at", "doomed", "probing",
                 "mid", "body_left", "whole_keep", "upgrade", "trailers", "grpc_status")

    def __init__(self, pool: UpstreamPools, key: tuple[str, int], breaker: Any = None):
        self.pool = pool
        self.key = key
        self.peer_flags: bytes | None = None   # x-mesh-flags of the response (a peer inbound's UF/UH)
        self.skip = False                      # the retry layer took this response
        self.breaker = breaker                 # CircuitBreaker whose connection slot this holds
        self.transport: asyncio.Transport | None = None
        self.parser = HttpResponseParser(self)
        self.exchange: Exchange | None = None
        self.idle_since = 0.0
        self.pooled = False
        self.closed = False
        self.got_bytes = False
        self.phase = _WAIT_HEAD
        self.lines: list = []
        self.chunked_in = False
        self.has_cl = False
        self.conn_tokens: set | None = None
        self.chunked_out = False
        self.until_close = False
        self.keep = False
        self.interim = False
        self.read_paused = False
        self.write_paused = False
        self.uses = 0
        self.out: list = []  # bytes for the downstream, written once per data_received
        # Dead peers (ProxyState's docstring)
        self.connected_at = 0.0  # monotonic time the connection was made (its first request's write)
        self.sent_at = 0.0       # monotonic time the request was written on it when reused (mesh), or 0
        self.doomed = False      # its endpoint left the mesh: close it when its exchange ends
        self.probing = False     # the kernel probes the peer; ETIMEDOUT means it vanished
        self.mid = False         # httptools is inside a response
        self.body_left = 0       # Content-Length bytes still to come of a head taken whole
        self.whole_keep = False  # ... and whether its connection persists

    def attach(self, ex: Exchange) -> None:
        self.exchange = ex
        self.phase = _WAIT_HEAD
        self.skip = False
        self.got_bytes = False
        self.keep = False
        self.sent_at = 0.0
        self.uses += 1

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.transport.close()

    def detach(self) -> None:
        """Leave the pool and the breaker's connection count: the connection is closed, or a byte
        tunnel's from now on (a protocol switch; a snapshot that removes its endpoint does not end it)."""
        self.closed = True   # for the pool: never handed out again
        self.pool.discard(self)
        self.pool.unregister(self)
        breaker = self.breaker
        if breaker is not None:
            self.breaker = None
            breaker.release_connection()

    def pause_reading(self) -> None:
        if not self.read_paused and not self.closed:
            self.read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused and not self.closed:
            self.read_paused = False
            self.transport.resume_reading()

    # -- transport callbacks

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self.pool.opened += 1
        self.connected_at = monotonic()
        self.pool.register(self)

    def data_received(self, data: bytes) -> None:
        ex = self.exchange
        if ex is None:
            self.transport.close()  # bytes on an idle connection: not a response to anything
            return
        if not self.got_bytes:
            self.got_bytes = True
            if not ex.keep_held:
                ex.held = None
            if self.probing and not self.doomed:
                self.probing = False  # the peer answered: no more keepalive probes (back to the pool)
                stop_probing(self.transport)
        out = self.out = []
        if WHOLE_HEADS and (self.body_left or (self.phase == _WAIT_HEAD and not self.mid)):
            data = self._feed_whole(data, ex)
        try:
            if data:
                self.parser.feed_data(data)
        except (HttpParserError, HttpParserUpgrade) as exc:
            if out:
                _send(ex.down.writes, ex.down.transport, out)
            if self.exchange is not ex:
                return
            if self.phase == _SWITCHED and exc.__class__ is HttpParserUpgrade:
                from .pipes import switch_protocols   # pipes imports this module: not at its top

                switch_protocols(ex.down, ex, self, data[exc.args[0]:])
                return
            if self.phase == _DONE or self.skip:
                self.keep = False  # complete, but junk followed (or a dropped answer went bad)
            else:
                if exc.__context__ is not None and not isinstance(exc.__context__, _Stop):
                    log.error("response callback failed", exc_info=exc.__context__)
                self.exchange = None
                self.transport.abort()
                ex.down._upstream_lost(ex, self, FLAG_UPSTREAM_PROTOCOL_ERROR)
                return
        else:
            if out:
                _send(ex.down.writes, ex.down.transport, out)
        if self.skip:
            if self.exchange is ex:  # the dropped answer is read (kept connection), or given up (closed)
                self.skip = False
                self.exchange = None
                ex.down._skipped(ex, self, self.phase == _DONE and self.keep)
            return
        if self.phase == _DONE and self.exchange is ex:
            self.exchange = None
            ex.down._response_done(ex, self, self.keep, ex.close_after)

    def _feed_whole(self, data: bytes, ex: Exchange) -> bytes:
        """Take a whole response head (scan_fields) and its Content-Length body from `data`;
        what is left (from the start of a message) is httptools' to parse."""
        left = self.body_left
        pos = 0
        if not left:
            end = head_end(data, 0, MAX_HEAD)
            if end < 0:
                return data
            pos = self._whole_head(data, end, ex)
            if pos < 0:
                return data
            left = self.body_left
            if not left:
                return cut(data, pos, len(data))
        n = len(data)
        take = n - pos if n - pos < left else left
        self.body_left = left - take
        self.on_body(data if take == n else cut(data, pos, pos + take))
        pos += take
        if not self.body_left:
            self._message_done(self.whole_keep)
        return cut(data, pos, len(data))

    def _whole_head(self, data: bytes, end: int, ex: Exchange) -> int:
        """The response whose head is data[:end + 4], taken whole: where its body starts, or -1 for
        httptools to parse it (not plain syntax; 1xx, chunked, no Content-Length...)."""
        head = read_response_head(data, end, RESPONSE_HEADERS, _RESPONSE_TABLE, ex.is_head)
        if head is None:
            return -1
        status, fields, size, keep = head
        self.on_message_begin()
        self.mid = False   # httptools has not seen it
        lines = self.lines
        for k in range(0, len(fields), 3):
            if fields[k + 1] is None:
                lines.append(fields[k])   # raw lines passed on as they came
            else:
                self._header(fields[k], fields[k + 1], fields[k + 2])
        self._status_head(status, keep)
        if self.phase != _DONE:
            if size == 0:
                self._message_done(keep)
            else:
                self.body_left = size
                self.whole_keep = keep
        return end + 4

    def eof_received(self) -> bool | None:
        return None  # close; connection_lost decides what it meant

    def connection_lost(self, exc: Exception | None) -> None:
        self.detach()
        ex = self.exchange
        if ex is None:
            return
        self.exchange = None
        if self.phase == _DONE:
            ex.down._response_done(ex, self, False, ex.close_after)
        elif self.phase == _BODY and self.until_close:
            ex.down._response_done(ex, self, False, True)  # the body ended with the connection
        else:
            # ETIMEDOUT on a probed connection: the peer's kernel stopped answering (probe_peer).
            ex.down._upstream_lost(ex, self, FLAG_UPSTREAM_RESET,
                                   vanished=self.probing and isinstance(exc, TimeoutError))

    def pause_writing(self) -> None:
        self.write_paused = True
        ex = self.exchange
        if ex is not None:
            ex.down._pause(P_UPSTREAM)

    def resume_writing(self) -> None:
        self.write_paused = False
        ex = self.exchange
        if ex is not None:
            ex.down._resume(P_UPSTREAM)

    # -- parser callbacks

    def on_message_begin(self) -> None:
        if self.phase == _DONE:
            raise _Stop  # a second response to one request: the connection is broken
        self.mid = True
        self.lines = []
        self.chunked_in = False
        self.has_cl = False
        self.conn_tokens = None
        self.peer_flags = None
        self.upgrade = None
        self.trailers = None
        self.grpc_status = None

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.phase == _BODY or self.phase == _SKIP:   # a trailer (RFC 9112 7.1.2): after the body
            if self.phase == _BODY and name.lower() not in TRAILER_DROP:
                self.trailers = (self.trailers or []) + [name, b": ", value, b"\r\n"]
                if name.lower() == b"grpc-status":
                    self.grpc_status = value.strip()
            return
        self._header(name, value, RESPONSE_HEADERS.get(name.lower()))

    def _header(self, name: bytes, value: bytes, act: int | None) -> None:
        """The response header `name: value` taken by its action (H_*, or None: passed on)."""
        if act is None:
            self.lines += (name, b": ", value, b"\r\n")
            return
        a = act   # compiled: a C int compared with C ints
        if a == H_CL:
            self.has_cl = True
            self.lines += (name, b": ", value, b"\r\n")
        elif a == H_FLAGS:
            self.peer_flags = value.strip()
            self.lines += (name, b": ", value, b"\r\n")
        elif a == H_TE:
            if b"chunked" in value.lower():
                self.chunked_in = True
        elif a == H_CONNECTION:
            self.conn_tokens = connection_tokens(value, self.conn_tokens)
        elif a == H_UPGRADE:
            self.upgrade = value.strip()
        elif a == H_GRPC_STATUS:
            self.grpc_status = value.strip()   # a trailers-only gRPC answer: metrics, retries on it
            self.lines += (name, b": ", value, b"\r\n")

    def on_headers_complete(self) -> None:
        p = self.parser
        self._status_head(p.get_status_code(), p.should_keep_alive())

    def _status_head(self, status: int, keep: bool) -> None:
        """The response head is complete: pass it on (or to the retry layer); `keep`: the
        connection persists after this response."""
        ex = self.exchange
        lines = self.lines
        if self.conn_tokens:
            lines = drop_named(lines, self.conn_tokens)
        if status < 200:
            if status == 101:
                if ex.upgrade is None or ex.resp_started:
                    raise _Stop  # a switch nobody asked for is a protocol error
                ex.status = 101
                ex.resp_started = True
                self.phase = _SWITCHED   # the parser stops after this head (HttpParserUpgrade)
                self.out.append(join([status_line(101), *lines, b"connection: upgrade\r\nupgrade: ",
                                      self.upgrade or ex.upgrade, b"\r\n\r\n"]))
                return
            self.interim = True
            if not ex.http10:
                self.out.append(b"".join([status_line(status), *lines, b"\r\n"]))
            return
        if ex.traffic is not None and ex.down._response_head(ex, self, status):
            # The retry layer takes this answer: read it to its end and drop it (data_received decides).
            self.skip = True
            self.phase = _SKIP
            if ex.is_head:
                self._head_done(keep)
            return
        ex.status = status
        ex.resp_started = True
        down = ex.down
        close = not ex.keep_alive or down.eof
        parts = [status_line(status)]
        parts += lines
        self.chunked_out = False
        self.until_close = False
        if ex.is_head or status == 204 or status == 304:
            if ex.is_head and self.chunked_in:
                parts.append(b"transfer-encoding: chunked\r\n")
        elif self.chunked_in:
            if ex.http10:
                close = True  # HTTP/1.0 has no chunked coding: the body ends with the connection
            else:
                self.chunked_out = True
                parts.append(b"transfer-encoding: chunked\r\n")
        elif not self.has_cl:
            self.until_close = True
            close = True
        if close:
            parts.append(b"connection: close\r\n")
        elif ex.http10:
            parts.append(b"connection: keep-alive\r\n")
        parts.append(b"\r\n")
        ex.close_after = close
        self.out.append(join(parts))
        self.phase = _BODY
        if ex.is_head:
            self._head_done(keep)

    def _head_done(self, keep: bool) -> None:
        # httptools cannot be told a HEAD response has no body: finish here, fresh parser next.
        self.keep = keep
        self.phase = _DONE
        if self.mid:
            self.mid = False
            self.parser = HttpResponseParser(self)

    def on_body(self, data: bytes) -> None:
        if self.phase != _BODY:
            self.keep = False
            return
        if self.chunked_out:
            self.out += (b"%x\r\n" % len(data), data, b"\r\n")
        else:
            self.out.append(data)

    def on_message_complete(self) -> None:
        self.mid = False
        self._message_done(self.parser.should_keep_alive())

    def _message_done(self, keep: bool) -> None:
        if self.interim:
            self.interim = False
            return
        if self.phase == _SKIP:
            self.keep = keep
            self.phase = _DONE
            return
        if self.phase != _BODY:
            return  # the end of a HEAD response's head, already finished
        if self.chunked_out:
            self.out.append(last_chunk(self.trailers))
        self.keep = keep
        self.phase = _DONE
