"""Table tests of meshcore.policy: every traffic-policy label, its default, good and bad values, and
errors that name the offending label."""

from __future__ import annotations

import pytest

from meshcore.labels import LabelDecodeError
from meshcore.policy import (
    DEFAULT_POLICY, POLICY_LABEL_NAMES, POLICY_LABELS, UNLIMITED, CircuitPolicy, OutlierPolicy,
    RateLimitPolicy, RetryPolicy, TrafficPolicy, decode_duration, decode_percent, decode_traffic_policy,
    is_policy_label, policy_labels,
)


def error_of(labels: dict[str, str]) -> LabelDecodeError:
    with pytest.raises(LabelDecodeError) as excinfo:
        decode_traffic_policy(labels)
    return excinfo.value


# ---- defaults ----------------------------------------------------------------------------------

def test_no_labels_gives_the_documented_defaults():
    p = decode_traffic_policy({})
    assert p == DEFAULT_POLICY == TrafficPolicy()
    assert p.lb == "least-request" and p.hash_header is None and p.timeout is None
    assert p.retries == RetryPolicy(attempts=2, per_try_timeout=None, on=frozenset({"connect-failure", "reset"}),
                                    status_codes=frozenset(), backoff_base=0.025, backoff_max=0.25,
                                    budget_percent=20.0, budget_min=3, non_idempotent=False)
    assert p.circuit == CircuitPolicy(UNLIMITED, UNLIMITED, UNLIMITED) and UNLIMITED == 2**32 - 1
    assert p.outlier == OutlierPolicy(consecutive_5xx=5, consecutive_gateway_errors=None, interval=10.0,
                                      base_ejection=30.0, max_ejection_percent=10.0, max_ejection=300.0)
    assert p.ratelimit is None


def test_unrelated_labels_are_ignored():
    assert decode_traffic_policy({"mesh.enable": "true", "mesh.port": "8080", "other": "x"}) == DEFAULT_POLICY


def test_policy_labels_table_is_complete_and_consistent():
    names = [name for name, _, _ in POLICY_LABELS]
    assert len(names) == len(set(names)) == len(POLICY_LABEL_NAMES)
    assert all(default and meaning for _, default, meaning in POLICY_LABELS)
    defaults = {name: default for name, default, _ in POLICY_LABELS}
    assert defaults["mesh.lb"] == "least-request"
    assert defaults["mesh.retries.attempts"] == "2"
    assert defaults["mesh.retries.budget"] == "20%,3"
    # Setting a label to its documented default changes nothing (where the default is a value).
    checked = 0
    for name, default, _ in POLICY_LABELS:
        if default in ("-", "N"):
            continue
        base = {"mesh.ratelimit": "10/s"} if name.startswith("mesh.ratelimit.") else {}
        assert decode_traffic_policy({**base, name: default}) == decode_traffic_policy(base), name
        checked += 1
    assert checked >= 18


def test_every_documented_label_is_accepted_together():
    labels = {
        "mesh.lb": "ring-hash", "mesh.lb.hash-header": "X-User", "mesh.timeout": "2s",
        "mesh.retries.attempts": "3", "mesh.retries.per-try-timeout": "500ms",
        "mesh.retries.on": "5xx,retriable-status-codes", "mesh.retries.status-codes": "429, 503",
        "mesh.retries.backoff": "10ms,1s", "mesh.retries.budget": "25%,5", "mesh.retries.non-idempotent": "true",
        "mesh.circuit.max-connections": "100", "mesh.circuit.max-pending": "50", "mesh.circuit.max-requests": "200",
        "mesh.outlier.consecutive-5xx": "7", "mesh.outlier.consecutive-gateway-errors": "3",
        "mesh.outlier.interval": "5s", "mesh.outlier.base-ejection": "1m", "mesh.outlier.max-ejection-percent": "50%",
        "mesh.outlier.min-health-percent": "25%",
        "mesh.ratelimit": "600/m", "mesh.ratelimit.burst": "20", "mesh.ratelimit.per-caller": "true",
    }
    assert set(labels) == POLICY_LABEL_NAMES
    p = decode_traffic_policy(labels)
    assert p == TrafficPolicy(
        lb="ring-hash", hash_header="x-user", timeout=2.0,
        retries=RetryPolicy(attempts=3, per_try_timeout=0.5, on=frozenset({"5xx", "retriable-status-codes"}),
                            status_codes=frozenset({429, 503}), backoff_base=0.01, backoff_max=1.0,
                            budget_percent=25.0, budget_min=5, non_idempotent=True),
        circuit=CircuitPolicy(max_connections=100, max_pending=50, max_requests=200),
        outlier=OutlierPolicy(consecutive_5xx=7, consecutive_gateway_errors=3, interval=5.0, base_ejection=60.0,
                              max_ejection_percent=50.0, max_ejection=300.0, min_health_percent=25.0),
        ratelimit=RateLimitPolicy(rate_per_s=10.0, burst=20.0, per_caller=True))


# ---- good values, one label at a time ----------------------------------------------------------

@pytest.mark.parametrize("labels, getter, expected", [
    ({"mesh.lb": "round-robin"}, lambda p: p.lb, "round-robin"),
    ({"mesh.lb": " Random "}, lambda p: p.lb, "random"),
    ({"mesh.lb": "least-request"}, lambda p: p.lb, "least-request"),
    ({"mesh.lb": "ring-hash", "mesh.lb.hash-header": "x-session"}, lambda p: (p.lb, p.hash_header),
     ("ring-hash", "x-session")),
    ({"mesh.timeout": "250ms"}, lambda p: p.timeout, 0.25),
    ({"mesh.timeout": "1m"}, lambda p: p.timeout, 60.0),
    ({"mesh.timeout": "2d"}, lambda p: p.timeout, 172800.0),   # days, as in MESH_CERT_TTL (meshcore.durations)
    ({"mesh.timeout": "off"}, lambda p: p.timeout, None),
    ({"mesh.retries.attempts": "0"}, lambda p: p.retries.attempts, 0),
    ({"mesh.retries.attempts": "10"}, lambda p: p.retries.attempts, 10),
    ({"mesh.retries.per-try-timeout": "1.5s"}, lambda p: p.retries.per_try_timeout, 1.5),
    ({"mesh.retries.per-try-timeout": "off"}, lambda p: p.retries.per_try_timeout, None),
    ({"mesh.retries.on": "gateway-error"}, lambda p: p.retries.on, frozenset({"gateway-error"})),
    ({"mesh.retries.on": " 5XX , connect-failure,"}, lambda p: p.retries.on, frozenset({"5xx", "connect-failure"})),
    ({"mesh.retries.on": "unavailable"}, lambda p: p.retries.on, frozenset({"unavailable"})),
    ({"mesh.retries.on": "Cancelled,deadline-exceeded,internal,resource-exhausted,unavailable,reset"},
     lambda p: p.retries.on,
     frozenset({"cancelled", "deadline-exceeded", "internal", "resource-exhausted", "unavailable", "reset"})),
    ({"mesh.retries.on": "retriable-status-codes", "mesh.retries.status-codes": "503"},
     lambda p: p.retries.status_codes, frozenset({503})),
    ({"mesh.retries.backoff": "50ms"}, lambda p: (p.retries.backoff_base, p.retries.backoff_max), (0.05, 0.5)),
    ({"mesh.retries.backoff": "25ms,25ms"}, lambda p: (p.retries.backoff_base, p.retries.backoff_max), (0.025, 0.025)),
    ({"mesh.retries.budget": "50%"}, lambda p: (p.retries.budget_percent, p.retries.budget_min), (50.0, 3)),
    ({"mesh.retries.budget": "0%,0"}, lambda p: (p.retries.budget_percent, p.retries.budget_min), (0.0, 0)),
    ({"mesh.retries.budget": "12.5"}, lambda p: p.retries.budget_percent, 12.5),
    ({"mesh.retries.non-idempotent": "yes"}, lambda p: p.retries.non_idempotent, True),
    ({"mesh.retries.non-idempotent": "false"}, lambda p: p.retries.non_idempotent, False),
    ({"mesh.circuit.max-connections": "1"}, lambda p: p.circuit.max_connections, 1),
    ({"mesh.circuit.max-pending": "1024"}, lambda p: p.circuit.max_pending, 1024),
    ({"mesh.circuit.max-requests": str(2**32 - 1)}, lambda p: p.circuit.max_requests, 2**32 - 1),
    ({"mesh.outlier.consecutive-5xx": "3"}, lambda p: p.outlier.consecutive_5xx, 3),
    ({"mesh.outlier.consecutive-5xx": "0"}, lambda p: p.outlier.consecutive_5xx, None),
    ({"mesh.outlier.consecutive-5xx": "off"}, lambda p: p.outlier.consecutive_5xx, None),
    ({"mesh.outlier.consecutive-gateway-errors": "2"}, lambda p: p.outlier.consecutive_gateway_errors, 2),
    ({"mesh.outlier.interval": "500ms"}, lambda p: p.outlier.interval, 0.5),
    ({"mesh.outlier.base-ejection": "10m"}, lambda p: (p.outlier.base_ejection, p.outlier.max_ejection),
     (600.0, 600.0)),
    ({"mesh.outlier.max-ejection-percent": "100%"}, lambda p: p.outlier.max_ejection_percent, 100.0),
    ({"mesh.outlier.max-ejection-percent": "0"}, lambda p: p.outlier.max_ejection_percent, 0.0),
    ({"mesh.ratelimit": "100/s"}, lambda p: p.ratelimit, RateLimitPolicy(100.0, 100.0, False)),
    ({"mesh.ratelimit": "60/m"}, lambda p: p.ratelimit, RateLimitPolicy(1.0, 60.0, False)),
    ({"mesh.ratelimit": "3600/h"}, lambda p: p.ratelimit.rate_per_s, 1.0),
    ({"mesh.ratelimit": "0.5/s"}, lambda p: (p.ratelimit.rate_per_s, p.ratelimit.burst), (0.5, 1.0)),
    ({"mesh.ratelimit": "10/s", "mesh.ratelimit.burst": "50"}, lambda p: p.ratelimit.burst, 50.0),
    ({"mesh.ratelimit": "10/s", "mesh.ratelimit.per-caller": "true"}, lambda p: p.ratelimit.per_caller, True),
    ({"mesh.ratelimit": "off"}, lambda p: p.ratelimit, None),
])
def test_good_values(labels, getter, expected):
    assert getter(decode_traffic_policy(labels)) == expected


# ---- bad values: the error names the label -----------------------------------------------------

@pytest.mark.parametrize("labels, label, fragment", [
    ({"mesh.lb": "fastest"}, "mesh.lb", "not one of"),
    ({"mesh.lb": "ring-hash"}, "mesh.lb", "needs mesh.lb.hash-header"),
    ({"mesh.lb.hash-header": "x-user"}, "mesh.lb.hash-header", "needs mesh.lb=ring-hash"),
    ({"mesh.lb": "ring-hash", "mesh.lb.hash-header": "x user"}, "mesh.lb.hash-header", "not a header name"),
    ({"mesh.lbx": "random"}, "mesh.lbx", "unknown"),
    ({"mesh.timeout": "2"}, "mesh.timeout", "needs a unit"),
    ({"mesh.timeout": "-1s"}, "mesh.timeout", "negative"),
    ({"mesh.timeout": "0s"}, "mesh.timeout", "more than zero"),
    ({"mesh.timeout": "soon"}, "mesh.timeout", "not a duration"),
    ({"mesh.timeout": "2w"}, "mesh.timeout", "not a duration"),
    ({"mesh.retries.attempts": "-1"}, "mesh.retries.attempts", "outside 0..10"),
    ({"mesh.retries.attempts": "11"}, "mesh.retries.attempts", "outside 0..10"),
    ({"mesh.retries.attempts": "two"}, "mesh.retries.attempts", "not a whole number"),
    ({"mesh.retries.attempts": "1.5"}, "mesh.retries.attempts", "not a whole number"),
    ({"mesh.retries.attempt": "3"}, "mesh.retries.attempt", "unknown"),
    ({"mesh.retries.per-try-timeout": "0ms"}, "mesh.retries.per-try-timeout", "more than zero"),
    ({"mesh.retries.per-try-timeout": "fast"}, "mesh.retries.per-try-timeout", "not a duration"),
    ({"mesh.retries.on": "5xx,teapot"}, "mesh.retries.on", "'teapot' is not one of"),
    ({"mesh.retries.on": "deadline_exceeded"}, "mesh.retries.on", "'deadline_exceeded' is not one of"),
    ({"mesh.retries.on": "not-found"}, "mesh.retries.on", "'not-found' is not one of"),
    ({"mesh.retries.on": " , "}, "mesh.retries.on", "empty"),
    ({"mesh.retries.on": "retriable-status-codes"}, "mesh.retries.on", "needs mesh.retries.status-codes"),
    ({"mesh.retries.status-codes": "503"}, "mesh.retries.status-codes", "needs retriable-status-codes"),
    ({"mesh.retries.on": "retriable-status-codes", "mesh.retries.status-codes": "5o3"},
     "mesh.retries.status-codes", "not a whole number"),
    ({"mesh.retries.on": "retriable-status-codes", "mesh.retries.status-codes": "700"},
     "mesh.retries.status-codes", "outside 100..599"),
    ({"mesh.retries.on": "retriable-status-codes", "mesh.retries.status-codes": ""},
     "mesh.retries.status-codes", "empty"),
    ({"mesh.retries.backoff": "250ms,25ms"}, "mesh.retries.backoff", "less than base"),
    ({"mesh.retries.backoff": "0ms"}, "mesh.retries.backoff", "more than zero"),
    ({"mesh.retries.backoff": "1s,2s,3s"}, "mesh.retries.backoff", "base[,max]"),
    ({"mesh.retries.backoff": "quick"}, "mesh.retries.backoff", "not a duration"),
    ({"mesh.retries.budget": "120%"}, "mesh.retries.budget", "outside 0%..100%"),
    ({"mesh.retries.budget": "-5%"}, "mesh.retries.budget", "outside"),
    ({"mesh.retries.budget": "lots"}, "mesh.retries.budget", "not a percentage"),
    ({"mesh.retries.budget": "20%,x"}, "mesh.retries.budget", "not a whole number"),
    ({"mesh.retries.budget": "20%,3,4"}, "mesh.retries.budget", "percent[,min]"),
    ({"mesh.retries.non-idempotent": "sometimes"}, "mesh.retries.non-idempotent", "not a boolean"),
    ({"mesh.circuit.max-connections": "0"}, "mesh.circuit.max-connections", "outside 1.."),
    ({"mesh.circuit.max-pending": "many"}, "mesh.circuit.max-pending", "not a whole number"),
    ({"mesh.circuit.max-requests": str(2**32)}, "mesh.circuit.max-requests", "outside"),
    ({"mesh.circuit.max-request": "5"}, "mesh.circuit.max-request", "unknown"),
    ({"mesh.outlier.consecutive-5xx": "-2"}, "mesh.outlier.consecutive-5xx", "outside"),
    ({"mesh.outlier.consecutive-gateway-errors": "some"}, "mesh.outlier.consecutive-gateway-errors",
     "not a whole number"),
    ({"mesh.outlier.interval": "0s"}, "mesh.outlier.interval", "more than zero"),
    ({"mesh.outlier.base-ejection": "30"}, "mesh.outlier.base-ejection", "needs a unit"),
    ({"mesh.outlier.max-ejection-percent": "101%"}, "mesh.outlier.max-ejection-percent", "outside"),
    ({"mesh.outlier.max-ejection-percent": "ten"}, "mesh.outlier.max-ejection-percent", "not a percentage"),
    ({"mesh.ratelimit": "100"}, "mesh.ratelimit", "not a rate"),
    ({"mesh.ratelimit": "100/d"}, "mesh.ratelimit", "not a rate"),
    ({"mesh.ratelimit": "-5/s"}, "mesh.ratelimit", "not a rate"),
    ({"mesh.ratelimit": "0/s"}, "mesh.ratelimit", "more than zero"),
    ({"mesh.ratelimit.burst": "10"}, "mesh.ratelimit.burst", "needs mesh.ratelimit"),
    ({"mesh.ratelimit.per-caller": "true"}, "mesh.ratelimit.per-caller", "needs mesh.ratelimit"),
    ({"mesh.ratelimit": "10/s", "mesh.ratelimit.burst": "0"}, "mesh.ratelimit.burst", "outside"),
    ({"mesh.ratelimit": "10/s", "mesh.ratelimit.per-caller": "maybe"}, "mesh.ratelimit.per-caller", "not a boolean"),
])
def test_bad_values_name_the_label(labels, label, fragment):
    err = error_of(labels)
    assert err.label == label
    assert fragment in err.message
    assert str(err).startswith(f"label {label}:")


# ---- value decoders ----------------------------------------------------------------------------

@pytest.mark.parametrize("raw, seconds", [
    ("250ms", 0.25), ("2s", 2.0), ("1m", 60.0), ("1h", 3600.0), ("1.5s", 1.5), (" 10S ", 10.0), ("0s", 0.0),
    ("1d", 86400.0),
])
def test_decode_duration_good(raw, seconds):
    assert decode_duration("mesh.x", raw) == pytest.approx(seconds)


@pytest.mark.parametrize("raw, fragment", [
    ("-1s", "negative"), ("10", "needs a unit"), ("", "not a duration"), ("1 s", "not a duration"),
    ("abc", "not a duration"), ("1e3ms", "not a duration"), ("1.s", "not a duration"), ("inf", "not a duration"),
])
def test_decode_duration_bad_names_the_label(raw, fragment):
    with pytest.raises(LabelDecodeError) as excinfo:
        decode_duration("mesh.timeout", raw)
    assert excinfo.value.label == "mesh.timeout"
    assert fragment in excinfo.value.message


@pytest.mark.parametrize("raw, value", [("20%", 20.0), ("20", 20.0), (" 12.5 % ", 12.5), ("0%", 0.0), ("100%", 100.0)])
def test_decode_percent_good(raw, value):
    assert decode_percent("mesh.p", raw) == value


@pytest.mark.parametrize("raw", ["101%", "-1%", "%", "", "twenty", "2O%", "1e2"])
def test_decode_percent_bad(raw):
    with pytest.raises(LabelDecodeError) as excinfo:
        decode_percent("mesh.p", raw)
    assert excinfo.value.label == "mesh.p"


def test_policy_label_helpers():
    labels = {"mesh.enable": "true", "mesh.port": "80", "mesh.lb": "random", "mesh.retries.attempts": "1",
              "mesh.ratelimit": "5/s", "app": "x"}
    assert policy_labels(labels) == {"mesh.lb": "random", "mesh.retries.attempts": "1", "mesh.ratelimit": "5/s"}
    assert is_policy_label("mesh.outlier.interval") and is_policy_label("mesh.retries.typo")
    assert not is_policy_label("mesh.port") and not is_policy_label("mesh.gateway.path")
