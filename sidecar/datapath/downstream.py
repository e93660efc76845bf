"""The client side of the proxy (`_Downstream`), an asyncio protocol: reads and parses requests (whole
heads in one pass once compiled, else httptools' callbacks), dispatches them in order, streams their
bodies, and switches to byte forwarding for CONNECT and destinations the mesh does not know."""

from __future__ import annotations

import asyncio

from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser

from ..egress import tunnel_egress_blocked   # egress control
from ..guard import body_over_limit   # limits (meshcore.limits)
from ..routing import PASSTHROUGH, find_by_address, passthrough_cluster, route_outbound, split_host
from .dispatch import _Dispatcher
from .exchange import Exchange
from .h2bridge import is_preface_start
from .http1 import (
    H_B3, H_CL, H_CONNECTION, H_DROP, H_EXPECT, H_GRPC_TIMEOUT, H_HOST, H_SOURCE, H_SOURCE_VERSION, H_TE,
    H_TRACEPARENT, H_TRACESTATE, H_UPGRADE, H_XFF, connection_tokens, drop_named, read_request_head,
)
from .speedups import cut, head_end
from .wire import (
    CHUNK_COST, HOLD_LIMIT, MAX_HEAD, P_PENDING, P_PIPELINE, P_STOPPED, PENDING_LIMIT, SNIFF_LIMIT, TRAILER_DROP,
    WHOLE_HEADS, WRITE_HIGH_WATER, _SLASH, _send, _Stop, last_chunk, log,
)


class _Downstream(_Dispatcher):
    """The client side of the proxy: parses requests, runs the layers, writes responses in order.

    An asyncio protocol by its methods (every one of asyncio.Protocol's is defined) rather than by
    inheritance: compiled (downstream.pxd), a C struct type cannot derive from a Python class. Its
    state and the end of its exchanges are `_Responder`'s (respond.py), the layers and the upstream
    tries `_Dispatcher`'s (dispatch.py)."""

    # -- transport callbacks

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        loop = self.listener.loop
        self.loop = loop if loop is not None else asyncio.get_running_loop()
        self.stack.gauge.inc()
        if not self.listener.guard.admit(self):   # limits: max_connections (reset), timeouts
            return
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        peer = transport.get_extra_info("peername")
        self.peer_ip = peer[0].encode() if peer else b""
        if self.stack.direction == "inbound":
            identify = getattr(self.state.tls, "inbound_peer", None)
            if identify is not None:
                self.peer_identity, self.peer_service = identify(transport.get_extra_info("ssl_object"))
                if self.peer_identity:
                    self.peer_fields = ((b"x-forwarded-client-cert", b"URI=%b" % self.peer_identity.encode()),)
        hook = self.listener.original_dst
        if hook is None:
            return
        try:
            dst = hook(transport)
        except Exception:  # noqa: BLE001
            log.exception("original destination hook failed")
            dst = None
        if dst is None:
            return
        self.orig_dst = dst
        cluster = find_by_address(self.state.table, dst[0], dst[1])
        if cluster is None:
            # Unknown destination: sniff for HTTP (a Host header may still name a mesh service).
            self.raw = bytearray()
            self.sniff_timer = self.loop.call_later(self.listener.sniff_timeout, self._sniff_expired)
        elif cluster.protocol == "tcp":
            self._to_tunnel(cluster, b"")

    def data_received(self, data: bytes) -> None:
        if self.h2_sniff:
            self.h2_sniff = False
            # A connection opened with the HTTP/2 preface (RFC 9113 3.4; "PRI" is no HTTP/1 method):
            # HTTP/2, each stream an exchange of this stack. Not to a destination the mesh does not
            # know (raw): that is passed through as it is.
            if self.raw is None and len(data) >= 3 and is_preface_start(data):
                self.stack.h2(self, data)
                return
        if self.raw is not None:
            if self.sniff_timer is not None:
                self.sniff_timer.cancel()
                self.sniff_timer = None
            self.raw += data
            if len(self.raw) > SNIFF_LIMIT:
                self._passthrough_raw()
                return
        self.feeding = True
        try:
            self._feed(data)
        finally:
            self.feeding = False
            ex = self.cork
            if ex is not None:
                self.cork = None
                self._uncork(ex)

    def _feed(self, data: bytes) -> None:
        if WHOLE_HEADS and (self.body_left or (self.cur is None and self.raw is None and not self.paused & P_STOPPED
                                               and not self.bad_after)):
            data = self._feed_whole(data)
            if not data:
                return
        parser = self.parser
        if parser is None:
            parser = self.parser = HttpRequestParser(self)
        while True:
            try:
                parser.feed_data(data)
                return
            except HttpParserUpgrade as exc:
                data = data[exc.args[0]:]
                ex = self.last
                if ex is not None and ex.is_connect:
                    self._connect_tunnel(ex, data)
                    return
                if ex is None or ex.bad:
                    self._bad_request()
                    return
                if ex.upgrade is not None:
                    # The rest is the new protocol's, held until the upstream switches (101); reading
                    # stops here: an answer other than 101 closes the connection.
                    self.early += data
                    self._pause(P_STOPPED)
                    return
                if not data:
                    return
                # Upgrade without Connection: upgrade (or from HTTP/1.0): ignored; parse on.
            except HttpParserError as exc:
                if self.closing or self.switched:
                    return
                if exc.__context__ is not None and not isinstance(exc.__context__, _Stop):
                    log.error("request callback failed", exc_info=exc.__context__)
                if self.raw is not None and self.orig_dst is not None:
                    self._passthrough_raw()
                    return
                self._bad_request()
                return

    def _feed_whole(self, data: bytes) -> bytes:
        """Take whole heads (scan_fields) and their Content-Length bodies from `data`, between
        messages of httptools; what is left (from the start of a message) is httptools' to parse."""
        pos = 0
        n = len(data)
        while pos < n:
            left = self.body_left
            if left:
                take = n - pos if n - pos < left else left
                self.body_left = left - take
                self.on_body(data if take == n else cut(data, pos, pos + take))
                pos += take
                if not self.body_left:
                    self.on_message_complete()
                continue
            if self.closing or self.switched or self.bad_after:
                return b""   # as after httptools' _Stop: nothing more is read
            last = self.last
            if last is not None and not last.keep_alive:
                self._bad_request()   # RFC 9112 9.6: nothing after a request that closes (as llhttp)
                return b""
            end = head_end(data, pos, pos + MAX_HEAD)
            if end < 0:
                break
            taken = self._whole_head(data, pos, end)
            if taken < 0:
                break
            pos = taken
        return cut(data, pos, len(data)) if pos else data

    def _whole_head(self, data: bytes, pos: int, end: int) -> int:
        """The request whose head is data[pos:end + 4], taken whole: where its body starts, or -1
        for httptools to parse it (not plain syntax; chunked, Upgrade, CONNECT...)."""
        head = read_request_head(data, pos, end, self.actions, self.stack.header_table)
        if head is None:
            return -1
        method, target, http10, fields, size, keep = head
        lim = self.listener
        if end - pos > lim.max_head or len(fields) > 3 * lim.max_fields or len(target) > lim.max_line:
            return -1   # limits: httptools' callbacks count it exactly and refuse it (431, 414)
        self.on_message_begin()
        ex = self.cur
        ex.target = target
        for k in range(0, len(fields), 3):
            self._header(ex, fields[k], fields[k + 1], fields[k + 2])
        if self._headers_done(ex, method, keep, http10, False):
            return len(data)   # as after httptools' _Stop: the rest of the read is dropped
        if size > 0:
            self.body_left = size
        else:
            self.on_message_complete()
        return end + 4

    def eof_received(self) -> bool | None:
        self.eof = True
        if self.raw is not None and self.orig_dst is not None:
            self._passthrough_raw(eof=True)
            return True
        if self.queue and self.cur is None:
            return True  # half-close after complete requests: answer them, then close
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.stack.gauge.dec()
        self.listener.guard.release(self)   # limits
        if self.sniff_timer is not None:
            self.sniff_timer.cancel()
            self.sniff_timer = None
        for ex in self.queue:
            self._abandon(ex)
        self.queue.clear()

    # -- parser callbacks

    def on_message_begin(self) -> None:
        if self.closing or self.switched:
            raise _Stop
        ex = Exchange(self)
        self.cur = ex
        q = self.queue
        q.append(ex)
        if len(q) > 1:
            self._pause(P_PIPELINE)

    def on_url(self, url: bytes) -> None:
        ex = self.cur
        ex.target += url
        if len(ex.target) > self.listener.max_line:   # limits: max_request_line
            self._head_too_large(ex, 414)

    def on_header(self, name: bytes, value: bytes) -> None:
        ex = self.cur
        ex.head_size += len(name) + len(value)
        ex.fields += 1
        if ex.head_size > self.listener.max_head or ex.fields > self.listener.max_fields:   # limits
            self._head_too_large(ex)
        if ex.head_done:   # a trailer (RFC 9112 7.1.2): passed on after the body, never acted on
            if name.lower() not in TRAILER_DROP:
                ex.trailers = (ex.trailers or []) + [name, b": ", value, b"\r\n"]
            return
        self._header(ex, name, value, self.actions.get(name.lower()))

    def _header(self, ex: Exchange, name: bytes, value: bytes, act: int | None) -> None:
        """The request header `name: value` taken by its action (H_*, or None: passed on)."""
        if act is None:
            ex.lines += (name, b": ", value, b"\r\n")
        elif act != H_DROP:   # compiled: a C int (a, below) compared with C ints from here on
            a = act
            if a == H_HOST:
                ex.host = value
            elif a == H_CL:
                ex.lines += (name, b": ", value, b"\r\n")
                if value.strip() not in (b"0", b""):
                    ex.body = True
            elif a == H_TE:
                if b"chunked" in value.lower():
                    ex.chunked = True
            elif a == H_CONNECTION:
                ex.conn_tokens = connection_tokens(value, ex.conn_tokens)
            elif a == H_EXPECT:
                ex.lines += (name, b": ", value, b"\r\n")
                if value.strip().lower() == b"100-continue":
                    ex.expect = True
            elif a == H_SOURCE:
                ex.source = value
                ex.lines += (name, b": ", value, b"\r\n")
            elif a == H_SOURCE_VERSION:
                ex.source_version = value
                ex.lines += (name, b": ", value, b"\r\n")
            elif a == H_XFF:
                ex.xff = value if ex.xff is None else ex.xff + b", " + value
            elif a == H_TRACEPARENT:
                # Two traceparent headers are invalid (W3C Trace Context 3.2): a new trace starts.
                ex.tp = value if ex.tp is None else b"-"
            elif a == H_TRACESTATE:
                ex.ts = value if ex.ts is None else ex.ts + b"," + value  # RFC 9110 5.3: one list
            elif a == H_B3:
                if ex.b3 is None:
                    ex.b3 = {}
                ex.b3[name.lower()] = value
            elif a == H_GRPC_TIMEOUT:
                ex.grpc_timeout = value.strip()
            elif a == H_UPGRADE:
                value = value.strip()
                ex.upgrade = value if ex.upgrade is None else ex.upgrade + b", " + value

    def on_headers_complete(self) -> None:
        p = self.parser
        if self._headers_done(self.cur, p.get_method(), p.should_keep_alive(),
                              p.get_http_version() == "1.0", p.should_upgrade()):
            raise _Stop

    def _headers_done(self, ex: Exchange, method: bytes, keep_alive: bool, http10: bool,
                      upgrade: bool) -> bool:
        """The request head is complete: dispatch it if first in line. True: read nothing more."""
        ex.method = method
        ex.keep_alive = keep_alive
        if http10:
            ex.http10 = True
        if ex.conn_tokens:
            ex.lines = drop_named(ex.lines, ex.conn_tokens)
        if ex.chunked:
            ex.body = True
        if method == b"HEAD":
            ex.is_head = True
        elif method == b"CONNECT":
            ex.is_connect = True
            ex.head_done = True
            return False  # handled when the parser reports the upgrade
        if not upgrade or http10:
            ex.upgrade = None   # RFC 9110 7.8: only with Connection: upgrade, never from HTTP/1.0
        elif ex.body:
            ex.bad = True  # an Upgrade request with a body is not supported
        else:
            ex.keep_alive = False   # after the answer the connection is a tunnel (101) or closed
        target = ex.target
        if (not target or target[0] != _SLASH) and target != b"*" and not ex.bad:
            if not self._absolute_form(ex):
                ex.bad = True
        ex.head_done = True
        if ex is self.queue[0]:
            self._dispatch(ex)
            return self.switched or self.closing
        return False

    def on_body(self, data: bytes) -> None:
        ex = self.cur
        if ex.discard or ex.bad:
            return
        if self.listener.max_body and body_over_limit(self, ex, len(data)):   # limits: the gateway's body
            return
        if ex.chunked:
            parts: tuple = (b"%x\r\n" % len(data), data, b"\r\n")
            self._forward_body(ex, parts, len(data) + CHUNK_COST)
        else:
            self._forward_body(ex, (data,), len(data))

    def on_message_complete(self) -> None:
        ex = self.cur
        self.cur = None
        self.last = ex
        ex.req_done = True
        if ex.is_connect or ex.bad:
            return
        if ex.discard:
            self._advance()
            return
        if ex.chunked:
            self._forward_body(ex, (last_chunk(ex.trailers),), 0)
        if ex.mirror is not None:
            self._send_mirror(ex)

    # -- request path

    def _absolute_form(self, ex: Exchange) -> bool:
        target = ex.target
        i = target.find(b"://")
        if i < 0 or target[:i].lower() != b"http":
            return False
        rest = target[i + 3:]
        end = len(rest)
        for sep in (b"/", b"?"):
            j = rest.find(sep)
            if 0 <= j < end:
                end = j
        authority = rest[:end].rpartition(b"@")[2]
        path = rest[end:] or b"/"
        if path[:1] == b"?":
            path = b"/" + path
        if not authority:
            return False
        host, port = split_host(authority.decode("latin-1"), 80)
        ex.dest = (host, port)
        ex.target = path
        ex.host = authority  # RFC 9112 3.2.2: the request-target's authority replaces Host
        return True

    def _forward_body(self, ex: Exchange, parts: tuple, size: int) -> None:
        ex.got_body = True
        held = ex.held
        if held is not None:
            held += parts
            ex.held_bytes += size
        if ex.pending is None:  # attached: stream it
            up = ex.up
            if up is not None:
                if ex.chunked and self.feeding and self.cork is None:
                    # The chunks of one read go in one write at its end (_uncork): a flood of tiny
                    # chunks cost a system call each (tests/adapters/test_attacks.py, chunk_flood).
                    ex.pending = list(parts)
                    ex.pending_bytes = size
                    self.cork = ex
                else:
                    _send(self.writes, up.transport, parts)
            if held is not None and ex.held_bytes > HOLD_LIMIT:
                ex.held = None
            return
        # Queued, connecting, or reconnecting for a retry (then `held` is what gets sent).
        if not ex.fresh_retry:
            ex.pending += parts
        ex.pending_bytes += size
        if ex.pending_bytes > PENDING_LIMIT:
            up = ex.up
            if self.cork is ex and up is not None:   # attached, corked: write what this read gathered
                _send(self.writes, up.transport, ex.pending)
                ex.pending = []
                ex.pending_bytes = 0
            else:
                self._pause(P_PENDING)

    # -- switching to byte forwarding

    def _sniff_expired(self) -> None:
        self.sniff_timer = None
        if self.raw is not None and not self.raw and not self.closing:
            self._passthrough_raw()

    def _passthrough_raw(self, eof: bool = False) -> None:
        raw = bytes(self.raw)
        self.raw = None
        self.queue.clear()
        self.cur = None
        if tunnel_egress_blocked(self, passthrough_cluster(*self.orig_dst), False):   # egress control: reset
            return
        self._to_tunnel(passthrough_cluster(*self.orig_dst), raw, eof=eof)

    def _connect_tunnel(self, ex: Exchange, rest: bytes) -> None:
        """CONNECT host:port (explicit proxy): a byte tunnel; a known TCP service goes over the mesh."""
        if len(self.queue) != 1 or self.queue[0] is not ex:
            self._bad_request()
            return
        host, port = split_host(ex.target.decode("latin-1"), 443)
        cluster = route_outbound(self.state.table, None, (host, port))
        if cluster is None or cluster.protocol != "tcp":
            cluster = passthrough_cluster(host, port)
        if cluster.name == PASSTHROUGH and tunnel_egress_blocked(self, cluster, True):   # egress control: 502 EB
            return
        self.queue.clear()
        self._to_tunnel(cluster, rest, greeting=b"HTTP/1.1 200 Connection Established\r\n\r\n")
