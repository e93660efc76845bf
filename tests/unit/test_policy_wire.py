"""Table tests of meshcore.policy_wire: the typed traffic policy in the snapshot (round trip, every
field's validation naming it, the conflict check's differing field), and the contract that a node
never reads a traffic-policy label."""

from __future__ import annotations

import ast
import copy
import json
from pathlib import Path

import pytest

from meshcore import policy as policy_module
from meshcore import snapshot as snapshot_module
from meshcore.labels import ContainerInfo
from meshcore.policy import DEFAULT_POLICY, POLICY_LABEL_NAMES, decode_traffic_policy
from meshcore.policy_wire import (
    POLICY, PolicyWireError, decode_policy_wire, encode_policy_wire, policy_difference,
)
from meshcore.snapshot import Snapshot, build_config, build_workloads, decode_snapshot, encode_snapshot
from sidecar.routing import build_route_table
from sidecar.traffic import LB_RING_HASH, TrafficRegistry

ROOT = Path(__file__).resolve().parents[2]

LABEL_SETS = [
    {},
    {"mesh.lb": "round-robin", "mesh.timeout": "2s"},
    {"mesh.lb": "ring-hash", "mesh.lb.hash-header": "X-User"},
    {"mesh.retries.attempts": "0"},
    {"mesh.retries.attempts": "10", "mesh.retries.per-try-timeout": "250ms", "mesh.retries.on": "5xx,reset",
     "mesh.retries.backoff": "10ms", "mesh.retries.budget": "50%,0", "mesh.retries.non-idempotent": "true"},
    {"mesh.retries.on": "retriable-status-codes,gateway-error", "mesh.retries.status-codes": "429,503"},
    {"mesh.retries.on": "unavailable,resource-exhausted,connect-failure"},
    {"mesh.circuit.max-connections": "1", "mesh.circuit.max-pending": "7", "mesh.circuit.max-requests": "100"},
    {"mesh.outlier.consecutive-5xx": "off", "mesh.outlier.consecutive-gateway-errors": "3",
     "mesh.outlier.interval": "1.5m", "mesh.outlier.base-ejection": "10m",
     "mesh.outlier.max-ejection-percent": "100%", "mesh.outlier.min-health-percent": "0"},
    {"mesh.ratelimit": "3/m"},
    {"mesh.ratelimit": "2.5/s", "mesh.ratelimit.burst": "9", "mesh.ratelimit.per-caller": "true"},
    {"mesh.ratelimit": "99999999999999999999/s"},
    {"mesh.timeout": "1" * 300 + "s", "mesh.outlier.base-ejection": "0.001ms"},
]


@pytest.mark.parametrize("labels", LABEL_SETS)
def test_every_decoded_label_set_round_trips_through_json(labels):
    policy = decode_traffic_policy(labels)
    wire = json.loads(json.dumps(encode_policy_wire(policy)))
    assert decode_policy_wire(wire) == policy


def test_the_default_policy_on_the_wire():
    """The documented shape (docs/DESIGN.md, Snapshot schema): every field, units in the names."""
    assert encode_policy_wire(DEFAULT_POLICY) == {
        "lb": "least-request", "hash_header": None, "timeout_s": None,
        "retries": {"attempts": 2, "per_try_timeout_s": None, "retry_on": ["connect-failure", "reset"],
                    "status_codes": [], "backoff_base_s": 0.025, "backoff_max_s": 0.25,
                    "budget_percent": 20.0, "budget_min": 3, "non_idempotent": False},
        "circuit": {"max_connections": 4294967295, "max_pending": 4294967295, "max_requests": 4294967295},
        "outlier": {"consecutive_5xx": 5, "consecutive_gateway_errors": None, "interval_s": 10.0,
                    "base_ejection_s": 30.0, "max_ejection_s": 300.0, "max_ejection_percent": 10.0,
                    "min_health_percent": 50.0},
        "rate_limit": None,
    }


def _fields(section=POLICY, prefix=""):
    """(wire path, field) of every field of the wire form, sections included."""
    for f in section.fields:
        yield prefix + f.wire, f
        if hasattr(f.kind, "fields"):
            yield from _fields(f.kind, f"{prefix}{f.wire}.")


# With a rate limit, so that its section's fields are on the wire too.
SAMPLE = encode_policy_wire(decode_traffic_policy({"mesh.ratelimit": "5/s"}))
PATHS = [path for path, _ in _fields()]


def _mutated(path: str, value) -> dict:
    wire = copy.deepcopy(SAMPLE)
    *parents, last = path.split(".")
    target = wire
    for key in parents:
        target = target[key]
    if value is ...:
        del target[last]
    else:
        target[last] = value
    return wire


def _error(wire) -> str:
    with pytest.raises(PolicyWireError) as exc:
        decode_policy_wire(wire, "services.catalog.policy")
    return str(exc.value)


@pytest.mark.parametrize("path, f", list(_fields()), ids=PATHS)
def test_every_field_missing_or_of_the_wrong_type_is_named(path, f):
    assert _error(_mutated(path, ...)) == f"services.catalog.policy.{path}: missing"
    wrong = [] if hasattr(f.kind, "fields") else {}
    assert _error(_mutated(path, wrong)).startswith(f"services.catalog.policy.{path}: expected ")


@pytest.mark.parametrize("path, value, message", [
    ("lb", "fastest", "lb: expected one of least-request, round-robin, random, ring-hash, got \"fastest\""),
    ("lb", "ring-hash", "hash_header: set exactly when lb is ring-hash"),
    ("hash_header", "x-user", "hash_header: set exactly when lb is ring-hash"),
    ("hash_header", "X-User", "hash_header: expected a lower-case header name or null"),
    ("hash_header", "a b", "hash_header: expected a lower-case header name or null"),
    ("timeout_s", 0, "timeout_s: expected a number > 0 or null, got 0"),
    ("timeout_s", -1.5, "timeout_s: expected a number > 0 or null"),
    ("timeout_s", "2s", "timeout_s: expected a number > 0 or null, got \"2s\""),
    ("timeout_s", True, "timeout_s: expected a number > 0 or null, got true"),
    ("retries.attempts", -1, "retries.attempts: expected an integer 0..10, got -1"),
    ("retries.attempts", 11, "retries.attempts: expected an integer 0..10"),
    ("retries.attempts", 2.0, "retries.attempts: expected an integer 0..10, got 2.0"),
    ("retries.attempts", None, "retries.attempts: expected an integer 0..10, got null"),
    ("retries.per_try_timeout_s", 0, "retries.per_try_timeout_s: expected a number > 0 or null"),
    ("retries.retry_on", [], "retries.retry_on: expected a non-empty list of one of connect-failure"),
    ("retries.retry_on", ["reset", "boom"], "retries.retry_on[1]: expected one of connect-failure"),
    ("retries.retry_on", ["reset", "reset"], "retries.retry_on: repeats an item"),
    ("retries.retry_on", ["retriable-status-codes"],
     "retries.status_codes: non-empty exactly when retry_on has retriable-status-codes"),
    ("retries.status_codes", [503], "retries.status_codes: non-empty exactly when retry_on has"),
    ("retries.status_codes", [99], "retries.status_codes[0]: expected an integer 100..599, got 99"),
    ("retries.backoff_base_s", 0.0, "retries.backoff_base_s: expected a number > 0"),
    ("retries.backoff_base_s", 1.0, "retries.backoff_max_s: less than backoff_base_s"),
    ("retries.backoff_max_s", "x" * 60, "retries.backoff_max_s: expected a number > 0, got \"xxxxxxxx"),
    ("retries.budget_percent", 100.5, "retries.budget_percent: expected a number 0..100, got 100.5"),
    ("retries.budget_min", -3, "retries.budget_min: expected an integer 0..1000000"),
    ("retries.non_idempotent", "false", "retries.non_idempotent: expected true or false, got \"false\""),
    ("circuit.max_connections", 0, "circuit.max_connections: expected an integer 1..4294967295, got 0"),
    ("circuit.max_pending", 2**32, "circuit.max_pending: expected an integer 1..4294967295"),
    ("circuit.max_requests", None, "circuit.max_requests: expected an integer 1..4294967295, got null"),
    ("outlier.consecutive_5xx", 0, "outlier.consecutive_5xx: expected an integer 1..1000000 or null, got 0"),
    ("outlier.consecutive_gateway_errors", "off", "outlier.consecutive_gateway_errors: expected an integer"),
    ("outlier.interval_s", None, "outlier.interval_s: expected a number > 0, got null"),
    ("outlier.base_ejection_s", 301.0, "outlier.max_ejection_s: less than base_ejection_s"),
    ("outlier.max_ejection_s", 1e999, "outlier.max_ejection_s: expected a number > 0, got Infinity"),
    ("outlier.max_ejection_percent", -1, "outlier.max_ejection_percent: expected a number 0..100"),
    ("outlier.min_health_percent", float("nan"), "outlier.min_health_percent: expected a number 0..100, got NaN"),
    ("rate_limit", "5/s", "rate_limit: expected an object or null, got \"5/s\""),
    ("rate_limit.rate_per_s", 0, "rate_limit.rate_per_s: expected a number > 0, got 0"),
    ("rate_limit.burst", 0.5, "rate_limit.burst: expected a number >= 1, got 0.5"),
    ("rate_limit.per_caller", 1, "rate_limit.per_caller: expected true or false, got 1"),
    ("retries.tries", 3, "retries.tries: unknown field"),
    ("breaker", {}, "breaker: unknown field"),
])
def test_bad_values_are_named(path, value, message):
    assert _error(_mutated(path, value)).startswith(f"services.catalog.policy.{message}")


def test_values_at_the_bounds_decode():
    for path, value in [("retries.attempts", 0), ("retries.attempts", 10), ("outlier.consecutive_5xx", None),
                        ("retries.budget_percent", 0), ("outlier.min_health_percent", 100),
                        ("circuit.max_requests", 2**32 - 1), ("rate_limit", None), ("timeout_s", 1e-9)]:
        decoded = decode_policy_wire(_mutated(path, value))
        assert decoded == decode_policy_wire(encode_policy_wire(decoded)), path


@pytest.mark.parametrize("raw, message", [
    ({}, "policy.lb: missing"),
    ("mesh.lb=random", "policy: expected an object, got \"mesh.lb=random\""),
    ([["mesh.lb", "random"]], "policy: expected an object, got list"),
    (None, "policy: expected an object, got null"),
    ({"mesh.retries.attempts": "3"}, "policy: label strings (mesh.retries.attempts) instead of typed fields"),
])
def test_a_policy_of_another_shape_is_refused(raw, message):
    with pytest.raises(PolicyWireError) as exc:
        decode_policy_wire(raw)
    assert str(exc.value).startswith(message)


def test_every_wire_field_names_its_label():
    for path, f in _fields():
        if hasattr(f.kind, "fields") and not f.kind.off:
            assert f.label == f"mesh.{path}.*", path
        else:
            assert f.label in POLICY_LABEL_NAMES, (path, f.label)
    assert {f.label for _, f in _fields()} >= POLICY_LABEL_NAMES


@pytest.mark.parametrize("mine, theirs, expected", [
    ({}, {}, None),
    ({"mesh.retries.attempts": "2"}, {}, None),                       # the default, said or not
    ({"mesh.timeout": "2000ms"}, {"mesh.timeout": "2s"}, None),       # the same duration
    ({"mesh.timeout": "2s"}, {}, ("timeout_s", "mesh.timeout", 2.0, None)),
    ({"mesh.lb": "random"}, {"mesh.timeout": "1s"}, ("lb", "mesh.lb", "random", "least-request")),
    ({"mesh.retries.attempts": "5"}, {"mesh.retries.attempts": "3"},
     ("retries.attempts", "mesh.retries.attempts", 5, 3)),
    ({"mesh.retries.on": "5xx"}, {}, ("retries.retry_on", "mesh.retries.on", ["5xx"], ["connect-failure", "reset"])),
    ({"mesh.retries.backoff": "25ms,1s"}, {}, ("retries.backoff_max_s", "mesh.retries.backoff", 1.0, 0.25)),
    ({"mesh.circuit.max-pending": "9"}, {}, ("circuit.max_pending", "mesh.circuit.max-pending", 9, 2**32 - 1)),
    ({"mesh.outlier.base-ejection": "10m"}, {},
     ("outlier.base_ejection_s", "mesh.outlier.base-ejection", 600.0, 30.0)),
    ({"mesh.ratelimit": "1/s"}, {}, ("rate_limit", "mesh.ratelimit",
                                     {"rate_per_s": 1.0, "burst": 1.0, "per_caller": False}, None)),
    ({"mesh.ratelimit": "1/s"}, {"mesh.ratelimit": "1/s", "mesh.ratelimit.burst": "5"},
     ("rate_limit.burst", "mesh.ratelimit.burst", 1.0, 5.0)),
])
def test_policy_difference_names_the_first_differing_field(mine, theirs, expected):
    assert policy_difference(decode_traffic_policy(mine), decode_traffic_policy(theirs)) == expected


# ---- a node never reads a traffic-policy label ---------------------------------------------------

LABEL_READERS = {"decode_traffic_policy", "policy_labels", "is_policy_label", "POLICY_LABELS",
                 "POLICY_LABEL_NAMES", "POLICY_PREFIXES"}


def _names_used(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
    return names


def test_no_node_module_names_the_label_decoder():
    """sidecar/ and gateway/ use the typed policy of the snapshot: none of their modules imports,
    calls or otherwise names the traffic-policy label decoder."""
    offenders = {str(p.relative_to(ROOT)): sorted(_names_used(p) & LABEL_READERS)
                 for package in ("sidecar", "gateway") for p in sorted((ROOT / package).rglob("*.py"))}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_only_the_snapshot_build_decodes_policy_labels():
    """Outside its own module (meshcore/policy.py defines it) only meshd's snapshot build names the
    label decoder: the adaptive loop and every node work on typed fields."""
    users = sorted(str(p.relative_to(ROOT)) for package in ("meshcore", "meshd", "sidecar", "gateway", "meshctl")
                   for p in (ROOT / package).rglob("*.py") if "decode_traffic_policy" in _names_used(p))
    assert users == ["meshcore/snapshot.py"]


def test_a_node_applies_the_snapshot_policy_without_the_label_decoder(monkeypatch):
    labels = {"mesh.enable": "true", "mesh.service": "catalog", "mesh.port": "9000", "mesh.lb": "ring-hash",
              "mesh.lb.hash-header": "x-user", "mesh.timeout": "2s", "mesh.retries.attempts": "4",
              "mesh.outlier.consecutive-5xx": "3", "mesh.ratelimit": "10/s"}
    app = ContainerInfo(id="c1", name="/catalog", labels=labels, exposed_ports=(9000,), running=True,
                        networks={"shop_default": "10.0.0.9"})
    config, errors = build_config(build_workloads([app]), [], "mesh.local")   # meshd: labels read here
    assert errors == []
    wire = json.loads(json.dumps(encode_snapshot(Snapshot(version=3, config=config))))

    def refuse(*_args, **_kwargs):
        raise AssertionError("a node read traffic-policy labels")

    monkeypatch.setattr(policy_module, "decode_traffic_policy", refuse)
    monkeypatch.setattr(snapshot_module, "decode_traffic_policy", refuse)
    snapshot = decode_snapshot(wire)                                          # the node from here on
    registry = TrafficRegistry()
    registry.apply(build_route_table(snapshot))
    tr = registry.services["catalog"]
    assert tr.policy == config.services["catalog"].policy
    assert (tr.lb, tr.hash_header, tr.timeout) == (LB_RING_HASH, b"x-user", 2.0)
    assert tr.policy.retries.attempts == 4 and tr.outlier.c5xx_limit == 3
    assert tr.limiter is not None and tr.limiter.rate == 10.0


def test_design_documents_every_policy_field():
    """docs/DESIGN.md's "Snapshot schema" names every wire field of the policy (a renamed or new field
    must be documented)."""
    design = (ROOT / "docs" / "DESIGN.md").read_text(encoding="utf-8")
    section = design.split("## Snapshot schema", 1)[1].split("\n## ", 1)[0]
    leaves = [path for path, f in _fields() if not hasattr(f.kind, "fields") or f.kind.off]
    assert [path for path in leaves if f"`{path}`" not in section and f"`{path.split('.')[-1]}`" not in section] == []
