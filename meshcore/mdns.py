"""Multicast DNS responder logic (RFC 6762) for one DNS-SD instance (RFC 6763): pure, stdlib only.

The sidecar answers for its own instance only (a PTR, SRV, TXT and A records), which is all a
browser needs; meshd browses with python-zeroconf. Doing this here instead of with zeroconf in
every sidecar saves ~3.5 MiB per sidecar (bench/RESULTS.md, sidecar memory by import).
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from .dnsname import decode_name, encode_name

MDNS_GROUP = "224.0.0.251"       # RFC 6762 section 3
MDNS_PORT = 5353                 # RFC 6762 section 3
MAX_PACKET = 9000                # RFC 6762 section 17: at most 9000 bytes over multicast

TYPE_A, TYPE_PTR, TYPE_TXT, TYPE_SRV, TYPE_ANY = 1, 12, 16, 33, 255   # RFC 1035 3.2.2, RFC 2782
CLASS_IN = 1
CACHE_FLUSH = 0x8000             # RFC 6762 section 10.2: top bit of rrclass, unique records
UNICAST_RESPONSE = 0x8000        # RFC 6762 section 5.4: top bit of qclass, "QU" question
FLAGS_RESPONSE = 0x8400          # QR + AA (RFC 6762 section 18.2, 18.4)
HOST_TTL = 120                   # RFC 6762 section 10: records naming a host (SRV, A)
OTHER_TTL = 4500                 # RFC 6762 section 10: the others (PTR, TXT)
LEGACY_TTL = 10                  # RFC 6762 section 6.7: answers to one-shot (non-5353) queriers
SERVICES_ENUM = "_services._dns-sd._udp.local."   # RFC 6763 section 9


@dataclass(frozen=True)
class Record:
    """One resource record we own; `unique` records carry the cache-flush bit (RFC 6762 10.2)."""

    name: str
    rtype: int
    ttl: int
    rdata: bytes
    unique: bool


@dataclass(frozen=True)
class Query:
    """A decoded mDNS query: questions (name, type, wants unicast) and its known answers."""

    qid: int
    questions: tuple[tuple[str, int, bool], ...]
    known: tuple[tuple[str, int, int, str], ...]   # (name, type, ttl, PTR target or "")
    raw_questions: bytes                            # echoed in legacy unicast replies (6.7)


def _same(a: str, b: str) -> bool:
    return a.lower() == b.lower()   # RFC 6762 section 16: case-insensitive comparison


def encode_txt_rdata(properties: dict[str, str]) -> bytes:
    """TXT rdata: one length-prefixed "key=value" string per property (RFC 6763 section 6)."""
    out = bytearray()
    for key, value in properties.items():
        item = f"{key}={value}".encode("utf-8")
        if len(item) > 255:
            raise ValueError(f"TXT entry {key!r} is longer than 255 bytes")
        out.append(len(item))
        out += item
    return bytes(out) or b"\x00"   # RFC 6763 section 6.1: never empty rdata


def build_records(service_type: str, instance: str, host: str, port: int, properties: dict[str, str],
                  addresses: list[str]) -> tuple[Record, ...]:
    """The records of one instance: enumeration and service PTRs, SRV, TXT, one A per address."""
    records = [
        Record(SERVICES_ENUM, TYPE_PTR, OTHER_TTL, encode_name(service_type), unique=False),
        Record(service_type, TYPE_PTR, OTHER_TTL, encode_name(instance), unique=False),
        Record(instance, TYPE_SRV, HOST_TTL, struct.pack("!HHH", 0, 0, port) + encode_name(host), unique=True),
        Record(instance, TYPE_TXT, OTHER_TTL, encode_txt_rdata(properties), unique=True),
    ]
    records += [Record(host, TYPE_A, HOST_TTL, socket.inet_aton(a), unique=True) for a in addresses]
    return tuple(records)


def _encode_record(r: Record, ttl: int | None, legacy: bool) -> bytes:
    rclass = CLASS_IN | (CACHE_FLUSH if r.unique and not legacy else 0)   # no flush bit in 6.7 replies
    return encode_name(r.name) + struct.pack("!HHIH", r.rtype, rclass, r.ttl if ttl is None else ttl,
                                             len(r.rdata)) + r.rdata


def encode_response(answers: list[Record] | tuple[Record, ...], additionals: list[Record] | tuple[Record, ...] = (),
                    *, ttl: int | None = None, query: Query | None = None) -> bytes:
    """A response packet; `ttl` overrides every TTL (0: goodbye, RFC 6762 10.1); `query`: a legacy
    unicast reply echoing its id and questions, TTLs capped at 10 s (RFC 6762 6.7)."""
    legacy = query is not None
    if legacy:
        ttl = min(LEGACY_TTL, ttl) if ttl is not None else LEGACY_TTL
    header = struct.pack("!HHHHHH", query.qid if legacy else 0, FLAGS_RESPONSE,
                         len(query.questions) if legacy else 0, len(answers), 0, len(additionals))
    body = (query.raw_questions if legacy else b"") + b"".join(
        _encode_record(r, ttl, legacy) for r in (*answers, *additionals))
    return header + body


def decode_query(packet: bytes) -> Query | None:
    """The query in a packet; None for responses; ValueError when it is malformed."""
    if len(packet) < 12:
        raise ValueError("shorter than a DNS header")
    qid, flags, qd, an, _ns, _ar = struct.unpack_from("!HHHHHH", packet)
    if flags & 0x8000:        # QR set: a response, not ours to answer
        return None
    if flags & 0x7800:        # RFC 6762 18.3: OPCODE other than 0 is silently ignored
        return None
    offset = 12
    questions = []
    for _ in range(qd):
        name, offset = decode_name(packet, offset)
        if offset + 4 > len(packet):
            raise ValueError("truncated question")
        qtype, qclass = struct.unpack_from("!HH", packet, offset)
        offset += 4
        questions.append((name, qtype, bool(qclass & UNICAST_RESPONSE)))
    raw_questions = packet[12:offset]
    known = []
    for _ in range(an):       # known answers (RFC 6762 7.1)
        name, offset = decode_name(packet, offset)
        if offset + 10 > len(packet):
            raise ValueError("truncated known answer")
        rtype, _rclass, ttl, rdlen = struct.unpack_from("!HHIH", packet, offset)
        offset += 10
        if offset + rdlen > len(packet):
            raise ValueError("known answer rdata runs past the packet")
        target = decode_name(packet, offset)[0] if rtype == TYPE_PTR else ""
        offset += rdlen
        known.append((name, rtype, ttl, target))
    return Query(qid, tuple(questions), tuple(known), raw_questions)


def _known(query: Query, record: Record) -> bool:
    """RFC 6762 7.1: a shared answer the querier already holds with at least half its TTL."""
    if record.rtype != TYPE_PTR:
        return False
    target = decode_name(record.rdata, 0)[0]
    return any(_same(n, record.name) and t == TYPE_PTR and _same(tgt, target) and ttl >= record.ttl // 2
               for n, t, ttl, tgt in query.known)


def build_answer(query: Query, records: tuple[Record, ...]) -> tuple[list[Record], list[Record]]:
    """(answers, additionals) for a query about our records: PTR answers bring the instance's SRV,
    TXT and A records as additionals, SRV answers its A records (RFC 6763 section 12)."""
    answers: list[Record] = []
    for name, qtype, _unicast in query.questions:
        for r in records:
            if _same(r.name, name) and qtype in (r.rtype, TYPE_ANY) and r not in answers and not _known(query, r):
                answers.append(r)
    additionals: list[Record] = []
    for a in list(answers):
        if a.rtype == TYPE_PTR:
            target = decode_name(a.rdata, 0)[0]
            wanted = [r for r in records if _same(r.name, target) and r.rtype in (TYPE_SRV, TYPE_TXT)]
        elif a.rtype == TYPE_SRV:
            wanted = []
        else:
            continue
        host = next((decode_name(r.rdata, 6)[0] for r in (*wanted, a) if r.rtype == TYPE_SRV), None)
        if host is not None:
            wanted += [r for r in records if r.rtype == TYPE_A and _same(r.name, host)]
        additionals += [r for r in wanted if r not in answers and r not in additionals]
    return answers, additionals


def has_shared(records: list[Record]) -> bool:
    """Whether an answer holds a shared record (RFC 6762 6: delay such replies 20-120 ms)."""
    return any(not r.unique for r in records)
