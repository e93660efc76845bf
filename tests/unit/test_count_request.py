"""sidecar.proxy.count_request, the data path's request metrics: the same series as Telemetry.record_request."""

from __future__ import annotations

import pytest

from sidecar.proxy import count_request
from sidecar.telemetry import DURATION_BOUNDS, NO_FLAGS, REPORTER_DESTINATION, REPORTER_SOURCE, Telemetry

REQUESTS = [   # reporter, source, source version, destination, version, status, flags, ms
    (REPORTER_SOURCE, "frontend", "v1", "payments", "v1", 200, NO_FLAGS, 1.25),
    (REPORTER_SOURCE, "frontend", "v1", "payments", "v1", 200, NO_FLAGS, 0.5),       # on a bound
    (REPORTER_SOURCE, "frontend", "v1", "payments", "v1", 200, NO_FLAGS, 0.0),
    (REPORTER_SOURCE, "frontend", "v1", "payments", "v2", 200, NO_FLAGS, 7.0),       # another version
    (REPORTER_SOURCE, "frontend", "v1", "payments", "v1", 503, "UO", 0.2),           # another code, flags
    (REPORTER_SOURCE, "frontend", "v1", "payments", "v1", 200, NO_FLAGS, 4000000.0),  # past the last bound
    (REPORTER_DESTINATION, "frontend", "v1", "payments", "v1", 200, NO_FLAGS, 1.0),
    (REPORTER_DESTINATION, "unknown", "unknown", "payments", "v1", 403, "RBAC", 0.1),
    (REPORTER_SOURCE, "frontend", "v1", "payments", "v1", 200, NO_FLAGS, 1.25),
    (REPORTER_DESTINATION, "frontend", "v1", "payments", "v1", 200, NO_FLAGS, 600000.0),
]


def series_of(tel: Telemetry) -> dict:
    return {key: (s.labels, s.count, s.sum, list(s.buckets)) for key, s in tel.series.items()}


@pytest.mark.parametrize("repeat", [1, 3])
def test_count_request_is_record_request(repeat):
    fast, slow = Telemetry(), Telemetry()
    for _ in range(repeat):
        for reporter, src, srcv, dst, ver, status, flags, ms in REQUESTS:
            count_request(fast, reporter, src, srcv, dst, ver, status, flags, ms)
            slow.record_request(reporter, src, srcv, dst, dst, ver, status, flags, ms)
    assert series_of(fast) == series_of(slow)
    assert len(fast.series) == 5
    assert fast.request_count(destination_version="v1", response_code="200") == 7 * repeat


def test_a_duration_lands_in_its_bucket():
    tel = Telemetry()
    for ms in (0.4, 0.5, 0.6, 1e9):   # the first makes the series, the rest are counted in place
        count_request(tel, REPORTER_SOURCE, "a", "v1", "b", "v1", 200, NO_FLAGS, ms)
    (s,) = tel.series.values()
    assert s.count == 4 and s.sum == pytest.approx(0.4 + 0.5 + 0.6 + 1e9)
    assert s.buckets[0] == 2 and s.buckets[1] == 1 and s.buckets[len(DURATION_BOUNDS)] == 1


def test_bucket_of_is_bisect_left():
    """bucket_of, the data path's histogram bucket, against bisect_left over the bounds: on, between,
    below and past them, and the odd values (infinity, NaN) bisect_left also takes."""
    from bisect import bisect_left
    import math
    from sidecar.datapath.speedups import bucket_of

    values = [-1.0, 0.0, math.inf, -math.inf, math.nan, 1e-9]
    for b in DURATION_BOUNDS:
        values += [b, b * 0.999, b * 1.001, math.nextafter(b, 0.0), math.nextafter(b, math.inf)]
    assert len(values) > 5 * len(DURATION_BOUNDS)
    for v in values:
        assert bucket_of(v) == bisect_left(DURATION_BOUNDS, v), v
