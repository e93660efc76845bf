"""meshd.events.first_in_window: one node_refused event a minute per (peer, node, reason), bounded."""

from __future__ import annotations

import pytest

from meshd.events import first_in_window

K = ("172.20.0.9", "shop-orders-1-mesh", "already used")


@pytest.mark.parametrize("seen, key, now, expected", [
    ({}, K, 100.0, True),                       # first time
    ({K: 100.0}, K, 159.9, False),              # within the minute
    ({K: 100.0}, K, 160.0, True),               # a minute later
    ({K: 100.0}, ("172.20.0.9", "shop-orders-1-mesh", "wrong token"), 101.0, True),   # another reason
    ({K: 100.0}, ("172.20.0.10",) + K[1:], 101.0, True),                              # another peer
])
def test_first_in_window(seen, key, now, expected):
    assert first_in_window(seen, key, now) is expected
    assert seen[key] == (now if expected else 100.0)


def test_a_flood_of_new_keys_keeps_the_table_bounded():
    seen: dict = {}
    assert all(first_in_window(seen, ("peer", str(i), "r"), float(i) / 1000, max_keys=50) for i in range(500))
    assert len(seen) == 50 and ("peer", "499", "r") in seen
    # stale keys go first: after the window every new key fits without dropping a fresh one
    seen = {("old", str(i), "r"): 0.0 for i in range(50)}
    assert first_in_window(seen, ("new", "x", "r"), 100.0, max_keys=50)
    assert list(seen) == [("new", "x", "r")]
