"""sidecar.datapath.speedups.join: b"".join of the parts of a head or a body write, in C when compiled."""
from __future__ import annotations

import pytest

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
