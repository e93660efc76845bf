"""bench.lifecycle_scale's pure parts: percentiles, the ACK count from /v1/status, tcpdump's count, RESULTS.md."""

from __future__ import annotations

import pytest

from bench.lifecycle_scale import all_acked, markdown, percentile, replace_section, tcpdump_count


@pytest.mark.parametrize("values, q, expected", [
    ([], 50, None), ([7.0], 99, 7.0), ([1, 2, 3, 4], 50, 2), ([1, 2, 3, 4], 99, 4),
    (list(range(1, 101)), 50, 50), (list(range(1, 101)), 99, 99), ([5, 1, 3], 0, 1),
])
def test_percentile_nearest_rank(values, q, expected):
    assert percentile(values, q) == expected


def test_all_acked_counts_only_the_project_on_the_current_version():
    status = {"meshd": {"snapshot_version": 7}, "sidecars": [
        {"app": "scale_web_1", "state": "running", "connected": True, "acked_version": 7},
        {"app": "scale_web_2", "state": "running", "connected": True, "acked_version": 6},
        {"app": "scale_web_3", "state": "missing", "connected": False, "acked_version": None},
        {"app": "shop_orders_1", "state": "running", "connected": True, "acked_version": 7},
        {"app": "scaler_web_1", "state": "running", "connected": True, "acked_version": 7},
    ]}
    assert all_acked(status, 3) == (1, 3)
    v2 = {"meshd": {"snapshot_version": 7}, "sidecars": [   # Compose v2 names: project-service-N
        {"app": "scale-web-1", "state": "running", "connected": True, "acked_version": 7},
        {"app": "scale-web-2", "state": "running", "connected": True, "acked_version": 6}]}
    assert all_acked(v2, 2) == (1, 2)
    assert all_acked(status, 5) == (1, 5)          # not listed yet still counts as expected
    assert all_acked({"meshd": {}, "sidecars": []}, 2) == (0, 2)


def test_tcpdump_count():
    assert tcpdump_count("listening on br-1\n12 packets captured\n14 packets received by filter\n") == 12
    assert tcpdump_count("1 packet captured\n") == 1
    assert tcpdump_count("tcpdump: br-x: No such device exists\n") is None


def test_replace_section_keeps_the_others():
    text = "# r\n\n## A\nold a\n\n## Lifecycle at scale\nold\nlines\n\n## B\nb\n"
    out = replace_section(text, "## Lifecycle at scale", "## Lifecycle at scale\n\nnew\n")
    assert out == "# r\n\n## A\nold a\n\n## Lifecycle at scale\n\nnew\n\n## B\nb\n"
    assert replace_section("# r\n", "## X", "## X\nx\n") == "# r\n\n## X\nx\n"
    assert replace_section(out, "## Lifecycle at scale", "## Lifecycle at scale\n\nnew\n") == out


def test_markdown_says_what_was_not_reached():
    res = {"replicas": 100, "image": "meshd:latest",
           "up": {"compose_s": 30.0, "ready": False, "acked": 80, "sidecars": 101},
           "down": {"compose_s": 70.2, "compose_rc": 1, "sidecars_gone": False, "sidecars_left": 12}}
    text = markdown(res)
    assert text.startswith("## Lifecycle at scale\n")
    assert "(not reached: 80/101)" in text and "70.2 s (exit 1)" in text and "(not reached: 12 left)" in text
