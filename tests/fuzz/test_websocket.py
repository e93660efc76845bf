"""Fuzz target: the websocket client's reading of what the server sends (meshcore.websocket, as
sidecar.wsclient uses it): the handshake response check, the frame reader and close payloads. Only
WebSocketError may come out (wsclient closes on it); the frames read must not depend on how the
stream was split into reads; every message is within max_size and control payloads within 125 bytes."""

from __future__ import annotations

import struct

from hypothesis import strategies as st

from meshcore import websocket as ws
from tests.fuzz.engine import Target, corpus_test, fuzz_test

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
MAX_SIZE = 256


def read_all(stream: bytes, cuts: list[int]) -> tuple[list, str | None]:
    """The frames FrameReader yields for `stream` fed in pieces cut at `cuts`, and its error."""
    reader = ws.FrameReader(MAX_SIZE)
    out: list = []
    start = 0
    try:
        for cut in [*cuts, len(stream)]:
            for opcode, payload in reader.feed(stream[start:cut]):
                out.append((opcode, payload))
                if opcode == ws.OP_CLOSE:
                    ws.decode_close(payload)
            start = cut
    except ws.WebSocketError as exc:
        return out, f"{exc} ({exc.code})"
    return out, None


def check(data: bytes) -> None:
    """data: the handshake response head up to the first blank line, then the frame stream; its first
    byte seeds where the stream is cut into reads."""
    head, sep, stream = data.partition(b"\r\n\r\n")
    if not sep:
        head, stream = b"", data
    try:
        ws.check_handshake(head, KEY)
    except ws.WebSocketError:
        pass
    whole, error = read_all(stream, [])
    step = (stream[0] % 7 + 1) if stream else 1
    pieces, error_in_pieces = read_all(stream, list(range(step, len(stream), step)))
    assert (whole, error) == (pieces, error_in_pieces), "the frames depend on how reads split the stream"
    for opcode, payload in whole:
        assert opcode in (ws.OP_TEXT, ws.OP_BINARY, ws.OP_CLOSE, ws.OP_PING, ws.OP_PONG), opcode
        assert len(payload) <= (125 if opcode >= ws.OP_CLOSE else MAX_SIZE)


def _frame(first: int, payload: bytes, length_form: int, masked: bool) -> bytes:
    n = len(payload)
    if length_form == 0 and n < 126:
        head = struct.pack("!BB", first, n | (0x80 if masked else 0))
    elif length_form == 1:
        head = struct.pack("!BBH", first, 126 | (0x80 if masked else 0), n)
    else:
        head = struct.pack("!BBQ", first, 127 | (0x80 if masked else 0), n)
    return head + (b"\x01\x02\x03\x04" if masked else b"") + payload


first_byte = st.one_of(st.sampled_from((0x81, 0x82, 0x01, 0x00, 0x80, 0x88, 0x89, 0x8A, 0x09, 0xC1, 0x83)),
                       st.integers(0, 255))
payload = st.one_of(st.binary(max_size=20), st.sampled_from((b"\x03\xe8", b"\x03\xe8bye", b"\x03", b"\x03\xe8\xff",
                                                            b"\x0b\xb8", b"\x03\xed", b"x" * 126, b"y" * 300)))
frame = st.builds(_frame, first_byte, payload,
                  st.sampled_from((0, 0, 0, 1, 2)), st.booleans())
HANDSHAKE = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             b"Sec-WebSocket-Accept: " + ws.accept_key(KEY) + b"\r\n\r\n")
stream = st.tuples(st.sampled_from((HANDSHAKE, b"HTTP/1.1 200 OK\r\n\r\n", b"")),
                   st.lists(frame, max_size=5).map(b"".join), st.binary(max_size=4)).map(b"".join)

TARGET = Target("websocket", check, st.one_of(stream, st.binary(max_size=40)),
                (b"\x81\x05", b"\x88\x02\x03\xe8", b"\x7f", b"\x7e"))
test_fuzz_websocket = fuzz_test(TARGET, examples=1500)
test_corpus_websocket = corpus_test(TARGET)
