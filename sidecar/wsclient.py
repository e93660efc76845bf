"""A WebSocket client connection on asyncio streams, for the nodes' control channel to meshd.

The protocol is meshcore.websocket's (RFC 6455, no extensions); this module does the I/O: connect
and handshake under one timeout, a reader task answering pings and collecting messages, a
keepalive ping with a deadline for its pong, and the closing handshake.
"""

from __future__ import annotations

import asyncio
import base64
import os
import ssl as _ssl
from urllib.parse import urlsplit

from meshcore import websocket as wsp
from meshcore.websocket import Close, WebSocketError

__all__ = ["ClientConnection", "ConnectionClosed", "WebSocketError", "connect"]

READ_CHUNK = 64 * 1024


class ConnectionClosed(WebSocketError):
    """The connection is closed; `rcvd` is the server's close frame (a Close), or None if none came."""

    def __init__(self, rcvd: Close | None):
        super().__init__(f"connection closed ({rcvd.code} {rcvd.reason})".strip() if rcvd else
                         "connection closed without a close frame")
        self.rcvd = rcvd


_CLOSED = object()   # queued after the last message


class ClientConnection:
    """An open connection: send() text or bytes, recv() whole messages, close()."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, max_size: int,
                 ping_interval: float | None, ping_timeout: float, close_timeout: float):
        self.open = True
        self.rcvd: Close | None = None
        self._reader = reader
        self._writer = writer
        self._frames = wsp.FrameReader(max_size)
        self._messages: asyncio.Queue = asyncio.Queue()
        self._pong: asyncio.Future | None = None
        self._ping_timeout = ping_timeout
        self._close_timeout = close_timeout
        self._read_task = asyncio.ensure_future(self._read_loop())
        self._ping_task = asyncio.ensure_future(self._keepalive(ping_interval)) if ping_interval else None

    def _write(self, opcode: int, payload: bytes) -> None:
        if not self._writer.is_closing():
            self._writer.write(wsp.encode_frame(opcode, payload, os.urandom(4)))   # a fresh mask per frame (5.3)

    async def send(self, message: str | bytes) -> None:
        """Send one message (text for str); ConnectionClosed once the connection is closed."""
        if not self.open:
            raise ConnectionClosed(self.rcvd)
        if isinstance(message, str):
            self._write(wsp.OP_TEXT, message.encode("utf-8"))
        else:
            self._write(wsp.OP_BINARY, message)
        try:
            await self._writer.drain()
        except (OSError, RuntimeError):
            raise ConnectionClosed(self.rcvd) from None

    async def recv(self) -> str | bytes:
        """The next message (str for text); ConnectionClosed after the last one."""
        item = await self._messages.get()
        if item is _CLOSED:
            self._messages.put_nowait(_CLOSED)   # every later recv() raises too
            raise ConnectionClosed(self.rcvd)
        return item

    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self._reader.read(READ_CHUNK)
                if not data:
                    return   # TCP closed without a close frame (rcvd stays None)
                for opcode, payload in self._frames.feed(data):
                    if opcode == wsp.OP_TEXT:
                        try:
                            self._messages.put_nowait(payload.decode("utf-8"))
                        except UnicodeDecodeError:
                            raise WebSocketError("text message is not UTF-8", wsp.CLOSE_INVALID_DATA) from None
                    elif opcode == wsp.OP_BINARY:
                        self._messages.put_nowait(payload)
                    elif opcode == wsp.OP_PING:
                        self._write(wsp.OP_PONG, payload)   # RFC 6455 5.5.3: same payload
                    elif opcode == wsp.OP_PONG:
                        if self._pong is not None and not self._pong.done():
                            self._pong.set_result(None)
                    else:   # OP_CLOSE: echo its status (RFC 6455 5.5.1), then the server closes TCP
                        self.rcvd = wsp.decode_close(payload)
                        if self.open:
                            self.open = False
                            code = self.rcvd.code if self.rcvd.code != wsp.CLOSE_NO_STATUS else wsp.CLOSE_NORMAL
                            self._write(wsp.OP_CLOSE, wsp.encode_close(code))
                        return
        except WebSocketError as exc:
            if self.open:
                self.open = False
                self._write(wsp.OP_CLOSE, wsp.encode_close(exc.code, str(exc)))
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._finish()

    def _finish(self) -> None:
        self.open = False
        self._messages.put_nowait(_CLOSED)
        if self._ping_task is not None:
            self._ping_task.cancel()
        if self._pong is not None and not self._pong.done():
            self._pong.cancel()
        self._writer.close()

    async def _keepalive(self, interval: float) -> None:
        """Ping every `interval`; a pong missing for ping_timeout means the peer is gone: abort."""
        loop = asyncio.get_running_loop()
        while self.open:
            await asyncio.sleep(interval)
            self._pong = loop.create_future()
            self._write(wsp.OP_PING, os.urandom(4))
            try:
                await asyncio.wait_for(self._pong, self._ping_timeout)
            except asyncio.TimeoutError:
                self._writer.transport.abort()
                return

    async def close(self, code: int = wsp.CLOSE_NORMAL, reason: str = "") -> None:
        """The closing handshake: send a close frame, wait (close_timeout) for the server's, then drop."""
        if self.open:
            self.open = False
            self._write(wsp.OP_CLOSE, wsp.encode_close(code, reason))
        try:
            await asyncio.wait_for(asyncio.shield(self._read_task), self._close_timeout)
        except asyncio.TimeoutError:
            self._read_task.cancel()   # its finally closes the writer
        self._writer.close()
        try:
            await asyncio.wait_for(self._writer.wait_closed(), self._close_timeout)
        except (OSError, asyncio.TimeoutError):
            self._writer.transport.abort()


class connect:
    """`async with connect(url, ...) as ws`: TCP (TLS for wss), then the opening handshake, all
    within open_timeout; the connection is closed when the block ends."""

    def __init__(self, url: str, *, ssl: _ssl.SSLContext | None = None, max_size: int = 1 << 20,
                 ping_interval: float | None = 20.0, ping_timeout: float = 20.0, open_timeout: float = 10.0,
                 close_timeout: float = 10.0):
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError(f"not a ws:// or wss:// URL: {url!r}")
        self.secure = parts.scheme == "wss"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.secure else 80)
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.authority = parts.netloc.rpartition("@")[2]
        self.ssl = (ssl or _ssl.create_default_context()) if self.secure else None
        self.options = {"max_size": max_size, "ping_interval": ping_interval, "ping_timeout": ping_timeout,
                        "close_timeout": close_timeout}
        self.open_timeout = open_timeout
        self.connection: ClientConnection | None = None

    async def _open(self) -> ClientConnection:
        reader, writer = await asyncio.open_connection(
            self.host, self.port, ssl=self.ssl, server_hostname=self.host if self.ssl else None,
            limit=wsp.MAX_HEAD)
        try:
            key = base64.b64encode(os.urandom(16))   # RFC 6455 4.1: 16 random bytes, base64
            writer.write(wsp.build_handshake(self.authority, self.path, key))
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.LimitOverrunError:
                raise WebSocketError("handshake response head too large") from None
            except asyncio.IncompleteReadError:
                raise ConnectionClosed(None) from None
            wsp.check_handshake(head[:-4], key)
        except BaseException:
            writer.close()
            raise
        return ClientConnection(reader, writer, **self.options)

    async def __aenter__(self) -> ClientConnection:
        self.connection = await asyncio.wait_for(self._open(), self.open_timeout)
        return self.connection

    async def __aexit__(self, *exc) -> None:
        if self.connection is not None:
            await self.connection.close()
