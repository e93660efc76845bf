"""meshcore.mdns: the sidecar's mDNS responder logic, checked against python-zeroconf's own codec."""

from __future__ import annotations

import struct

import pytest
from zeroconf import DNSIncoming, DNSOutgoing, DNSPointer, DNSQuestion, const

from meshcore import mdns
from meshcore.dnssd import SERVICE_TYPE

INSTANCE = "abcdef123456._mesh._tcp.local."
HOST = "abcdef123456.local."
TXT = {"service": "payments", "version": "v1", "identity": "spiffe://mesh.local/ns/default/sa/payments",
       "protocol": "http", "container": "abcdef1234567890"}
RECORDS = mdns.build_records(SERVICE_TYPE, INSTANCE, HOST, 15006, TXT, ["172.20.0.5", "172.21.0.7"])


def query(*questions: tuple[str, int], unicast: bool = False, known: tuple = ()) -> bytes:
    """A query as python-zeroconf's browser and resolver build it."""
    out = DNSOutgoing(const._FLAGS_QR_QUERY)
    for name, qtype in questions:
        q = DNSQuestion(name, qtype, const._CLASS_IN)
        q.unicast = unicast
        out.add_question(q)
    for name, target, ttl in known:
        out.add_answer_at_time(DNSPointer(name, const._TYPE_PTR, const._CLASS_IN, ttl, target), 0)
    return out.packets()[0]


def parsed(packet: bytes) -> dict[tuple[str, int], list]:
    """{(name, type): [records]} of a response, read by zeroconf's DNSIncoming."""
    msg = DNSIncoming(packet)
    assert msg.valid and msg.is_response()
    out: dict = {}
    for r in msg.answers():
        out.setdefault((r.name, r.type), []).append(r)
    return out


def test_records_read_back_by_zeroconf():
    got = parsed(mdns.encode_response(RECORDS))
    assert got[(SERVICE_TYPE, const._TYPE_PTR)][0].alias == INSTANCE
    assert got[(mdns.SERVICES_ENUM, const._TYPE_PTR)][0].alias == SERVICE_TYPE
    srv = got[(INSTANCE, const._TYPE_SRV)][0]
    assert (srv.port, srv.server, srv.ttl) == (15006, HOST, mdns.HOST_TTL)
    assert srv.unique   # cache-flush bit on unique records
    txt = got[(INSTANCE, const._TYPE_TXT)][0]
    assert txt.text == b"".join(bytes([len(i)]) + i for i in (f"{k}={v}".encode() for k, v in TXT.items()))
    assert sorted(a.address for a in got[(HOST, const._TYPE_A)]) == [bytes([172, 20, 0, 5]), bytes([172, 21, 0, 7])]
    assert not got[(SERVICE_TYPE, const._TYPE_PTR)][0].unique   # PTR is shared


def test_goodbye_sets_every_ttl_to_zero():
    got = parsed(mdns.encode_response(RECORDS, ttl=0))
    assert {r.ttl for rs in got.values() for r in rs} == {0}
    assert sum(len(rs) for rs in got.values()) == len(RECORDS)


def test_responses_are_not_answered():
    assert mdns.decode_query(mdns.encode_response(RECORDS)) is None


@pytest.mark.parametrize("packet", [b"", b"\x00" * 11, b"\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x05_mesh",
                                    b"\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00"])
def test_truncated_queries_raise(packet):
    with pytest.raises(ValueError):
        mdns.decode_query(packet)


def test_other_opcodes_are_ignored():
    packet = bytearray(query((SERVICE_TYPE, const._TYPE_PTR)))
    packet[2] |= 0x28   # OPCODE 5 (UPDATE)
    assert mdns.decode_query(bytes(packet)) is None


def kinds(records):
    return sorted((r.name, r.rtype) for r in records)


@pytest.mark.parametrize("question, answers, additionals", [
    ((SERVICE_TYPE, mdns.TYPE_PTR), [(SERVICE_TYPE, 12)],
     [(HOST, 1), (HOST, 1), (INSTANCE, 16), (INSTANCE, 33)]),
    ((INSTANCE.upper(), mdns.TYPE_SRV), [(INSTANCE, 33)], [(HOST, 1), (HOST, 1)]),   # case-insensitive
    ((INSTANCE, mdns.TYPE_TXT), [(INSTANCE, 16)], []),
    ((HOST, mdns.TYPE_A), [(HOST, 1), (HOST, 1)], []),
    ((INSTANCE, mdns.TYPE_ANY), [(INSTANCE, 16), (INSTANCE, 33)], [(HOST, 1), (HOST, 1)]),
    ((mdns.SERVICES_ENUM, mdns.TYPE_PTR), [(mdns.SERVICES_ENUM, 12)], []),
    (("other._mesh._tcp.local.", mdns.TYPE_SRV), [], []),
    ((HOST, 28), [], []),   # AAAA: we have none
])
def test_answers_and_additionals(question, answers, additionals):
    q = mdns.decode_query(query(question))
    got_answers, got_additionals = mdns.build_answer(q, RECORDS)
    assert kinds(got_answers) == sorted(answers)
    assert kinds(got_additionals) == sorted(additionals)


def test_unicast_bit_decoded():
    q = mdns.decode_query(query((SERVICE_TYPE, mdns.TYPE_PTR), unicast=True))
    assert q.questions == ((SERVICE_TYPE, mdns.TYPE_PTR, True),)


@pytest.mark.parametrize("ttl, suppressed", [(4500, True), (2250, True), (2249, False), (0, False)])
def test_known_answer_suppression(ttl, suppressed):
    """RFC 6762 7.1: a PTR the querier holds with at least half its TTL is not repeated."""
    q = mdns.decode_query(query((SERVICE_TYPE, mdns.TYPE_PTR), known=((SERVICE_TYPE, INSTANCE, ttl),)))
    answers, _ = mdns.build_answer(q, RECORDS)
    assert (answers == []) is suppressed


def test_known_answer_of_another_instance_does_not_suppress():
    q = mdns.decode_query(query((SERVICE_TYPE, mdns.TYPE_PTR),
                                known=((SERVICE_TYPE, "zzz._mesh._tcp.local.", 4500),)))
    assert kinds(mdns.build_answer(q, RECORDS)[0]) == [(SERVICE_TYPE, 12)]


def test_legacy_unicast_reply_echoes_id_and_question_caps_ttl_and_drops_flush_bit():
    packet = bytearray(query((INSTANCE, mdns.TYPE_SRV)))
    packet[0:2] = struct.pack("!H", 0x1234)
    q = mdns.decode_query(bytes(packet))
    answers, additionals = mdns.build_answer(q, RECORDS)
    reply = mdns.encode_response(answers, additionals, query=q)
    msg = DNSIncoming(reply)
    assert msg.id == 0x1234
    assert [(x.name, x.type) for x in msg.questions] == [(INSTANCE, const._TYPE_SRV)]
    assert {r.ttl for r in msg.answers()} == {mdns.LEGACY_TTL}
    assert not any(r.unique for r in msg.answers())


def test_shared_answers_are_delayed():
    q = mdns.decode_query(query((SERVICE_TYPE, mdns.TYPE_PTR)))
    assert mdns.has_shared(mdns.build_answer(q, RECORDS)[0])
    q = mdns.decode_query(query((INSTANCE, mdns.TYPE_SRV)))
    assert not mdns.has_shared(mdns.build_answer(q, RECORDS)[0])


def test_txt_entry_too_long_is_named():
    with pytest.raises(ValueError, match="'identity'"):
        mdns.encode_txt_rdata({"identity": "x" * 300})
