"""sidecar.datapath.speedups.join: b"".join of the parts of a head or a body write, in C when compiled;
http1.put_fields: the parts of header fields."""
from __future__ import annotations

import pytest
from hpack.struct import HeaderTuple

from sidecar.datapath.http1 import put_fields
from sidecar.datapath.speedups import join

PARTS = [
    [],
    [b""],
    [b"GET", b" ", b"/", b" HTTP/1.1\r\n"],
    [b"host: ", b"payments", b"\r\n", b"", b"x-a: ", b"1" * 300, b"\r\n", b"\r\n"],
    [bytes(range(256))] * 70,   # 17,920 bytes: more than one TLS record's worth
]


@pytest.mark.parametrize("parts", PARTS)
def test_join_equals_bytes_join(parts):
    want = b"".join(parts)
    assert join(parts) == want
    assert join(tuple(parts)) == want
    assert join(parts, len(want)) == want


@pytest.mark.parametrize("size", [0, 5, 7])
def test_a_wrong_size_is_refused(size):
    with pytest.raises(ValueError, match="size"):
        join([b"abc", b"def"], size)


@pytest.mark.parametrize("bad", [[b"a", "b"], [b"a", None], [1], (p for p in [b"a"]),
                                 b"ab"])
def test_parts_must_be_bytes(bad):
    with pytest.raises(TypeError):
        join(bad)


def test_put_fields_writes_one_line_per_field_in_order():
    parts = [b"GET / HTTP/1.1\r\n"]
    put_fields(parts, ((b"a", b"1"), (b"b", b"2")))
    put_fields(parts, [(b"c", b"")])
    put_fields(parts, [HeaderTuple(b"d", b"4")])   # h2's fields: a tuple subclass
    assert join(parts) == b"GET / HTTP/1.1\r\na: 1\r\nb: 2\r\nc: \r\nd: 4\r\n"
