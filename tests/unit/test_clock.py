"""sidecar.datapath.speedups.monotonic reads time.monotonic's clock (CLOCK_MONOTONIC when compiled)."""
from __future__ import annotations

import time

import pytest

from sidecar.datapath import speedups


@pytest.mark.parametrize("reads", [1, 100])
def test_monotonic_lies_between_readings_of_time_monotonic(reads):
    for _ in range(reads):
        before = time.monotonic()
        ours = speedups.monotonic()
        after = time.monotonic()
        assert before <= ours <= after


def test_monotonic_never_goes_back():
    seen = [speedups.monotonic() for _ in range(1000)]
    assert seen == sorted(seen)
    assert isinstance(seen[0], float)
