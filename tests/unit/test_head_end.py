"""sidecar.datapath.speedups.head_end: where a head's blank line starts, as bytes.find says (libc memmem when compiled)."""
from __future__ import annotations

import random

import pytest

from sidecar.datapath.speedups import head_end

CRLF2 = b"\r\n\r\n"
DATA = [
    b"", b"\r\n\r", CRLF2, b"GET / HTTP/1.1\r\nhost: a\r\n\r\n", b"x\r\n\r\n\r\n\r\n", b"\r\r\n\r\n\n",
    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok" * 3, b"a\r\nb\r\n" * 50,
]
rng = random.Random(3)
DATA += [bytes(rng.choice(b"\r\nab") for _ in range(rng.randrange(40))) for _ in range(200)]


@pytest.mark.parametrize("data", DATA)
def test_head_end_is_bytes_find(data):
    n = len(data)
    for start in {0, 1, 3, n // 2, n, n + 2}:
        for stop in {0, 3, 4, n // 2 + 4, n - 1, n, n + 10, 1 << 16}:
            assert head_end(data, start, stop) == data.find(CRLF2, start, stop), (start, stop)


def test_the_table_finds_heads_at_many_places():
    """Not vacuous: the cases find the blank line at many offsets, and miss it too."""
    found = {head_end(d, 0, len(d)) for d in DATA}
    assert -1 in found and len(found) > 10


def test_a_negative_start_is_refused():
    with pytest.raises(ValueError, match="start"):
        head_end(CRLF2, -1, 4)
