"""The client side of the WebSocket protocol (RFC 6455) as bytes in, bytes out: pure, stdlib only.

What the nodes' control channel needs: the opening handshake, masked client frames, a frame
reader for the server's frames, and close frames. sidecar/wsclient.py does the I/O. The websockets
package cost every sidecar 2.8 MiB (it imports urllib.request, http.client, email and
importlib.metadata); this is all of the protocol a node uses.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from dataclasses import dataclass
from typing import Iterator

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"   # RFC 6455 section 1.3
VERSION = b"13"                                    # RFC 6455 section 4.1, Sec-WebSocket-Version

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA   # RFC 6455 5.2
_CONTROL = (OP_CLOSE, OP_PING, OP_PONG)
_KNOWN = (OP_CONT, OP_TEXT, OP_BINARY, *_CONTROL)

CLOSE_NORMAL = 1000            # RFC 6455 section 7.4.1
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_INVALID_DATA = 1007
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011
CLOSE_NO_STATUS = 1005         # never sent: "no status code was present" (7.4.1)
MAX_HEAD = 16 * 1024           # the server's handshake response head


class WebSocketError(Exception):
    """The peer broke the protocol (the message names how); `code` is the close code to send."""

    def __init__(self, message: str, code: int = CLOSE_PROTOCOL_ERROR):
        super().__init__(message)
        self.code = code


def accept_key(key: bytes) -> bytes:
    """The Sec-WebSocket-Accept value the server must answer `key` with (RFC 6455 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


def build_handshake(host: str, path: str, key: bytes) -> bytes:
    """The client's opening handshake request (RFC 6455 4.1)."""
    return (b"GET %b HTTP/1.1\r\nHost: %b\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: %b\r\nSec-WebSocket-Version: %b\r\n\r\n"
            % (path.encode("ascii"), host.encode("ascii"), key, VERSION))


def check_handshake(head: bytes, key: bytes) -> None:
    """Raise WebSocketError naming what is wrong with the server's response head (RFC 6455 4.1,
    the client's checks 1-4); extensions and subprotocols were not asked for, so none may come."""
    lines = head.split(b"\r\n")
    status = lines[0].split(b" ", 2)
    if len(status) < 2 or not status[0].startswith(b"HTTP/1.1") or status[1] != b"101":
        raise WebSocketError(f"server did not switch protocols: {lines[0][:80].decode('latin-1')!r}")
    fields: dict[bytes, bytes] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep:
            raise WebSocketError(f"bad header line in the handshake response: {line[:80].decode('latin-1')!r}")
        fields[name.strip().lower()] = value.strip()
    if fields.get(b"upgrade", b"").lower() != b"websocket":
        raise WebSocketError("handshake response without 'Upgrade: websocket'")
    if b"upgrade" not in [t.strip() for t in fields.get(b"connection", b"").lower().split(b",")]:
        raise WebSocketError("handshake response without 'Connection: Upgrade'")
    if fields.get(b"sec-websocket-accept") != accept_key(key):
        raise WebSocketError("handshake response with a wrong Sec-WebSocket-Accept")
    for name in (b"sec-websocket-extensions", b"sec-websocket-protocol"):
        if fields.get(name):
            raise WebSocketError(f"server chose {name.decode()} {fields[name].decode('latin-1')!r}, none was offered")


def _mask(payload: bytes, mask: bytes) -> bytes:
    """XOR with the 4-byte masking key (RFC 6455 5.3), as one big-integer operation."""
    n = len(payload)
    if not n:
        return b""
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


def encode_frame(opcode: int, payload: bytes, mask: bytes, fin: bool = True) -> bytes:
    """One client frame: masked, as every client-to-server frame must be (RFC 6455 5.1, 5.2)."""
    n = len(payload)
    first = (0x80 if fin else 0) | opcode
    if n < 126:
        head = struct.pack("!BB", first, 0x80 | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", first, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, n)
    return head + mask + _mask(payload, mask)


def encode_close(code: int, reason: str = "") -> bytes:
    """A close frame's payload: status code and UTF-8 reason, at most 125 bytes (RFC 6455 5.5.1)."""
    return struct.pack("!H", code) + reason.encode("utf-8")[:123]


@dataclass(frozen=True)
class Close:
    """A received close frame's status (CLOSE_NO_STATUS when it had none) and reason."""

    code: int
    reason: str


def decode_close(payload: bytes) -> Close:
    """The status of a received close frame; WebSocketError when it is malformed (RFC 6455 5.5.1)."""
    if not payload:
        return Close(CLOSE_NO_STATUS, "")
    if len(payload) == 1:
        raise WebSocketError("close frame with a 1-byte payload")
    code = struct.unpack_from("!H", payload)[0]
    if code < 1000 or code in (1004, CLOSE_NO_STATUS, 1006, 1015) or 1016 <= code < 3000 or code >= 5000:
        raise WebSocketError(f"close frame with the reserved status {code}")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise WebSocketError("close reason is not UTF-8", CLOSE_INVALID_DATA) from None
    return Close(code, reason)


class FrameReader:
    """Server frames from a byte stream, whole messages reassembled: feed() bytes, get back
    (opcode, payload) pairs where opcode is OP_TEXT/OP_BINARY (a whole message) or a control opcode."""

    def __init__(self, max_size: int):
        self.max_size = max_size
        self._buf = bytearray()
        self._parts: list[bytes] = []
        self._msg_op: int | None = None
        self._msg_len = 0

    def feed(self, data: bytes) -> Iterator[tuple[int, bytes]]:
        """Yield what is complete, in order; WebSocketError at a protocol violation (what came
        before it is yielded first). Consume the iterator before the next feed()."""
        buf = self._buf
        buf += data
        while len(buf) >= 2:
            b0, b1 = buf[0], buf[1]
            if b0 & 0x70:
                raise WebSocketError("reserved bits set, no extension was negotiated")   # RFC 6455 5.2
            if b1 & 0x80:
                raise WebSocketError("masked frame from the server")                      # RFC 6455 5.1
            fin, opcode, n = bool(b0 & 0x80), b0 & 0x0F, b1 & 0x7F
            if opcode not in _KNOWN:
                raise WebSocketError(f"unknown opcode {opcode:#x}")
            at = 2
            if n == 126:
                if len(buf) < 4:
                    break
                n, at = struct.unpack_from("!H", buf, 2)[0], 4
            elif n == 127:
                if len(buf) < 10:
                    break
                n, at = struct.unpack_from("!Q", buf, 2)[0], 10
            if opcode in _CONTROL and (n > 125 or not fin):
                raise WebSocketError("control frame longer than 125 bytes or fragmented")   # RFC 6455 5.5
            if opcode not in _CONTROL and self._msg_len + n > self.max_size:
                raise WebSocketError(f"message larger than {self.max_size} bytes", CLOSE_TOO_BIG)
            if len(buf) < at + n:
                break
            payload = bytes(buf[at:at + n])
            del buf[:at + n]
            if opcode in _CONTROL:
                yield opcode, payload
                continue
            if opcode == OP_CONT:
                if self._msg_op is None:
                    raise WebSocketError("continuation frame with no message to continue")
            elif self._msg_op is not None:
                raise WebSocketError("new message before the last one ended")
            else:
                self._msg_op = opcode
            self._parts.append(payload)
            self._msg_len += n
            if fin:
                message = self._msg_op, b"".join(self._parts)
                self._parts, self._msg_op, self._msg_len = [], None, 0
                yield message
