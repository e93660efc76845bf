"""Domain names on the wire (RFC 1035 section 3.1) both ways, for unicast DNS and mDNS alike.

A name is a sequence of labels, each a length octet and that many octets, ended by the zero-length
root label. Limits (RFC 1035 section 2.3.4): a label is at most 63 octets, a name at most 255 octets
of wire form (length octets and the root's zero included). A received name may end in a compression
pointer (RFC 1035 section 4.1.4: two octets, top bits 11, a 14-bit offset from the message's start)
to "a prior occurrence of the same name": a pointer is followed only when it points before the labels
it ends, so a hostile message cannot make the reader loop. Labels are UTF-8 (RFC 6762 section 16;
an ASCII name is the same either way); a byte that is not UTF-8 reads as U+FFFD. Pure, standard
library only.
"""

from __future__ import annotations

MAX_LABEL = 63        # RFC 1035 section 2.3.4: octets in a label
MAX_NAME = 255        # RFC 1035 section 2.3.4: octets in a name's wire form
POINTER = 0xC0        # RFC 1035 section 4.1.4: the top two bits of a compression pointer


class DnsFormatError(ValueError):
    """A message or a name in it that does not follow RFC 1035 (section 4.1 and the name rules)."""


def encode_name(name: str) -> bytes:
    """`name` (dotted, a trailing dot optional; "" and "." are the root) in wire form, uncompressed.
    ValueError naming the label when a label is empty or longer than 63 octets, or the name longer
    than 255 octets."""
    text = name[:-1] if name.endswith(".") else name
    out = bytearray()
    if text:
        for label in text.split("."):
            raw = label.encode("utf-8")
            if not 0 < len(raw) <= MAX_LABEL:
                raise ValueError(f"bad DNS label {label!r} in {name!r}: a label is 1 to {MAX_LABEL} octets")
            out.append(len(raw))
            out += raw
    out.append(0)
    if len(out) > MAX_NAME:
        raise ValueError(f"DNS name {name!r} is longer than {MAX_NAME} octets")
    return bytes(out)


def decode_name(msg: bytes, offset: int) -> tuple[str, int]:
    """(the name at `offset` with a trailing dot, "." for the root; the offset after it in `msg`),
    compression pointers followed. Case is kept. DnsFormatError when the name is malformed."""
    labels: list[str] = []
    end = -1              # after the first pointer: where the name ends in the message
    run_start = offset    # a pointer must point before the labels it ends
    size = 1              # wire octets so far, the root's zero included
    while True:
        if offset >= len(msg):
            raise DnsFormatError("name runs past the message")
        length = msg[offset]
        if length & POINTER == POINTER:
            if offset + 1 >= len(msg):
                raise DnsFormatError("truncated compression pointer")
            target = ((length & ~POINTER) << 8) | msg[offset + 1]
            if target >= run_start:
                raise DnsFormatError("compression pointer does not point back (a loop)")
            if end < 0:
                end = offset + 2
            offset = run_start = target
            continue
        if length & POINTER:   # 01 and 10: extended label types (RFC 6891 section 5), not ours
            raise DnsFormatError("unknown label type")
        if length == 0:
            return ".".join(labels) + ".", end if end >= 0 else offset + 1
        if offset + 1 + length > len(msg):
            raise DnsFormatError("label runs past the message")
        size += 1 + length
        if size > MAX_NAME:
            raise DnsFormatError(f"name longer than {MAX_NAME} octets")
        # A dot inside a label stays escaped (RFC 4343 section 2.1): the one label `catalog\.shop` is
        # not the name catalog.shop, and must not get its answer.
        labels.append(msg[offset + 1:offset + 1 + length].decode("utf-8", "replace")
                      .replace("\\", "\\\\").replace(".", "\\."))
        offset += 1 + length
