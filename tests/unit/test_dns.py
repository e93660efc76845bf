"""sidecar.dns: RFC 1035 section 4.1 messages, the answer logic and virtual IPs (pure parts)."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from meshcore.dnsname import decode_name, encode_name
from meshcore.snapshot import Endpoint, MeshConfig, ServiceConfig, Snapshot
from sidecar.dns import (
    CLASS_IN, TYPE_A, TYPE_AAAA, VIP_NETWORK, DnsFormatError, VipAllocator, answer_locally, build_response,
    error_response, mesh_names, parse_query, read_upstream,
)
from sidecar.routing import build_route_table, route_outbound


def query(name: str, qtype: int = TYPE_A, ident: int = 0x1234, flags: int = 0x0100, qclass: int = CLASS_IN,
          extra: bytes = b"", arcount: int = 0) -> bytes:
    """A query as a stub resolver sends it (RD set), optionally with an additional section."""
    return (struct.pack("!HHHHHH", ident, flags, 1, 0, 0, arcount) + encode_name(name)
            + struct.pack("!HH", qtype, qclass) + extra)


def parse_answers(msg: bytes) -> tuple[dict, list[tuple[int, int, int, bytes]]]:
    """Header fields and (type, class, ttl, rdata) of each answer of a response."""
    ident, flags, qd, an, ns, ar = struct.unpack_from("!HHHHHH", msg, 0)
    offset = 12
    for _ in range(qd):
        _, offset = decode_name(msg, offset)
        offset += 4
    answers = []
    for _ in range(an):
        _, offset = decode_name(msg, offset)
        rtype, rclass, ttl, rdlen = struct.unpack_from("!HHIH", msg, offset)
        offset += 10
        answers.append((rtype, rclass, ttl, msg[offset:offset + rdlen]))
        offset += rdlen
    assert offset == len(msg)
    header = {"id": ident, "qr": flags >> 15, "opcode": (flags >> 11) & 0xF, "aa": (flags >> 10) & 1,
              "tc": (flags >> 9) & 1, "rd": (flags >> 8) & 1, "ra": (flags >> 7) & 1, "rcode": flags & 0xF,
              "qd": qd, "an": an, "ns": ns, "ar": ar}
    return header, answers


NAMES = {"catalog": "240.240.1.2", "catalog.shop": "240.240.1.2"}


# ---- message format ---------------------------------------------------------------------------------

def test_parse_query_header_and_question():
    q = parse_query(query("Catalog.shop", TYPE_AAAA, ident=77))
    assert (q.id, q.name, q.qtype, q.qclass, q.qdcount) == (77, "catalog.shop", TYPE_AAAA, CLASS_IN, 1)
    assert q.question == encode_name("Catalog.shop") + struct.pack("!HH", TYPE_AAAA, CLASS_IN)
    for bad in (b"\x00" * 11, struct.pack("!HHHHHH", 1, 0, 0, 0, 0, 0), query("catalog")[:-2]):
        with pytest.raises(DnsFormatError):
            parse_query(bad)


def test_a_answer_echoes_the_question_and_points_at_its_name():
    msg = query("CATALOG", ident=0xBEEF)
    reply = answer_locally(parse_query(msg), NAMES, ttl=30)
    header, answers = parse_answers(reply)
    assert header == {"id": 0xBEEF, "qr": 1, "opcode": 0, "aa": 1, "tc": 0, "rd": 1, "ra": 1, "rcode": 0,
                      "qd": 1, "an": 1, "ns": 0, "ar": 0}
    assert reply[12:12 + len(msg) - 12] == msg[12:]          # the question, byte for byte (0x20 case kept)
    assert answers == [(TYPE_A, CLASS_IN, 30, ipaddress.IPv4Address("240.240.1.2").packed)]
    assert reply[12 + len(msg) - 12:][:2] == b"\xc0\x0c"      # RFC 1035 4.1.4 pointer to offset 12


def test_edns_opt_in_the_query_is_ignored_and_not_echoed():
    opt = b"\x00" + struct.pack("!HHIH", 41, 1232, 0, 0)  # root name, OPT, UDP size, no options
    reply = answer_locally(parse_query(query("catalog.shop", extra=opt, arcount=1)), NAMES)
    header, answers = parse_answers(reply)
    assert header["ar"] == 0 and len(answers) == 1


def test_other_types_of_a_mesh_name_are_nodata_and_other_names_are_forwarded():
    header, answers = parse_answers(answer_locally(parse_query(query("catalog", TYPE_AAAA)), NAMES))
    assert header["rcode"] == 0 and header["an"] == 0 and header["aa"] == 1   # NODATA, RFC 2308 2.2
    assert answer_locally(parse_query(query("example.com")), NAMES) is None
    assert answer_locally(parse_query(query("catalog.other")), NAMES) is None
    assert answer_locally(parse_query(query("catalog", qclass=3)), NAMES) is None          # CHAOS
    assert answer_locally(parse_query(query("catalog", flags=0x0900)), NAMES) is None     # opcode 1
    assert answer_locally(parse_query(query("catalog", flags=0x8100)), NAMES) is None     # a response


def test_error_response_keeps_the_id_and_sets_the_rcode():
    header, _ = parse_answers(error_response(query("x", ident=9), 2))
    assert header["id"] == 9 and header["qr"] == 1 and header["rcode"] == 2 and header["qd"] == 0
    assert error_response(b"\x01", 2) is None


def test_build_response_with_several_addresses():
    header, answers = parse_answers(build_response(parse_query(query("a")), ("10.0.0.1", "10.0.0.2"), ttl=5))
    assert header["an"] == 2 and [a[3] for a in answers] == [bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])]


# ---- names and virtual IPs ------------------------------------------------------------------------------

def service(name: str, aliases=(), namespace="shop", port=8080) -> ServiceConfig:
    return ServiceConfig(name=name, namespace=namespace, protocol="http", port=port, identity=f"id-{name}",
                         aliases=tuple(aliases))


def test_vips_are_in_the_reserved_range_distinct_and_sticky():
    alloc = VipAllocator()
    first = alloc.assign({f"svc{i}": service(f"svc{i}") for i in range(300)})
    assert len(set(first.values())) == 300
    assert all(ipaddress.IPv4Address(v) in VIP_NETWORK for v in first.values())
    assert all(not v.endswith((".0.0", ".255.255")) for v in first.values())
    again = alloc.assign({"svc7": service("svc7"), "new": service("new")})
    assert again["svc7"] == first["svc7"] and again["new"] not in first.values()
    # Another sidecar (a fresh allocator) hands out the same VIP for the same service.
    assert VipAllocator().vip("svc7", "shop") == first["svc7"]


def test_vip_collisions_probe_to_the_next_free_address():
    base = int(VIP_NETWORK.network_address)
    slot = int(ipaddress.IPv4Address(VipAllocator().vip("a", "shop"))) - base  # where "a" would go
    alloc = VipAllocator()
    alloc.taken.update(range(slot, slot + 4))   # that address and the next three belong to others
    assert int(ipaddress.IPv4Address(alloc.vip("a", "shop"))) - base == slot + 4
    assert alloc.vip("a", "shop") == alloc.vip("a", "shop")


def test_mesh_names_and_vip_routing():
    services = {"catalog": service("catalog", aliases=("catalog-svc",)), "orders": service("orders", port=9000)}
    vips = VipAllocator().assign(services)
    snap = Snapshot(version=1, config=MeshConfig(services=services, endpoints={
        "catalog": (Endpoint("c1", "172.18.0.5", 15006, "v1", "id-catalog"),)}))
    table = build_route_table(snap, vips)
    names = mesh_names(table)
    assert names == {"catalog": vips["catalog"], "catalog.shop": vips["catalog"],
                     "catalog-svc": vips["catalog"], "catalog-svc.shop": vips["catalog"],
                     "orders": vips["orders"], "orders.shop": vips["orders"]}
    # A connection to a VIP routes to its service without a Host header, on any port.
    assert route_outbound(table, None, (vips["orders"], 9000)).name == "orders"
    assert route_outbound(table, None, (vips["catalog"], 1234)).name == "catalog"
    assert table.addresses[(vips["catalog"], 8080)].name == "catalog"
    assert mesh_names(build_route_table(snap)) == {}   # no VIPs, no names


def test_service_names_win_over_aliases_of_other_services():
    services = {"a": service("a", aliases=("b",)), "b": service("b")}
    vips = VipAllocator().assign(services)
    names = mesh_names(build_route_table(Snapshot(1, MeshConfig(services=services)), vips))
    assert names["b"] == vips["b"] and names["a"] == vips["a"]


def test_read_upstream_takes_the_first_ipv4_nameserver(tmp_path):
    conf = tmp_path / "resolv.conf"
    conf.write_text("# generated\nsearch example.com\nnameserver fe80::1\nnameserver 127.0.0.11\n"
                    "nameserver 8.8.8.8\noptions ndots:0\n")
    assert read_upstream(str(conf)) == ("127.0.0.11", 53)
    assert read_upstream(str(tmp_path / "missing")) == ("127.0.0.11", 53)
