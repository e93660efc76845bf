"""Table tests of meshcore.routing_rules: validation messages, per-request choice, wire round trip."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from meshcore.routing_rules import (
    Fault, Mirror, RouteRule, ServiceRules, Split, choose_mirror, choose_version, decode_rules, encode_rules,
    parse_split_args, validate_fault, validate_mirror, validate_route, validate_split,
)

VERSIONS = ("v1", "v2", "v3")


def lookup(headers: dict[str, str]):
    lowered = {k.lower(): v for k, v in headers.items()}
    return lowered.get


# ---- split -------------------------------------------------------------------------------------

def test_validate_split_good():
    assert validate_split("orders", [("v1", 90), ("v2", 10)], VERSIONS) == Split("orders", (("v1", 90), ("v2", 10)))
    assert validate_split("orders", {"v3": 100}, VERSIONS).weights == (("v3", 100),)
    assert validate_split("orders", [("v1", 100), ("v2", 0)], VERSIONS).weights == (("v1", 100), ("v2", 0))
    assert validate_split("orders", [("v9", 100)], None).weights == (("v9", 100),)   # no existence check


@pytest.mark.parametrize("weights, fragment", [
    ([("v1", 90), ("v2", 20)], "must sum to 100, got 90 + 20 = 110"),
    ([("v1", 50), ("v2", 40)], "must sum to 100, got 50 + 40 = 90"),
    ([("v1", 90), ("v9", 10)], "orders has no version 'v9' (known: v1, v2, v3)"),
    ([("v1", 50), ("v1", 50)], "version 'v1' appears twice"),
    ([("v1", 50.5), ("v2", 49.5)], "weight of v1 must be a whole number"),
    ([("v1", "90"), ("v2", 10)], "weight of v1 must be a whole number"),
    ([("v1", True), ("v2", 99)], "weight of v1 must be a whole number"),
    ([("v1", 110), ("v2", -10)], "weight of v1 is 110, outside 0..100"),
    ([], "no versions given"),
    ([("bad version", 100)], "'bad version' is not a version name"),
])
def test_validate_split_errors(weights, fragment):
    with pytest.raises(ValueError) as excinfo:
        validate_split("orders", weights, VERSIONS)
    assert str(excinfo.value).startswith("split of orders:")
    assert fragment in str(excinfo.value)


def test_parse_split_args():
    assert parse_split_args(["v1=90", "v2=10"]) == [("v1", 90), ("v2", 10)]
    assert parse_split_args([" v1 = 90% "]) == [("v1", 90)]
    for bad in (["v1:90"], ["v1="], ["=90"], ["v1=ninety"], ["v1=-5"], ["v1=9.5"]):
        with pytest.raises(ValueError, match="is not version=weight"):
            parse_split_args(bad)


def test_parsed_90_plus_20_is_refused():
    with pytest.raises(ValueError, match="sum to 100"):
        validate_split("orders", parse_split_args(["v1=90", "v2=20"]), VERSIONS)


# ---- routes ------------------------------------------------------------------------------------

def test_validate_route_good():
    rule = validate_route("orders", "v2", VERSIONS, ["X-Canary=1", ("x-user", " alice ")], "/api")
    assert rule == RouteRule(match_headers=(("x-canary", "1"), ("x-user", "alice")), path_prefix="/api",
                             to_version="v2")
    assert validate_route("orders", "v3", VERSIONS) == RouteRule((), None, "v3")


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(to_version="v7"), "orders has no version 'v7'"),
    (dict(to_version="v2", match_headers=["x-canary"]), "is not name=value"),
    (dict(to_version="v2", match_headers=["bad header=1"]), "is not a header name"),
    (dict(to_version="v2", match_headers=[("x-a", "1"), ("X-A", "2")]), "'x-a' appears twice"),
    (dict(to_version="v2", match_headers=[("x-a", 1)]), "must be strings"),
    (dict(to_version="v2", match_headers=[("x-a",)]), "not a (name, value) pair"),
    (dict(to_version="v2", path_prefix="api"), "must start with '/'"),
    (dict(to_version="v2", path_prefix="/a b"), "must start with '/'"),
])
def test_validate_route_errors(kwargs, fragment):
    with pytest.raises(ValueError) as excinfo:
        validate_route("orders", known_versions=VERSIONS, **kwargs)
    assert fragment in str(excinfo.value)


# ---- fault and mirror --------------------------------------------------------------------------

@pytest.mark.parametrize("abort, delay, expected", [
    ("50:503", None, Fault(abort_percent=50.0, abort_status=503)),
    ("0.5%:429", None, Fault(abort_percent=0.5, abort_status=429)),
    (None, "10:1s", Fault(delay_percent=10.0, delay_s=1.0)),
    (None, "100:250ms", Fault(delay_percent=100.0, delay_s=0.25)),
    ("5:500", "20:2s", Fault(5.0, 500, 20.0, 2.0)),
])
def test_validate_fault_good(abort, delay, expected):
    assert validate_fault(abort, delay) == expected


@pytest.mark.parametrize("abort, delay, fragment", [
    (None, None, "give an abort"),
    ("50", None, "is not percent:status"),
    ("150:503", None, "outside 0..100"),
    ("x:503", None, "not a percentage"),
    ("50:abc", None, "not an HTTP status"),
    ("50:200", None, "not an error status"),
    ("50:5030", None, "not an HTTP status"),
    (None, "10", "is not percent:duration"),
    (None, "10:1", "needs a unit"),
    (None, "10:-1s", "negative"),
    (None, "10:0s", "more than zero"),
    (None, "-10:1s", "not a percentage"),
])
def test_validate_fault_errors(abort, delay, fragment):
    with pytest.raises(ValueError) as excinfo:
        validate_fault(abort, delay)
    assert fragment in str(excinfo.value)


def test_validate_mirror():
    assert validate_mirror("orders", "v2", VERSIONS) == Mirror("v2", 100.0)
    assert validate_mirror("orders", "v2", VERSIONS, "10%") == Mirror("v2", 10.0)
    assert validate_mirror("orders", "v2", VERSIONS, 2.5) == Mirror("v2", 2.5)
    with pytest.raises(ValueError, match="no version 'v8'"):
        validate_mirror("orders", "v8", VERSIONS)
    with pytest.raises(ValueError, match="outside 0..100"):
        validate_mirror("orders", "v2", VERSIONS, 101)


def test_choose_mirror():
    rules = ServiceRules("orders", mirror=Mirror("v2", 10.0))
    assert choose_mirror(rules, 0.05) == "v2"
    assert choose_mirror(rules, 0.10) is None
    assert choose_mirror(ServiceRules("orders"), 0.0) is None
    assert choose_mirror(None, 0.0) is None


# ---- choose_version ----------------------------------------------------------------------------

RULES = ServiceRules(
    service="orders",
    routes=(
        validate_route("orders", "v3", VERSIONS, ["x-user=alice"], "/admin"),
        validate_route("orders", "v2", VERSIONS, ["X-Canary=1"]),
        validate_route("orders", "v3", VERSIONS, [], "/beta"),
    ),
    split=validate_split("orders", [("v1", 90), ("v2", 10)], VERSIONS),
)


@pytest.mark.parametrize("headers, path, rand, expected", [
    ({"x-user": "alice"}, "/admin/users", 0.0, "v3"),        # first rule: header and path
    ({"x-user": "alice", "x-canary": "1"}, "/admin", 0.0, "v3"),  # first match wins over the second
    ({"x-user": "alice", "x-canary": "1"}, "/shop", 0.0, "v2"),   # first needs /admin: second matches
    ({"X-Canary": "1"}, "/", 0.99, "v2"),                    # header names are case-insensitive
    ({"x-canary": "2"}, "/", 0.0, "v1"),                     # values are exact
    ({"x-canary": "1 "}, "/", 0.0, "v1"),
    ({}, "/beta/x", 0.99, "v3"),                             # path-only rule
    ({}, "/shop", 0.0, "v1"),                                # no rule: the split
    ({}, "/shop", 0.8999, "v1"),
    ({}, "/shop", 0.9, "v2"),
    ({"x-user": "bob"}, "/admin", 0.95, "v2"),
])
def test_choose_version(headers, path, rand, expected):
    assert choose_version(RULES, lookup(headers), path, rand) == expected


def test_choose_version_without_preference():
    assert choose_version(None, lookup({}), "/", 0.5) is None
    no_split = ServiceRules("orders", routes=(validate_route("orders", "v2", VERSIONS, ["x-canary=1"]),))
    assert choose_version(no_split, lookup({}), "/", 0.5) is None
    assert choose_version(no_split, lookup({"x-canary": "1"}), "/", 0.5) == "v2"


def test_choose_version_lookup_gets_lower_case_names():
    asked = []

    def spy(name):
        asked.append(name)
        return None

    rules = ServiceRules("orders", routes=(validate_route("orders", "v2", VERSIONS, ["X-Canary=1"]),))
    choose_version(rules, spy, "/", 0.0)
    assert asked == ["x-canary"]


def test_split_proportions():
    rng = random.Random(2024)
    rules = ServiceRules("orders", split=validate_split("orders", parse_split_args(["v1=80", "v2=15", "v3=5"]), VERSIONS))
    counts = Counter(choose_version(rules, lookup({}), "/", rng.random()) for _ in range(10_000))
    assert counts["v1"] == pytest.approx(8000, abs=250)
    assert counts["v2"] == pytest.approx(1500, abs=200)
    assert counts["v3"] == pytest.approx(500, abs=120)


# ---- wire form ---------------------------------------------------------------------------------

FULL = ServiceRules(
    service="orders",
    routes=RULES.routes,
    split=RULES.split,
    fault=validate_fault("5:503", "10:200ms"),
    mirror=validate_mirror("orders", "v3", VERSIONS, 25),
)


@pytest.mark.parametrize("rules", [FULL, ServiceRules("orders"), RULES,
                                   ServiceRules("orders", fault=validate_fault(None, "1:1s"))])
def test_encode_decode_round_trip(rules):
    import json
    wire = json.loads(json.dumps(encode_rules(rules)))
    assert decode_rules(wire) == rules


def test_encode_shape():
    wire = encode_rules(FULL)
    assert wire["split"] == {"weights": [["v1", 90], ["v2", 10]]}
    assert wire["routes"][0] == {"match_headers": [["x-user", "alice"]], "path_prefix": "/admin", "to_version": "v3"}
    assert wire["mirror"] == {"to_version": "v3", "percent": 25.0}
    assert wire["fault"] == {"abort_percent": 5.0, "abort_status": 503, "delay_percent": 10.0, "delay_s": 0.2}


def _broken(path: list, value) -> dict:
    wire = encode_rules(FULL)
    obj = wire
    for key in path[:-1]:
        obj = obj[key]
    if value is KeyError:
        del obj[path[-1]]
    else:
        obj[path[-1]] = value
    return wire


@pytest.mark.parametrize("wire, fragment", [
    ("nope", "rules: expected an object"),
    (_broken(["service"], KeyError), "rules.service: missing"),
    (_broken(["service"], 5), "rules.service: expected str"),
    (_broken(["routes", 0, "to_version"], KeyError), "rules.routes[0].to_version: missing"),
    (_broken(["routes", 1, "match_headers", 0], ["x"]), "rules.routes[1].match_headers[0]"),
    (_broken(["routes", 0, "path_prefix"], "admin"), "rules.routes[0]: route of orders: path prefix"),
    (_broken(["split", "weights"], [["v1", 90], ["v2", 20]]), "rules.split.weights: split of orders: weights must sum to 100"),
    (_broken(["split", "weights", 0], ["v1"]), "rules.split.weights[0]"),
    (_broken(["split", "weights"], [["v1", 50], ["v1", 50]]), "appears twice"),
    (_broken(["split"], [1]), "rules.split: expected dict"),
    (_broken(["fault", "abort_status"], 200), "rules.fault.abort_status"),
    (_broken(["fault", "abort_percent"], 101), "rules.fault.abort_percent"),
    (_broken(["fault", "abort_percent"], True), "rules.fault.abort_percent: expected"),
    (_broken(["fault", "delay_s"], -1), "rules.fault.delay_s"),
    (_broken(["fault", "delay_percent"], KeyError), "rules.fault.delay_percent: missing"),
    (_broken(["mirror", "percent"], "10"), "rules.mirror.percent: expected"),
    (_broken(["mirror", "to_version"], "no good"), "rules.mirror: mirror of orders"),
])
def test_decode_errors_name_the_field(wire, fragment):
    with pytest.raises(ValueError) as excinfo:
        decode_rules(wire)
    assert fragment in str(excinfo.value)
