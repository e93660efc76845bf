"""Fuzz target: the mDNS responder's query path (sidecar.announce._on_readable): decode_query, then
build_answer over our records and the reply, legacy unicast included. Anyone on the bridge can send
these packets: anything but ValueError (what the responder drops) is a finding, and so is a reply
that does not answer a question asked or that echoes other bytes than the questions."""

from __future__ import annotations

import struct

from hypothesis import strategies as st

from meshcore import mdns
from tests.fuzz.engine import Target, corpus_test, fuzz_test

INSTANCE = "abc123._mesh._tcp.local."
RECORDS = mdns.build_records("_mesh._tcp.local.", INSTANCE, "abc123.local.", 8080, {"service": "catalog"},
                             ["172.18.0.5"])


def check(packet: bytes) -> None:
    try:
        query = mdns.decode_query(packet)
        if query is None:
            return
        answers, additionals = mdns.build_answer(query, RECORDS)
    except ValueError:
        return
    asked = {name.lower() for name, _, _ in query.questions}
    assert all(r.name.lower() in asked for r in answers), (answers, query.questions)
    assert all(r in RECORDS for r in (*answers, *additionals))
    reply = mdns.encode_response(answers, additionals, query=query)
    assert reply[12:12 + len(query.raw_questions)] == query.raw_questions
    assert struct.unpack_from("!H", reply, 4)[0] == len(query.questions)
    mdns.encode_response(answers, additionals)


def _name(labels: list[bytes]) -> bytes:
    return b"".join(bytes([len(x)]) + x for x in labels) + b"\x00"


label = st.one_of(st.sampled_from((b"abc123", b"_mesh", b"_tcp", b"local", b"_services", b"_dns-sd", b"_udp",
                                   b"ABC123", b"\xff\xfe", b"a.b")), st.binary(min_size=1, max_size=8))
name = st.one_of(st.lists(label, max_size=5).map(_name),
                 st.sampled_from((b"\xc0\x0c", b"\xc0\x00", b"\xc0", b"\x40ab", b"\x3fab", b"\xc0\x10")),
                 st.binary(max_size=10))
question = st.tuples(name, st.sampled_from((1, 12, 16, 33, 255, 28)), st.integers(0, 0xFFFF)).map(
    lambda q: q[0] + struct.pack("!HH", q[1], q[2]))
known = st.tuples(name, st.sampled_from((12, 33, 1)), st.integers(0, 0xFFFFFFFF),
                  st.one_of(name, st.binary(max_size=8))).map(
    lambda a: a[0] + struct.pack("!HHIH", a[1], 1, a[2], len(a[3])) + a[3])
packet = st.builds(
    lambda flags, qs, ks, qd, an, tail: struct.pack("!HHHHHH", 7, flags, qd if qd >= 0 else len(qs),
                                                    an if an >= 0 else len(ks), 0, 0)
    + b"".join(qs) + b"".join(ks) + tail,
    st.sampled_from((0, 0x8400, 0x0800, 0x0100)), st.lists(question, max_size=4), st.lists(known, max_size=3),
    st.integers(-1, 6), st.integers(-1, 4), st.binary(max_size=4))

TARGET = Target("mdns", check, st.one_of(packet, st.binary(max_size=40)),
                (b"\xc0\x0c", b"\x05local\x00", b"\x00\x0c\x00\x01"))
test_fuzz_mdns = fuzz_test(TARGET, examples=900)
test_corpus_mdns = corpus_test(TARGET)
