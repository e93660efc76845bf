"""meshcore.dnssd: DNS-SD TXT records of mesh instances, both ways."""

from __future__ import annotations

import pytest

from meshcore.dnssd import SERVICE_TYPE, TXT_KEYS, decode_txt, encode_txt, instance_name
from meshcore.snapshot import Announcement

CID = "3f2a9c0d1e7b" + "4" * 52
ANN = Announcement(instance=CID, service="orders", version="v2", address="172.20.0.5", port=15006,
                   identity="spiffe://mesh.local/ns/shop/sa/orders", protocol="http")


def as_zeroconf(txt: dict[str, str]) -> dict[bytes, bytes]:
    """What zeroconf's ServiceInfo.properties holds after a resolve: bytes keys and values."""
    return {k.encode(): v.encode() for k, v in txt.items()}


def test_instance_name():
    assert SERVICE_TYPE == "_mesh._tcp.local."
    assert instance_name(CID) == "3f2a9c0d1e7b._mesh._tcp.local."


def test_encode_txt_has_every_key():
    txt = encode_txt(ANN)
    assert set(txt) == set(TXT_KEYS)
    assert txt == {"service": "orders", "version": "v2", "identity": "spiffe://mesh.local/ns/shop/sa/orders",
                   "protocol": "http", "container": CID}


@pytest.mark.parametrize("protocol", ["http", "tcp"])
@pytest.mark.parametrize("wire", [lambda t: t, as_zeroconf], ids=["str", "bytes"])
def test_round_trip(protocol, wire):
    ann = Announcement(**{**ANN.__dict__, "protocol": protocol})
    assert decode_txt(wire(encode_txt(ann)), [ann.address], ann.port) == [ann]


@pytest.mark.parametrize("key", TXT_KEYS)
def test_missing_key_gives_nothing(key):
    txt = as_zeroconf(encode_txt(ANN))
    del txt[key.encode()]
    assert decode_txt(txt, ["172.20.0.5"], 15006) == []


@pytest.mark.parametrize("key", TXT_KEYS)
def test_none_or_empty_value_gives_nothing(key):
    # zeroconf gives None for a key present without '=' (RFC 6763 section 6.4)
    for value in (None, b""):
        txt = as_zeroconf(encode_txt(ANN))
        txt[key.encode()] = value
        assert decode_txt(txt, ["172.20.0.5"], 15006) == [], value


def test_unknown_keys_and_none_values_ignored():
    txt = as_zeroconf(encode_txt(ANN))
    txt[b"extra"] = None
    txt[b"zone"] = b"eu-1"
    assert decode_txt(txt, ["172.20.0.5"], 15006) == [ANN]


def test_undecodable_bytes_do_not_raise():
    txt = as_zeroconf(encode_txt(ANN))
    txt[b"version"] = b"v\xff2"
    [got] = decode_txt(txt, ["172.20.0.5"], 15006)
    assert got.version == "v\ufffd2"


@pytest.mark.parametrize("port", [0, -1, 65536])
def test_bad_port_gives_nothing(port):
    assert decode_txt(as_zeroconf(encode_txt(ANN)), ["172.20.0.5"], port) == []


def test_one_announcement_per_ipv4_address_ipv6_skipped():
    addrs = ["172.21.0.9", "fe80::42:acff:fe14:5", "172.20.0.5", "fd00::9"]
    got = decode_txt(as_zeroconf(encode_txt(ANN)), addrs, 15006)
    assert [a.address for a in got] == ["172.20.0.5", "172.21.0.9"]
    assert all(a.instance == CID and a.service == "orders" and a.port == 15006 for a in got)


def test_no_ipv4_address_gives_nothing():
    assert decode_txt(as_zeroconf(encode_txt(ANN)), ["fe80::1", "fd00::9"], 15006) == []
    assert decode_txt(as_zeroconf(encode_txt(ANN)), [], 15006) == []
