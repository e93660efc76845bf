"""The downstream's base (`_Responder`): its connection state, and how an exchange ends: local
replies, the response's end (metrics, the access log, the next pipelined request), a lost upstream,
pausing and closing the client connection, the switch to byte forwarding."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Any

from httptools import HttpRequestParser

from meshcore.grpc import GRPC_CONTENT_TYPE, local_reply_status, percent_encode_message

from ..routing import UNKNOWN, Cluster
from ..telemetry import NO_FLAGS
from .http1 import put_fields, status_line
from .peers import reset_connection
from .wire import (
    FLAG_DOWNSTREAM_CLOSED, FLAG_DOWNSTREAM_PROTOCOL_ERROR, FLAG_UPSTREAM_RESET, P_PIPELINE, P_STOPPED, P_UPSTREAM,
    TEXT, WHOLE_HEADS, Reply, _dec, _join_flags, _Stop, _write, is_grpc_call,
)

if TYPE_CHECKING:
    from .exchange import Exchange, _Listener
    from .stack import Stack
    from .state import ProxyState
    from .upstream import _Upstream


class _Responder:
    """The client side's state and the end of its exchanges; `_Downstream` (downstream.py) is the
    protocol, `_Dispatcher` (dispatch.py) runs the layers and the upstream tries in between.

    The four methods below that raise NotImplementedError are _Dispatcher's, declared here
    (respond.pxd) so that this class, the layers and the upstream side, which know the downstream as
    this class, call them as C methods (compiled, a class cannot derive from one whose .pxd reaches
    its own, and the layers' and the upstream's .pxd reach this one)."""

    def __init__(self, state: ProxyState, stack: Stack, listener: _Listener):
        self.state = state
        self.writes = state.writes   # None: written at once (an HTTP/2 stream's, h2bridge.py)
        self.stack = stack
        self.listener = listener
        self.actions = stack.request_headers
        self.loop: asyncio.AbstractEventLoop | None = None
        self.transport: asyncio.Transport | None = None
        # httptools' parser, made when a message is not taken whole (_feed): most connections never
        # need one, and making one costs a few microseconds (a new connection per request pays it each)
        self.parser: HttpRequestParser | None = None if WHOLE_HEADS else HttpRequestParser(self)
        self.queue: deque[Exchange] = deque()
        self.cur: Exchange | None = None
        self.last: Exchange | None = None
        self.paused = 0
        self.write_paused = False
        self.closing = False
        self.switched = False
        self.eof = False
        self.bad_after = False
        self.advancing = False
        self.feeding = False
        self.cork: Exchange | None = None  # attached during this read: head and body written at its end
        self.body_left = 0                 # Content-Length bytes still to come of a head taken whole
        self.peer_ip = b""
        self.peer_identity: str | None = None   # inbound: the caller's verified SPIFFE ID (mTLS)
        self.peer_service: str | None = None    # ... and its service name (authorization's source)
        self.peer_fields: tuple | None = None   # the fields an allowed request of the verified caller gets
        self.orig_dst: tuple[str, int] | None = None
        self.raw: bytearray | None = None
        self.sniff_timer: asyncio.TimerHandle | None = None
        self.early = b""   # bytes after an upgrade request's head: the new protocol's, sent on a 101
        self.h2_sniff = stack.h2 is not None   # the first read may be the HTTP/2 preface


    def pause_writing(self) -> None:
        self.write_paused = True
        if self.queue:
            up = self.queue[0].up
            if up is not None:
                up.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.queue:
            up = self.queue[0].up
            if up is not None:
                up.resume_reading()

    # -- defined by _Dispatcher (dispatch.py)

    def _dispatch(self, ex: Exchange) -> None:
        raise NotImplementedError

    def _routed(self, ex: Exchange, target: Any) -> int:
        raise NotImplementedError

    def _pick(self, ex: Exchange) -> None:
        raise NotImplementedError

    def _response_head(self, ex: Exchange, up: _Upstream, status: int) -> bool:
        raise NotImplementedError

    def caller_of(self, ex: Exchange) -> str:
        """The calling workload as the inbound reports it: the service of the verified peer certificate
        (mTLS), else the caller's `x-mesh-source` header (plaintext on a permissive inbound: a label
        only, never trusted for authorization), else `unknown`."""
        if self.peer_service is not None:
            return self.peer_service
        return ex.source.decode("latin-1") if ex.source else UNKNOWN

    # -- the end of an exchange

    def _answer(self, ex: Exchange, reply: Reply) -> None:
        self._reply(ex, reply.status, reply.flags, reply.body, reply.content_type, headers=reply.headers)


    def _upstream_lost(self, ex: Exchange, up: _Upstream, flags: str, vanished: bool = False) -> None:
        """The upstream connection closed or broke before the response was complete. `vanished`:
        the kernel gave up probing a peer that stopped answering (the request had been delivered)."""
        ex.up = None
        if up.write_paused:
            self._resume(P_UPSTREAM)
        if ex.dead:
            return
        if not ex.resp_started:
            if vanished:
                if ex.traffic is not None and self._try_failed(ex, "reset", True):
                    return
                self._reply(ex, 503, flags, b"upstream peer vanished\n")
                return
            if (ex.reused and not up.got_bytes and not ex.fresh_retry and flags == FLAG_UPSTREAM_RESET
                    and (not ex.body or ex.held is not None)):
                # A pooled connection the peer had closed: once more on a fresh connection.
                ex.fresh_retry = True
                ex.reused = False
                ex.pending = []
                self.loop.create_task(self._connect(ex, ex.key, ex.cluster))
                return
            if ex.traffic is not None and self._try_failed(
                    ex, "reset" if flags == FLAG_UPSTREAM_RESET else None, True):
                return
            self._reply(ex, 502, flags, b"upstream connection error\n")
            return
        ex.flags = _join_flags(ex.flags, flags)
        ex.resp_done = True
        self._end_layers(ex)
        self._abort()

    def _undelivered(self, ex: Exchange, up: _Upstream) -> None:
        """The peer's kernel never acknowledged this request and has been silent since (a dead peer,
        ProxyState): no application read it. Reset the connection and retry the request like a
        connect failure (Envoy's reset before request / refused stream); else 503 UC."""
        ex.up = None
        up.exchange = None
        reset_connection(up.transport)
        if up.write_paused:
            self._resume(P_UPSTREAM)
        if ex.dead or ex.resp_done:
            return
        self.state.undelivered_total += 1
        if ex.traffic is not None and self._try_failed(ex, "connect-failure", False):
            return
        self._reply(ex, 503, FLAG_UPSTREAM_RESET, b"upstream peer unreachable\n")

    def _reply(self, ex: Exchange, status: int, flags: str, body: bytes = b"",
               content_type: bytes = TEXT, close: bool = False, headers: tuple = ()) -> None:
        """Answer the request locally (errors, the gateway's 404)."""
        if ex.flags != NO_FLAGS:
            flags = _join_flags(ex.flags, flags)  # e.g. DI,UT: a delay fault, then the timeout
        self._drop_upstream(ex)
        if ex.resp_started:
            ex.flags = flags
            ex.resp_done = True
            self._end_layers(ex)
            self._abort()
            return
        close = close or not ex.keep_alive or self.eof or (ex.expect and not ex.req_done)
        if is_grpc_call(ex.lines):
            # A gRPC client reads a call's outcome from grpc-status, not from the HTTP status: a
            # trailers-only answer (gRPC over HTTP/2: status 200, no body) with the matching code.
            code = local_reply_status(status, flags)
            ex.grpc_status = str(int(code))
            headers += ((b"grpc-status", b"%d" % code),
                        (b"grpc-message", percent_encode_message(body.strip().decode("latin-1"))))
            status, content_type, body = 200, GRPC_CONTENT_TYPE, b""
        parts = [b"%bcontent-type: %b\r\ncontent-length: %d\r\nx-mesh-flags: %b\r\n" % (
            status_line(status), content_type, len(body), flags.encode())]
        put_fields(parts, headers)
        parts.append(b"connection: close\r\n\r\n" if close else b"\r\n")
        head = b"".join(parts)
        _write(self.writes, self.transport, head if ex.is_head else head + body)
        ex.status = status
        ex.flags = flags
        ex.resp_started = True
        self._response_done(ex, None, False, close)

    def _drop_upstream(self, ex: Exchange) -> bool:
        """Detach and close the exchange's upstream connection, if it has one (True then): its
        answer, if any, is not wanted any more."""
        up = ex.up
        if up is None:
            return False
        ex.up = None
        up.exchange = None
        up.close()
        if up.write_paused:
            self._resume(P_UPSTREAM)
        return True

    def _response_done(self, ex: Exchange, up: _Upstream | None, reusable: bool, close: bool) -> None:
        """The response is complete downstream: account, release the upstream, go on to the next."""
        key = ex.key
        if key is not None:
            ex.key = None
            _dec(self.state.in_flight, key)
        ex.resp_done = True
        if up is not None:
            if up.grpc_status is not None:
                ex.grpc_status = up.grpc_status.decode("latin-1")
            ex.up = None
            if up.write_paused:
                self._resume(P_UPSTREAM)
            if reusable and ex.req_done and ex.pending is None:
                self.stack.pool.release(up)
            else:
                up.close()
        self._end_layers(ex)
        if close or not ex.keep_alive:
            self._close()
            return
        if ex.req_done:
            self._advance()
        elif ex.expect and not ex.got_body:
            self._close()  # the client waits for 100-continue that will not come
        else:
            ex.discard = True  # read and drop the rest of this request's body, then go on

    def _end_layers(self, ex: Exchange) -> None:
        """Once per exchange, when it ends: the on_end of every layer that keeps per-request state,
        innermost first (Stack.enders); the metrics layer, outermost, counts it last."""
        for layer in self.stack.enders:
            layer.on_end(self, ex)

    def _advance(self) -> None:
        """The head exchange is finished: start the next pipelined one, if any."""
        q = self.queue
        if q:
            q.popleft()
        if self.advancing:
            return  # the loop below, further up the stack, goes on
        self.advancing = True
        try:
            while not self.closing:
                if not q:
                    if self.bad_after:
                        self._write_bad_request()
                    elif self.eof and self.cur is None:
                        self._close()
                    return
                if len(q) <= 1 and self.paused & P_PIPELINE:
                    self._resume(P_PIPELINE)
                nxt = q[0]
                if nxt.dispatched or not nxt.head_done:
                    return
                if nxt.is_connect:
                    return  # its tunnel starts from data_received
                self._dispatch(nxt)
        finally:
            self.advancing = False

    def _abandon(self, ex: Exchange) -> None:
        ex.dead = True
        key = ex.key
        if key is not None:
            ex.key = None
            _dec(self.state.in_flight, key)
        up = ex.up
        if up is not None:
            ex.up = None
            up.exchange = None
            up.close()
        if ex.dispatched and not ex.resp_done:
            ex.resp_done = True
            ex.flags = FLAG_DOWNSTREAM_CLOSED
            self._end_layers(ex)

    # -- connection control

    def _pause(self, bit: int) -> None:
        if not self.paused and not self.closing:
            self.transport.pause_reading()
        self.paused |= bit

    def _resume(self, bit: int) -> None:
        if self.paused & bit:
            self.paused &= ~bit
            if not self.paused and not self.closing:
                self.transport.resume_reading()

    def _close(self) -> None:
        if not self.closing:
            self.closing = True
            if self.writes is not None:
                self.writes.settle(self.transport)
            self.transport.close()

    def _abort(self) -> None:
        self.closing = True
        self.transport.abort()

    def _head_too_large(self, ex: Exchange, status: int = 431) -> None:
        self._pause(P_STOPPED)
        self.queue.remove(ex)
        self.cur = None
        if self.queue:
            self.bad_after = True
        else:
            _write(self.writes, self.transport, status_line(status) + b"content-length: 0\r\n"
                   b"x-mesh-flags: DPE\r\nconnection: close\r\n\r\n")
            self._close()
        raise _Stop

    def _bad_request(self) -> None:
        self._pause(P_STOPPED)
        ex = self.cur
        self.cur = None
        if ex is not None and ex.dispatched and not ex.resp_done:
            self._reply(ex, 400, FLAG_DOWNSTREAM_PROTOCOL_ERROR, b"bad request\n", close=True)
            return
        if ex is not None and ex in self.queue:
            self.queue.remove(ex)
        if self.queue:
            self.bad_after = True
        else:
            self._write_bad_request()

    def _write_bad_request(self) -> None:
        _write(self.writes, self.transport, b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; "
               b"charset=utf-8\r\ncontent-length: 12\r\nx-mesh-flags: DPE\r\nconnection: close\r\n\r\nbad request\n")
        self._close()

    # -- switching to byte forwarding

    def _to_tunnel(self, cluster: Cluster, initial: bytes, *, greeting: bytes | None = None,
                   eof: bool = False) -> None:
        self.switched = True
        if self.sniff_timer is not None:
            self.sniff_timer.cancel()
            self.sniff_timer = None
        if self.writes is not None:   # a pipe writes at once: what an earlier answer left held goes first
            self.writes.settle(self.transport)
        from .pipes import _Pipe, _tunnel   # pipes imports the engine: not at its top

        pipe = _Pipe(self.stack.gauge)
        pipe.transport = self.transport
        if initial:
            pipe.buffer.append(initial)
        pipe.eof = eof
        if not self.paused:
            self.transport.pause_reading()
        self.transport.set_protocol(pipe)
        self.loop.create_task(_tunnel(self.state, self.stack, pipe, cluster, greeting))
