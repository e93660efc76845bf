"""The server side of HTTP/2 (RFC 9113): H2Downstream takes an app's or a peer sidecar's connection
(h2c with prior knowledge, RFC 9113 3.4, or TLS with ALPN `h2`, 3.2) and hands each request stream to
an `on_request(stream)` coroutine; the stream carries the request and sends the response."""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

import h2.events
import h2.exceptions

from .h2 import (CANCEL, INTERNAL_ERROR, PROTOCOL_ERROR, REFUSED_STREAM, H2Error, Limits, MalformedHead,
                 RequestHead, ResponseHead, StreamReset, parse_request_head, response_headers)
from .h2conn import H2Connection, H2Stream

log = logging.getLogger("sidecar.h2")


class H2ServerStream(H2Stream):
    """A request stream: `head` and the request body (read(), trailers); send_head() then the
    response body (send_data(), send_trailers(), end()); reset() to refuse or abort."""

    __slots__ = ("head", "response")

    def __init__(self, conn: H2Downstream, stream_id: int, head: RequestHead):
        super().__init__(conn, stream_id)
        self.head = head
        self.response: ResponseHead | None = None   # the head sent, once sent

    def send_head(self, head: ResponseHead, end: bool = False) -> None:
        """Send the response head (HEADERS), ending the stream when end (e.g. a trailers-only gRPC
        response). 1xx heads may precede the final one."""
        if self._error is not None:
            raise self._error
        if self.response is not None and self.response.status >= 200:
            raise RuntimeError("response head already sent")
        if head.status >= 200:
            self.response = head
        self.conn._send_head(self, response_headers(head), end and head.status >= 200)


    async def send_data(self, data: bytes, end: bool = False) -> None:
        self._require_head()
        await super().send_data(data, end)

    def send_trailers(self, fields) -> None:
        self._require_head()
        super().send_trailers(fields)

    def end(self) -> None:
        self._require_head()
        super().end()

    def _require_head(self) -> None:
        """A body or trailers before the final head would be a protocol error at the client (RFC 9113
        8.1), ending its whole connection: the stream is reset instead."""
        if self.response is None and self._error is None:
            self.reset(INTERNAL_ERROR)
            raise H2Error("response body before its head: stream reset")


OnRequest = Callable[[H2ServerStream], Awaitable[None]]


class H2Downstream(H2Connection):
    """An asyncio protocol serving HTTP/2 on one accepted connection. Each request stream runs
    `on_request(stream)` as a task; a stream whose response was not ended when it returns is reset
    (INTERNAL_ERROR). Streams beyond Limits.max_concurrent_streams are refused (RST_STREAM
    REFUSED_STREAM, retriable); goaway() drains, close() ends now. A handler waiting on something
    else learns of its stream's reset or its connection's loss from stream.wait_closed().

    Taking over a connection whose first bytes were already read (preface sniffing on an HTTP/1
    port): transport.set_protocol(p); p.connection_made(transport); p.data_received(first_bytes).
    """

    client_side = False

    def __init__(self, on_request: OnRequest, limits: Limits | None = None,
                 on_closed: Callable[[H2Downstream], None] | None = None):
        super().__init__(limits)
        self.on_request = on_request
        self.on_closed = on_closed
        self.tasks: set[asyncio.Task] = set()
        self.requests = 0   # streams accepted over the connection's life

    def _on_other_event(self, event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self._on_request_head(event)

    def _on_request_head(self, event) -> None:
        sid = event.stream_id
        if self.goaway_sent and sid > self.goaway_last_id:
            self._refuse(sid, REFUSED_STREAM)   # opened after our GOAWAY: not processed (RFC 9113 6.8)
            return
        if len(self.streams) >= self.limits.max_concurrent_streams:
            self._refuse(sid, REFUSED_STREAM)   # over SETTINGS_MAX_CONCURRENT_STREAMS (RFC 9113 5.1.2)
            return
        try:
            head = parse_request_head(event.headers)
        except MalformedHead as exc:
            log.debug("h2: malformed request on stream %d: %s", sid, exc)
            self._refuse(sid, PROTOCOL_ERROR)   # a malformed request is a stream error (RFC 9113 8.1.1)
            return
        stream = H2ServerStream(self, sid, head)
        self.streams[sid] = stream
        self.requests += 1
        task = asyncio.get_running_loop().create_task(self._serve(stream))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _refuse(self, sid: int, code: int) -> None:
        try:
            self.h2.reset_stream(sid, error_code=code)
        except h2.exceptions.ProtocolError:
            pass

    async def _serve(self, stream: H2ServerStream) -> None:
        try:
            await self.on_request(stream)
        except Exception as exc:   # noqa: BLE001 - one request's fault resets that stream only
            if stream.error is None:
                log.warning("h2: request handler failed on stream %d: %r", stream.stream_id, exc)
        if stream.error is None and not stream._out_end:
            stream.reset(INTERNAL_ERROR)
        elif not stream.finished:
            stream._discard = True   # the response is complete: unread request data is credited
            credit = sum(c for _, c in stream._in)
            stream._in.clear()
            stream._in_bytes = 0
            self._credit(stream.stream_id, credit)

    def _send_head(self, stream: H2ServerStream, block: list, end: bool) -> None:
        if self.closed:
            raise stream.error or RuntimeError("connection closed")
        try:
            self.h2.send_headers(stream.stream_id, block, end_stream=end)
        except h2.exceptions.StreamClosedError:
            stream._fail(StreamReset(CANCEL, remote=True))   # the peer reset it meanwhile
            raise stream.error from None
        except h2.exceptions.ProtocolError as exc:
            stream.reset(INTERNAL_ERROR)
            raise H2Error(f"cannot send the response head: {exc}") from None
        if end:
            stream._out_end = stream._out_closed = True
        self._write()
        stream._maybe_closed()

    def _on_closed(self) -> None:
        if self.on_closed is not None:
            self.on_closed(self)


def negotiated_protocol(transport) -> str | None:
    """What ALPN picked on a TLS transport ("h2", "http/1.1"), None on cleartext or without ALPN."""
    ssl_object = transport.get_extra_info("ssl_object")
    return ssl_object.selected_alpn_protocol() if ssl_object is not None else None


__all__ = ["H2Downstream", "H2ServerStream", "OnRequest", "negotiated_protocol"]
