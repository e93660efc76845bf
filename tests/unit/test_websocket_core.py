"""meshcore.websocket: the control channel's RFC 6455 client side, with the RFC's own examples."""

from __future__ import annotations

import struct

import pytest

from meshcore import websocket as ws
from meshcore.websocket import Close, FrameReader, WebSocketError

RFC_KEY = b"dGhlIHNhbXBsZSBub25jZQ=="        # RFC 6455 section 1.3
RFC_ACCEPT = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_accept_key_of_the_rfc_example():
    assert ws.accept_key(RFC_KEY) == RFC_ACCEPT


def test_handshake_request():
    req = ws.build_handshake("172.18.0.1:15012", "/v1/stream", RFC_KEY)
    assert req.startswith(b"GET /v1/stream HTTP/1.1\r\nHost: 172.18.0.1:15012\r\n")
    assert b"\r\nSec-WebSocket-Key: " + RFC_KEY + b"\r\n" in req
    assert b"\r\nSec-WebSocket-Version: 13\r\n" in req and req.endswith(b"\r\n\r\n")


GOOD = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + RFC_ACCEPT)


def test_good_handshake_response_passes():
    ws.check_handshake(GOOD, RFC_KEY)
    ws.check_handshake(GOOD.replace(b"Upgrade: websocket", b"upgrade:WebSocket")
                       .replace(b"Connection: Upgrade", b"Connection: keep-alive, Upgrade"), RFC_KEY)


@pytest.mark.parametrize("head, why", [
    (GOOD.replace(b"101 Switching Protocols", b"403 Forbidden"), "did not switch protocols: 'HTTP/1.1 403"),
    (GOOD.replace(b"Upgrade: websocket\r\n", b""), "Upgrade: websocket"),
    (GOOD.replace(b"Connection: Upgrade", b"Connection: close"), "Connection: Upgrade"),
    (GOOD.replace(RFC_ACCEPT, b"AAAA"), "wrong Sec-WebSocket-Accept"),
    (GOOD + b"\r\nSec-WebSocket-Extensions: permessage-deflate", "sec-websocket-extensions 'permessage-deflate'"),
    (GOOD + b"\r\nnocolon", "bad header line"),
])
def test_bad_handshake_responses_are_named(head, why):
    with pytest.raises(WebSocketError, match=why):
        ws.check_handshake(head, RFC_KEY)


def test_masked_text_frame_of_the_rfc_example():
    """RFC 6455 5.7: a single-frame masked text message containing "Hello"."""
    frame = ws.encode_frame(ws.OP_TEXT, b"Hello", bytes.fromhex("37fa213d"))
    assert frame == bytes.fromhex("818537fa213d7f9f4d5158")


@pytest.mark.parametrize("size, header_len", [(0, 6), (125, 6), (126, 8), (65535, 8), (65536, 14)])
def test_frame_length_forms(size, header_len):
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    mask = b"\x01\x02\x03\x04"
    frame = ws.encode_frame(ws.OP_BINARY, payload, mask)
    assert len(frame) == header_len + size
    assert frame[1] & 0x80   # every client frame is masked
    body = frame[header_len:]
    assert bytes(b ^ mask[i % 4] for i, b in enumerate(body)) == payload


def unmasked(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """A server frame (never masked)."""
    n = len(payload)
    first = (0x80 if fin else 0) | opcode
    if n < 126:
        return struct.pack("!BB", first, n) + payload
    if n < 65536:
        return struct.pack("!BBH", first, 126, n) + payload
    return struct.pack("!BBQ", first, 127, n) + payload


RFC_STREAM = (bytes.fromhex("810548656c6c6f")          # unmasked "Hello"
              + bytes.fromhex("010348656c") + bytes.fromhex("80026c6f")   # fragmented "Hel" + "lo"
              + bytes.fromhex("890548656c6c6f")        # ping "Hello"
              + unmasked(ws.OP_BINARY, b"\xab" * 256)  # 16-bit length
              + unmasked(ws.OP_BINARY, b"\xcd" * 65536))   # 64-bit length
RFC_MESSAGES = [(ws.OP_TEXT, b"Hello"), (ws.OP_TEXT, b"Hello"), (ws.OP_PING, b"Hello"),
                (ws.OP_BINARY, b"\xab" * 256), (ws.OP_BINARY, b"\xcd" * 65536)]


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 1000, len(RFC_STREAM)])
def test_reader_reassembles_at_any_chunking(chunk):
    reader = FrameReader(max_size=1 << 20)
    got = []
    for i in range(0, len(RFC_STREAM), chunk):
        got += reader.feed(RFC_STREAM[i:i + chunk])
    assert got == RFC_MESSAGES


def test_control_frame_between_fragments_is_delivered_first():
    reader = FrameReader(max_size=100)
    data = unmasked(ws.OP_TEXT, b"ab", fin=False) + unmasked(ws.OP_PING, b"p") + unmasked(ws.OP_CONT, b"cd")
    assert list(reader.feed(data)) == [(ws.OP_PING, b"p"), (ws.OP_TEXT, b"abcd")]


@pytest.mark.parametrize("data, why, code", [
    (b"\xc1\x00", "reserved bits", ws.CLOSE_PROTOCOL_ERROR),
    (b"\x81\x81abcdx", "masked frame from the server", ws.CLOSE_PROTOCOL_ERROR),
    (b"\x83\x00", "unknown opcode 0x3", ws.CLOSE_PROTOCOL_ERROR),
    (unmasked(ws.OP_PING, b"x" * 126), "control frame longer", ws.CLOSE_PROTOCOL_ERROR),
    (unmasked(ws.OP_PING, b"x", fin=False), "fragmented", ws.CLOSE_PROTOCOL_ERROR),
    (unmasked(ws.OP_CONT, b"x"), "continuation frame with no message", ws.CLOSE_PROTOCOL_ERROR),
    (unmasked(ws.OP_TEXT, b"a", fin=False) + unmasked(ws.OP_TEXT, b"b"), "new message before",
     ws.CLOSE_PROTOCOL_ERROR),
    (unmasked(ws.OP_BINARY, b"x" * 101), "larger than 100 bytes", ws.CLOSE_TOO_BIG),
    (unmasked(ws.OP_TEXT, b"x" * 60, fin=False) + unmasked(ws.OP_CONT, b"x" * 60), "larger than 100",
     ws.CLOSE_TOO_BIG),
])
def test_protocol_violations_name_the_problem_and_the_close_code(data, why, code):
    with pytest.raises(WebSocketError, match=why) as err:
        list(FrameReader(max_size=100).feed(data))
    assert err.value.code == code


def test_messages_before_a_violation_come_out_first():
    frames = FrameReader(max_size=100).feed(unmasked(ws.OP_TEXT, b"ok") + b"\xc1\x00")
    assert next(frames) == (ws.OP_TEXT, b"ok")
    with pytest.raises(WebSocketError, match="reserved bits"):
        next(frames)


def test_too_big_is_refused_from_the_header_alone():
    """A 2**40-byte length is refused before any payload arrives (no buffering toward it)."""
    with pytest.raises(WebSocketError, match="larger than"):
        list(FrameReader(max_size=1 << 20).feed(struct.pack("!BBQ", 0x82, 127, 1 << 40)))


@pytest.mark.parametrize("payload, close", [
    (b"", Close(ws.CLOSE_NO_STATUS, "")),
    (struct.pack("!H", 1000), Close(1000, "")),
    (struct.pack("!H", 4401) + b"bad token", Close(4401, "bad token")),
    (struct.pack("!H", 1011) + "é".encode(), Close(1011, "é")),
])
def test_close_payloads(payload, close):
    assert ws.decode_close(payload) == close
    if close.code != ws.CLOSE_NO_STATUS:
        assert ws.decode_close(ws.encode_close(close.code, close.reason)) == close


@pytest.mark.parametrize("payload, why", [
    (b"\x03", "1-byte payload"),
    (struct.pack("!H", 999), "reserved status 999"),
    (struct.pack("!H", 1005), "reserved status 1005"),
    (struct.pack("!H", 2000), "reserved status 2000"),
    (struct.pack("!H", 1000) + b"\xff", "not UTF-8"),
])
def test_bad_close_payloads(payload, why):
    with pytest.raises(WebSocketError, match=why):
        ws.decode_close(payload)


def test_close_reason_is_cut_to_fit_a_control_frame():
    assert len(ws.encode_close(1000, "x" * 500)) == 125
