"""meshcore.dnsname: the one DNS name codec of sidecar.dns (unicast) and meshcore.mdns, with hostile
input: pointer loops, labels over 63 octets, names over 255 octets, truncation (RFC 1035 2.3.4, 4.1.4)."""

from __future__ import annotations

import pytest

from meshcore.dnsname import MAX_NAME, DnsFormatError, decode_name, encode_name

HEADER = b"\x00" * 12   # where a message's first name starts


def label(text: str) -> bytes:
    return bytes([len(text)]) + text.encode()


@pytest.mark.parametrize("name, wire", [
    ("catalog.shop", b"\x07catalog\x04shop\x00"),
    ("Catalog.Shop.", b"\x07Catalog\x04Shop\x00"),       # case kept, the trailing dot optional
    ("", b"\x00"),                                      # the root
    (".", b"\x00"),
    ("café.local.", b"\x05caf\xc3\xa9\x05local\x00"),   # UTF-8 labels (RFC 6762 section 16)
    ("x" * 63 + ".local", label("x" * 63) + b"\x05local\x00"),
])
def test_encode_name(name, wire):
    assert encode_name(name) == wire


@pytest.mark.parametrize("name, why", [
    ("a..local.", "bad DNS label ''"),
    (".local", "bad DNS label ''"),
    ("x" * 64 + ".local.", "1 to 63 octets"),
    ("é" * 32 + ".local.", "1 to 63 octets"),            # 64 octets in UTF-8
    (".".join(["x" * 63] * 4), "longer than 255 octets"),  # 4 * 64 + 1 = 257 octets
])
def test_encode_name_refuses(name, why):
    with pytest.raises(ValueError, match=why):
        encode_name(name)


def test_longest_name_is_255_octets():
    name = ".".join(["x" * 63] * 3 + ["x" * 61])       # 3 * 64 + 62 + 1 = 255
    wire = encode_name(name)
    assert len(wire) == MAX_NAME
    assert decode_name(wire, 0) == (name + ".", MAX_NAME)


@pytest.mark.parametrize("name", ["local.", "a.b.local.", "abcdef123456._mesh._tcp.local.", "café.local.", "."])
def test_round_trip(name):
    wire = encode_name(name)
    assert decode_name(wire + b"rest", 0) == (name, len(wire))


@pytest.mark.parametrize("msg, offset, name, end", [
    # a pointer to a prior name: the name ends after the pointer, not where the pointer leads
    (HEADER + b"\x04shop\x00" + b"\x07catalog\xc0\x0c", 18, "catalog.shop.", 28),
    (HEADER + b"\x04shop\x00" + b"\xc0\x0c", 18, "shop.", 20),
    # pointers in a chain, each further back
    (HEADER + b"\x05local\x00" + b"\x01a\xc0\x0c" + b"\x01b\xc0\x13", 23, "b.a.local.", 27),
    (b"\x00", 0, ".", 1),
    (b"\x03ABC\x00", 0, "ABC.", 5),
    (b"\x02\xff\xfe\x00", 0, "\ufffd\ufffd.", 4),         # not UTF-8: replaced, not refused
])
def test_decode_name(msg, offset, name, end):
    assert decode_name(msg, offset) == (name, end)


@pytest.mark.parametrize("msg, offset, why", [
    (b"\xc0\x00", 0, "does not point back"),                        # points at itself
    (HEADER + b"\xc0\x0c", 12, "does not point back"),              # the same, after a header
    (HEADER + b"\x01a\xc0\x0c", 12, "does not point back"),         # back to its own first label
    (HEADER + b"\x01a\xc0\x0e" + b"\x01b\xc0\x0c", 16, "does not point back"),   # back, then a loop
    (HEADER + b"\x01a\xc0\x10\x01b\xc0\x0c", 12, "does not point back"),         # a forward pointer
    (b"\x05abc", 0, "label runs past"),                             # truncated label
    (b"\x03abc", 0, "name runs past"),                              # no root label
    (b"", 0, "name runs past"),
    (b"\xc0", 0, "truncated compression pointer"),
    (b"\x40" + b"x" * 64 + b"\x00", 0, "unknown label type"),       # a "label" of 64 octets
    (b"\x80abc", 0, "unknown label type"),
    (label("x" * 63) * 4 + b"\x00", 0, "longer than 255 octets"),   # 257 octets of labels
    # 255 exceeded through pointers: each name in the chain is short, the whole is not
    (label("x" * 63) + b"\x00" + label("y" * 63) + b"\xc0\x00" + label("z" * 63) + b"\xc0\x41" + label("w" * 63) + b"\xc0\x83",
     0xC5, "longer than 255 octets"),
])
def test_decode_name_refuses(msg, offset, why):
    with pytest.raises(DnsFormatError, match=why):
        decode_name(msg, offset)


def test_format_error_is_a_value_error():
    """Callers that knew only ValueError (meshcore.mdns) still catch every malformed name."""
    assert issubclass(DnsFormatError, ValueError)
