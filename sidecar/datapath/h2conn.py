"""HTTP/2 streams and the connection half both sides share (RFC 9113), on the sans-I/O `h2` library.

Flow control end to end: a stream's received DATA is credited back to the peer (WINDOW_UPDATE) only
when the consumer read()s it, so the peer can never have more than the stream window unread here; a
producer's send_data() queues at most Limits.send_buffer bytes per stream and then waits until the
peer's window and the socket take them. A slow reader thus slows its writer through any chain of
streams, and every buffer is bounded.
"""

from __future__ import annotations

import asyncio
import collections
import logging

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from hyperframe.frame import GoAwayFrame

from .h2 import (CANCEL, INTERNAL_ERROR, MAX_STREAM_ID, NO_ERROR, PREFACE, PROTOCOL_ERROR, ConnectionGone,
                 ErrorCodes, Fields, H2Error, Limits, StreamReset, code_name, trailer_fields)

log = logging.getLogger("sidecar.h2")


# ---- the stream ------------------------------------------------------------------------------------

class H2Stream:
    """One HTTP/2 stream of a connection: the received body (read()) and trailers, and the sent body
    (send_data(), send_trailers(), end()), each bounded and flow-controlled; reset() ends it."""

    __slots__ = ("conn", "stream_id", "trailers", "_in", "_in_bytes", "_in_ended", "_in_waiter",
                 "_error", "_out", "_out_bytes", "_out_end", "_out_trailers", "_out_closed",
                 "_drain_waiter", "_closed", "_discard", "_out_stopped")

    def __init__(self, conn: H2Connection, stream_id: int):
        self.conn = conn
        self.stream_id = stream_id
        self.trailers: Fields | None = None     # the received trailers, once the body has ended
        self._in: collections.deque = collections.deque()   # (data, flow-controlled length)
        self._in_bytes = 0
        self._in_ended = False
        self._in_waiter: asyncio.Future | None = None
        self._error: H2Error | None = None
        self._out: collections.deque = collections.deque()
        self._out_bytes = 0
        self._out_end = False           # end (or trailers) queued behind the data
        self._out_trailers: Fields | None = None
        self._out_closed = False        # END_STREAM handed to h2
        self._drain_waiter: asyncio.Future | None = None
        self._closed: asyncio.Future | None = None
        self._discard = False           # the consumer is gone: received data is credited at once
        self._out_stopped = False       # the peer answered whole and asked us to stop sending (RST NO_ERROR)

    # -- state
    @property
    def buffered(self) -> int:
        """Bytes held for this stream: received and unread, plus queued and unsent."""
        return self._in_bytes + self._out_bytes

    @property
    def at_end(self) -> bool:
        """The received body has ended and all of it was read (read() returns b"")."""
        return self._in_ended and not self._in

    @property
    def error(self) -> H2Error | None:
        """Why the stream failed (StreamReset, ConnectionGone), or None."""
        return self._error

    @property
    def finished(self) -> bool:
        """Both directions ended, or the stream failed."""
        return self._error is not None or (self._in_ended and self._out_closed)

    async def wait_closed(self) -> H2Error | None:
        """Wait until the stream has finished; its error, or None when both sides ended cleanly."""
        if not self.finished:
            if self._closed is None:
                self._closed = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._closed)
        return self._error

    # -- the received body
    async def read(self) -> bytes:
        """The next chunk of the received body, b"" at its end; credits the peer for it. Raises the
        stream's error (StreamReset, ConnectionGone) once it failed."""
        while not self._in:
            if self._error is not None:
                raise self._error
            if self._in_ended:
                return b""
            self._in_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._in_waiter
            finally:
                self._in_waiter = None
        data, credit = self._in.popleft()
        self._in_bytes -= len(data)
        self.conn._credit(self.stream_id, credit)
        return data

    async def body(self):
        """Async iterator over the received body's chunks."""
        while chunk := await self.read():
            yield chunk

    # -- the sent body
    async def send_data(self, data: bytes, end: bool = False) -> None:
        """Queue body bytes (and END_STREAM when end) for sending within the peer's window; waits
        while more than Limits.send_buffer bytes are queued. Raises the stream's error."""
        if self._out_stopped:
            return   # the peer has answered and wants no more of the request (RFC 9113 8.1)
        if self._error is not None:
            raise self._error
        if self._out_end:
            raise H2Error("send_data after the stream's end")
        if data:
            self._out.append(bytes(data))
            self._out_bytes += len(data)
        self._out_end = end
        self.conn._flush(self)
        limit = self.conn.limits.send_buffer
        while self._out_bytes > limit and self._error is None:
            self._drain_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None
        if self._error is not None:
            raise self._error

    def send_trailers(self, fields: Fields) -> None:
        """Queue trailers after the queued body; they end the stream."""
        if self._out_stopped:
            return
        if self._error is not None:
            raise self._error
        if self._out_end:
            raise H2Error("trailers after the stream's end")
        self._out_trailers = trailer_fields(fields)
        self._out_end = True
        self.conn._flush(self)

    def end(self) -> None:
        """End the sent body after what is queued (END_STREAM); a no-op once ended."""
        if self._error is None and not self._out_end:
            self._out_end = True
            self.conn._flush(self)

    def reset(self, code: int = CANCEL) -> None:
        """Send RST_STREAM(code) unless the stream already finished; read/send then raise."""
        if not self.finished:
            self.conn._reset(self, code)

    # -- driven by the connection
    def _feed(self, data: bytes, credit: int) -> None:
        if self._discard or self._error is not None:
            self.conn._credit(self.stream_id, credit)
            return
        if not data:   # an empty or all-padding DATA frame: nothing to read, credit at once
            if credit:
                self.conn._credit(self.stream_id, credit)
            return
        self._in.append((data, credit))
        self._in_bytes += len(data)
        self._wake_reader()

    def _end_in(self, trailers: Fields | None = None) -> None:
        if trailers is not None:
            self.trailers = trailers
        self._in_ended = True
        self._wake_reader()
        self._maybe_closed()

    def _stop_sending(self) -> None:
        self._out_stopped = True
        self._out.clear()
        self._out_bytes = 0
        self._out_end = self._out_closed = True
        self.conn._blocked.discard(self)
        self._wake_writer()
        self._maybe_closed()

    def _fail(self, error: H2Error) -> None:
        if self._error is not None:
            return
        self._error = error
        credit = sum(c for _, c in self._in)
        self._in.clear()
        self._in_bytes = 0
        self._out.clear()
        self._out_bytes = 0
        if credit:
            self.conn._credit(self.stream_id, credit)
        self._wake_reader()
        self._wake_writer()
        self._maybe_closed()

    def _wake_reader(self) -> None:
        w = self._in_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _wake_writer(self) -> None:
        w = self._drain_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _maybe_closed(self) -> None:
        if self.finished:
            self.conn._stream_finished(self)
            if self._closed is not None and not self._closed.done():
                self._closed.set_result(None)


# ---- the connection ----------------------------------------------------------------------------------

_OPEN = (h2.connection.ConnectionState.CLIENT_OPEN, h2.connection.ConnectionState.SERVER_OPEN)


def _keep_open_after_goaway(conn: h2.connection.H2Connection) -> None:
    """h2 takes any received GOAWAY as the connection's end, failing the frames of the streams still
    going (even those later in the same read); RFC 9113 6.8 lets the streams at or below the GOAWAY's
    last-stream-id finish. So its state machine stays open on one; H2Connection opens no new stream
    after it, and ends the connection itself on an error code."""
    machine = conn.state_machine
    process_input = machine.process_input

    def stay_open_on_goaway(input_):
        if input_ is h2.connection.ConnectionInputs.RECV_GOAWAY and machine.state in _OPEN:
            return []
        return process_input(input_)
    machine.process_input = stay_open_on_goaway


class H2Connection(asyncio.Protocol):
    """The half of an HTTP/2 connection both sides share: bytes in -> h2 events -> streams, queued
    stream data -> frames within the peer's windows -> the transport. A protocol error ends the
    connection with GOAWAY (the error's code) and fails its streams; nothing escapes to the loop."""

    client_side = False

    def __init__(self, limits: Limits | None = None):
        self.limits = limits or Limits()
        # Received heads are validated (RFC 9113 8.2); sent ones are not validated again: they come from
        # heads validated on receipt (by h2, or httptools on HTTP/1) through h2_fields, and checking
        # them twice was a fifth of a forwarded call's CPU.
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=self.client_side, header_encoding=None, validate_outbound_headers=False,
            normalize_outbound_headers=False))
        _keep_open_after_goaway(self.h2)
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, H2Stream] = {}
        self.alpn: str | None = None          # the protocol TLS's ALPN picked, None on cleartext
        self.closed = False
        self.close_reason: str | None = None
        self.goaway_sent = False              # draining: no new streams
        self.goaway_received = False
        self.goaway_last_id = MAX_STREAM_ID   # streams above it, opened by the peer after our GOAWAY, are refused
        self._blocked: set[H2Stream] = set()  # streams with data waiting for a window or the socket
        self._write_paused = False
        self._write_scheduled = False
        self._lost: asyncio.Future | None = None
        # The peer's first frame must be SETTINGS (RFC 9113 3.4), which h2 does not check: the first
        # bytes are kept until that frame's type byte is in (after the client's 24-byte preface).
        self._first_bytes: bytes | None = b""
        self._settings_type_at = (len(PREFACE) if not self.client_side else 0) + 3

    # -- asyncio.Protocol
    def connection_made(self, transport) -> None:
        self.transport = transport
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.alpn = ssl_object.selected_alpn_protocol()
        self.h2.local_settings = h2.settings.Settings(client=self.client_side, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.limits.max_concurrent_streams,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: self.limits.stream_window,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: self.limits.max_header_list_size,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: self.limits.max_frame_size,
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
        })
        # Settings given before the preface are current at once, so h2 never sees them change on the
        # ACK and would keep its defaults for these two: set them on the decoder and the frame reader.
        self.h2.decoder.max_header_list_size = self.limits.max_header_list_size
        self.h2.max_inbound_frame_size = self.limits.max_frame_size
        self.h2.initiate_connection()
        # The limit is advertised but enforced here (H2Downstream refuses the excess stream with
        # REFUSED_STREAM, a stream error as RFC 9113 5.1.2 asks); h2 would end the whole connection,
        # even for a burst sent before the peer saw our SETTINGS.
        del self.h2.local_settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS]
        extra = self.limits.connection_window - 65535   # the connection window starts at 65,535 (RFC 9113 6.9.2)
        if extra > 0:
            self.h2.increment_flow_control_window(extra)
        self._write()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if self._write_scheduled:
            # h2 drops its unsent frames when a GOAWAY arrives; sent HEADERS among them would leave the
            # peer's HPACK table behind ours.
            self._write_now()
        if self._first_bytes is not None and not self._first_frame_is_settings(data):
            self._abort(PROTOCOL_ERROR, "the peer's first frame is not SETTINGS")
            return
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            # h2 has queued GOAWAY with the error's code (FRAME_SIZE_ERROR, ENHANCE_YOUR_CALM, ...)
            self._abort(getattr(exc, "error_code", PROTOCOL_ERROR) or PROTOCOL_ERROR, f"protocol error: {exc}")
            return
        except Exception as exc:   # noqa: BLE001 - a library fault must not reach the loop
            log.warning("h2: receive failed: %r", exc)
            self._abort(PROTOCOL_ERROR, f"receive failed: {exc!r}")
            return
        try:
            for event in events:
                self._on_event(event)
        except Exception as exc:   # noqa: BLE001 - a fault here ends this connection only
            log.exception("h2: event handling failed")
            self._abort(INTERNAL_ERROR, f"internal error: {exc!r}")
            return
        if self._partial_frame_too_large():
            self._abort(ErrorCodes.FRAME_SIZE_ERROR, "frame larger than SETTINGS_MAX_FRAME_SIZE")
            return
        self._write()

    def eof_received(self) -> bool | None:
        return None   # the transport closes; connection_lost fails what is open

    def connection_lost(self, exc: Exception | None) -> None:
        reason = self.close_reason or (f"connection lost: {exc}" if exc else "connection closed by the peer")
        self._closed_down(reason)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        for s in list(self._blocked):
            self._flush(s, write=False)
        self._write()

    # -- state
    @property
    def buffered_bytes(self) -> int:
        """Bytes this connection holds: its streams' buffers plus the transport's unsent bytes."""
        held = sum(s.buffered for s in self.streams.values())
        if self.transport is not None and not self.closed:
            held += self.transport.get_write_buffer_size()
        return held

    async def wait_lost(self) -> str:
        """Wait until the connection has ended; the reason."""
        if not self.closed:
            if self._lost is None:
                self._lost = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._lost)
        return self.close_reason or "closed"

    def goaway(self) -> None:
        """Drain: tell the peer no new stream will be processed (GOAWAY(NO_ERROR), RFC 9113 6.8), let
        open streams finish, then close."""
        if self.closed or self.goaway_sent:
            return
        self.goaway_sent = True
        self.goaway_last_id = self._last_stream_id()
        # Written as a raw frame: h2's close_connection() would also end the open streams.
        frame = GoAwayFrame(0, last_stream_id=self.goaway_last_id, error_code=NO_ERROR)
        self._write_now()
        self.transport.write(frame.serialize())
        self._close_if_idle()

    def close(self, code: int = NO_ERROR, reason: str = "closed locally") -> None:
        """End now: GOAWAY(code), close the transport, fail the open streams."""
        if self.closed:
            return
        self._abort(code, reason)

    # -- internals
    def _partial_frame_too_large(self) -> bool:
        """The frame h2 is still receiving declares a length over our SETTINGS_MAX_FRAME_SIZE (RFC 9113
        4.2). h2 checks only once the whole frame is in, so a peer could make it buffer 16 MiB."""
        pending = getattr(getattr(self.h2, "incoming_buffer", None), "_data", b"")
        return len(pending) >= 9 and int.from_bytes(pending[:3], "big") > self.h2.max_inbound_frame_size

    def _first_frame_is_settings(self, data: bytes) -> bool:
        first = self._first_bytes + data
        at = self._settings_type_at
        if len(first) <= at:
            self._first_bytes = first
            return True
        self._first_bytes = None
        if not self.client_side and first[:len(PREFACE)] != PREFACE:
            return True   # not the preface: h2 refuses it
        return first[at] == 0x4   # SETTINGS (RFC 9113 6.5)

    def _last_stream_id(self) -> int:
        return self.h2.highest_inbound_stream_id if not self.client_side else 0

    def _on_event(self, event) -> None:
        E = h2.events
        if isinstance(event, E.DataReceived):
            s = self.streams.get(event.stream_id)
            if s is None:
                self._credit(event.stream_id, event.flow_controlled_length)
            else:
                s._feed(event.data, event.flow_controlled_length)
        elif isinstance(event, E.StreamEnded):
            s = self.streams.get(event.stream_id)
            if s is not None:
                s._end_in()
        elif isinstance(event, E.TrailersReceived):
            s = self.streams.get(event.stream_id)
            if s is not None:
                s.trailers = [(n, v) for n, v in event.headers if n[:1] != b":"]
        elif isinstance(event, E.StreamReset):
            s = self.streams.get(event.stream_id)
            if s is not None:
                if event.error_code == NO_ERROR and s._in_ended:
                    # RFC 9113 8.1: a complete answer, then RST_STREAM(NO_ERROR) asking us to stop
                    # sending (grpcio does this when it answered before the request's END_STREAM):
                    # what was received stays readable; only our sending ends.
                    s._stop_sending()
                else:
                    s._fail(StreamReset(event.error_code, remote=True))
        elif isinstance(event, E.WindowUpdated):
            targets = list(self._blocked) if event.stream_id == 0 else \
                [s for s in (self.streams.get(event.stream_id),) if s is not None]
            for s in targets:
                self._flush(s, write=False)
        elif isinstance(event, E.RemoteSettingsChanged):
            self._on_settings(event)
            for s in list(self._blocked):   # a new initial window size moves every stream's window
                self._flush(s, write=False)
        elif isinstance(event, E.ConnectionTerminated):
            self._on_goaway(event)
        else:
            self._on_other_event(event)

    def _on_settings(self, event) -> None:
        """Hook: the peer's SETTINGS arrived."""

    def _on_other_event(self, event) -> None:
        """Hook: the side-specific events (heads)."""

    def _on_goaway(self, event) -> None:
        """The peer sent GOAWAY: streams above its last-stream-id were not processed (retriable); with
        NO_ERROR the others go on, otherwise the connection ends."""
        self.goaway_received = True
        last = event.last_stream_id if event.last_stream_id is not None else MAX_STREAM_ID
        code = event.error_code
        for sid, s in list(self.streams.items()):
            if sid > last and self._is_local_stream(sid):
                s._fail(ConnectionGone(f"GOAWAY({code_name(code)}) from the peer before the stream was "
                                       f"processed", retriable=True))
        if code != NO_ERROR:
            self._abort(code, f"GOAWAY({code_name(code)}) from the peer", send_goaway=False)
            return
        self._close_if_idle()

    def _is_local_stream(self, sid: int) -> bool:
        return (sid % 2 == 1) == self.client_side

    def _credit(self, stream_id: int, n: int) -> None:
        """Hand n consumed bytes back to the peer's windows (WINDOW_UPDATE when worth sending)."""
        if n <= 0 or self.closed:
            return
        try:
            self.h2.acknowledge_received_data(n, stream_id)
        except h2.exceptions.ProtocolError:
            return   # the stream closed meanwhile; h2 has credited the connection window already
        self._write()

    def _flush(self, s: H2Stream, write: bool = True) -> None:
        """Hand s's queued data to h2 as far as the peer's windows and the socket allow, then its end."""
        if self.closed or s._error is not None:
            return
        conn = self.h2
        sid = s.stream_id
        try:
            while s._out and not self._write_paused:
                room = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                if room <= 0:
                    break
                chunk = s._out[0]
                if len(chunk) <= room:
                    s._out.popleft()
                else:
                    s._out[0] = chunk[room:]
                    chunk = chunk[:room]
                s._out_bytes -= len(chunk)
                conn.send_data(sid, chunk)
            if not s._out and s._out_end and not s._out_closed:
                s._out_closed = True
                if s._out_trailers is not None:
                    conn.send_headers(sid, s._out_trailers, end_stream=True)
                else:
                    conn.end_stream(sid)
        except h2.exceptions.StreamClosedError:
            s._fail(StreamReset(CANCEL, remote=True))   # reset by the peer in this very batch
        except h2.exceptions.ProtocolError as exc:   # e.g. data before the head: the stream cannot go on
            log.warning("h2: send on stream %d failed: %s", sid, exc)
            self._reset(s, INTERNAL_ERROR)
        if s._out and s._error is None:
            self._blocked.add(s)
        else:
            self._blocked.discard(s)
        if s._out_bytes <= self.limits.send_buffer:
            s._wake_writer()
        if write:
            self._write()
        s._maybe_closed()

    def _reset(self, s: H2Stream, code: int) -> None:
        if not self.closed:
            try:
                self.h2.reset_stream(s.stream_id, error_code=code)
            except h2.exceptions.ProtocolError:
                pass   # already closed in h2
            self._write()
        s._fail(StreamReset(code, remote=False))

    def _stream_finished(self, s: H2Stream) -> None:
        if self.streams.get(s.stream_id) is s:
            del self.streams[s.stream_id]
            self._blocked.discard(s)
            self._on_stream_removed(s)
            self._close_if_idle()

    def _on_stream_removed(self, s: H2Stream) -> None:
        """Hook: a stream left the connection."""

    def _close_if_idle(self) -> None:
        if (self.goaway_sent or self.goaway_received) and not self.streams and not self.closed:
            self._abort(NO_ERROR, "drained after GOAWAY", send_goaway=not self.goaway_received)

    def _write(self) -> None:
        """Send what h2 has queued at the end of this loop iteration: one write for every frame the
        streams and events of the iteration made (a write per frame costs a syscall each)."""
        if not self._write_scheduled:
            self._write_scheduled = True
            asyncio.get_running_loop().call_soon(self._write_now)

    def _write_now(self) -> None:
        self._write_scheduled = False
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _abort(self, code: int, reason: str, send_goaway: bool = True) -> None:
        """Send GOAWAY(code) unless h2 already queued one, close the transport, fail the streams."""
        if self.closed:
            return
        self.close_reason = reason
        if send_goaway and self.h2.state_machine.state != h2.connection.ConnectionState.CLOSED:
            try:
                self.h2.close_connection(error_code=code)
            except Exception:   # noqa: BLE001 - closing anyway
                pass
        try:
            self._write_now()
        except Exception:   # noqa: BLE001 - the transport may be gone already
            pass
        if self.transport is not None:
            self.transport.close()
        self._closed_down(reason)

    def _closed_down(self, reason: str) -> None:
        if self.close_reason is None:
            self.close_reason = reason
        first = not self.closed
        self.closed = True
        for s in list(self.streams.values()):
            s._fail(ConnectionGone(self.close_reason, retriable=False))
        self.streams.clear()
        self._blocked.clear()
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)
        if first:
            self._on_closed()

    def _on_closed(self) -> None:
        """Hook: the connection ended."""


async def relay_body(source: H2Stream, sink) -> None:
    """Move source's received body to sink (send_data per chunk, flow control carried through), then
    its trailers (send_trailers) or end (end()). Works for any sink with those three methods."""
    while chunk := await source.read():
        await sink.send_data(chunk)
    if source.trailers is not None:
        sink.send_trailers(source.trailers)
    else:
        sink.end()
