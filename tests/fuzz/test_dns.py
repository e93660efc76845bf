"""Fuzz target: the sidecar's DNS server (sidecar.dns.DnsServer.answer, what both its UDP and TCP
paths call on the app's query bytes). It must never raise; it answers locally only a standard IN query
whose name is, label for label, a mesh name (any other bytes are forwarded, so a mis-read name is a
wrong answer); its answer echoes the question and the ID and is itself a well-formed message."""

from __future__ import annotations

import struct

from hypothesis import strategies as st

from sidecar import dns
from tests.fuzz.engine import Target, corpus_test, fuzz_test

NAMES = {"catalog": "240.240.0.7", "catalog.shop": "240.240.0.7", "orders": "240.240.1.2"}
SERVER = dns.DnsServer(lambda: NAMES)


def wire_labels(msg: bytes, offset: int) -> tuple[bytes, ...]:
    """The question name's labels as bytes, read independently of sidecar.dns (pointers followed)."""
    labels = []
    for _ in range(64):
        n = msg[offset]
        if n >= 0xC0:
            offset = ((n & 0x3F) << 8) | msg[offset + 1]
            continue
        if n == 0:
            return tuple(labels)
        labels.append(msg[offset + 1:offset + 1 + n].lower())
        offset += 1 + n
    raise AssertionError("the server answered a name with a pointer loop")


def check(msg: bytes) -> None:
    reply = SERVER.answer(msg)
    dns.error_response(msg, dns.RCODE_SERVFAIL)
    if reply is None:
        return
    labels = wire_labels(msg, 12)
    assert b".".join(labels).decode("ascii") in NAMES and all(b"." not in x for x in labels), (
        f"answered {labels} locally, not a mesh name")
    query = dns.parse_query(msg)
    assert reply[:2] == msg[:2] and reply[2] & 0x80, "not a response with the query's ID"
    assert dns.parse_query(reply).question == query.question
    qd, an = struct.unpack_from("!HH", reply, 4)
    assert qd == 1 and len(reply) == 12 + len(query.question) + 16 * an


label = st.one_of(st.sampled_from((b"catalog", b"CATALOG", b"shop", b"orders", b"catalog.shop", b"cat\x00alog",
                                   b"catalog\xff", b"x" * 63, b"x" * 64)), st.binary(min_size=1, max_size=6))
name = st.one_of(st.lists(label, max_size=4).map(lambda ls: b"".join(bytes([len(x) & 0xFF]) + x for x in ls) + b"\0"),
                 st.sampled_from((b"\xc0\x0c", b"\xc0\x0c\x00", b"\xc0\x10", b"\x80a", b"\x40a")),
                 st.binary(max_size=8))
message = st.builds(
    lambda ident, flags, qd, an, nm, qtype, qclass, tail: struct.pack("!HHHHHH", ident, flags, qd, an, 0, 0) + nm
    + struct.pack("!HH", qtype, qclass) + tail,
    st.integers(0, 0xFFFF), st.sampled_from((0x0100, 0, 0x8100, 0x0900, 0x7800)),
    st.sampled_from((1, 0, 2, 0xFFFF)), st.sampled_from((0, 1)), name, st.sampled_from((1, 28, 255, 5)),
    st.sampled_from((1, 255, 3)), st.binary(max_size=6))

TARGET = Target("dns", check, st.one_of(message, st.binary(max_size=40)),
                (b"\x07catalog\x00", b"\x04shop", b"\xc0\x0c"))
test_fuzz_dns = fuzz_test(TARGET, examples=1200)
test_corpus_dns = corpus_test(TARGET)
