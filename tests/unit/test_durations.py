"""meshcore.durations: the one duration grammar of labels, environment variables and query parameters."""

from __future__ import annotations

import pytest

from meshcore.durations import parse_duration


@pytest.mark.parametrize("raw, bare_seconds, seconds", [
    ("250ms", False, 0.25),
    ("2s", False, 2.0),
    ("1.5m", False, 90.0),
    ("1h", False, 3600.0),
    ("1d", False, 86400.0),       # mesh.timeout=1d: a label takes days as MESH_CERT_TTL does
    ("24h", True, 86400.0),
    ("90m", True, 5400.0),
    (" 10S ", False, 10.0),       # case and surrounding whitespace
    ("2D", False, 172800.0),
    ("0s", False, 0.0),           # zero parses; callers that need more say so
    ("30", True, 30.0),           # a bare number is seconds where the caller allows it
    (" 2.5 ", True, 2.5),
    ("0.5ms", False, 0.0005),
    ("1s\n", False, 1.0),         # a trailing newline (a file's last line) is whitespace
])
def test_parse_duration(raw, bare_seconds, seconds):
    assert parse_duration(raw, bare_seconds=bare_seconds) == pytest.approx(seconds)


@pytest.mark.parametrize("raw, bare_seconds, fragment", [
    ("-1s", False, "negative"),
    ("-5", True, "negative"),
    ("10", False, "needs a unit"),
    ("", False, "not a duration"),
    ("", True, "not a duration"),
    ("1 s", False, "not a duration"),    # the unit follows the number directly
    ("10 s s", True, "not a duration"),
    ("1w", False, "not a duration"),
    ("1h30m", False, "not a duration"),  # one number, one unit
    ("abc", False, "not a duration"),
    ("1e3ms", False, "not a duration"),
    ("1.s", False, "not a duration"),
    (".5s", False, "not a duration"),
    ("inf", True, "not a duration"),
    ("nan", True, "not a duration"),
])
def test_parse_duration_refuses(raw, bare_seconds, fragment):
    with pytest.raises(ValueError) as excinfo:
        parse_duration(raw, bare_seconds=bare_seconds)
    assert fragment in str(excinfo.value)


def test_none_is_not_a_duration():
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(None)  # type: ignore[arg-type] - an unset environment variable
