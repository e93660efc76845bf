"""The wire form of a TrafficPolicy in the snapshot: encode, and decode validating every field; pure.

meshd decodes a service's `mesh.*` labels once (meshcore.policy.decode_traffic_policy, in the
snapshot build); from there on the policy travels as typed fields, so no node ever reads a label.
Durations are in seconds (`_s` names), percentages 0..100 (`_percent` names); `null` means off.

One table, `POLICY` (its `PolicyField`s, sections nested), says for every field its attribute, its
wire name, the label it comes from and its validation: encode, decode, the conflict check between
instances (`policy_difference`) and the documentation (docs/DESIGN.md, "Snapshot schema") follow it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from .policy import (
    LB_POLICIES, MAX_RETRY_ATTEMPTS, RETRY_ON, UNLIMITED, CircuitPolicy, OutlierPolicy, RateLimitPolicy,
    RetryPolicy, TrafficPolicy,
)

_TOKEN_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9a-z-]+$")  # RFC 9110 token, lower case (a header name)


class PolicyWireError(ValueError):
    """A policy on the wire that does not decode; the message starts with the field's path."""


def _fail(where: str, problem: str) -> PolicyWireError:
    return PolicyWireError(f"{where}: {problem}")


def _shown(raw: Any) -> str:
    text = json.dumps(raw) if isinstance(raw, (str, int, float, bool, type(None))) else type(raw).__name__
    return text if len(text) <= 40 else text[:37] + "..."


# ---- field kinds: each encodes its value and decodes (validates) its wire form -------------------

class _Scalar:
    """A JSON scalar field, the same value on the wire; with `off`, null (None) is allowed too."""

    off = False

    def what(self) -> str:
        raise NotImplementedError

    def accepts(self, raw: Any) -> bool:
        raise NotImplementedError

    def expected(self) -> str:
        return self.what() + (" or null" if self.off else "")

    def encode(self, value: Any) -> Any:
        return value

    def decode(self, raw: Any, where: str) -> Any:
        if raw is None and self.off:
            return None
        if not self.accepts(raw):
            raise _fail(where, f"expected {self.expected()}, got {_shown(raw)}")
        return raw


@dataclass(frozen=True)
class _Int(_Scalar):
    low: int
    high: int
    off: bool = False

    def what(self) -> str:
        return f"an integer {self.low}..{self.high}"

    def accepts(self, raw: Any) -> bool:
        return isinstance(raw, int) and not isinstance(raw, bool) and self.low <= raw <= self.high


@dataclass(frozen=True)
class _Number(_Scalar):
    low: float
    low_open: bool             # True: more than `low`; False: at least `low`
    high: float = math.inf
    off: bool = False

    def what(self) -> str:
        if self.high != math.inf:
            return f"a number {self.low:g}..{self.high:g}"
        return f"a number {'>' if self.low_open else '>='} {self.low:g}"

    def accepts(self, raw: Any) -> bool:
        if not isinstance(raw, (int, float)) or isinstance(raw, bool) or not math.isfinite(raw):
            return False
        return (raw > self.low if self.low_open else raw >= self.low) and raw <= self.high

    def decode(self, raw: Any, where: str) -> Any:
        value = super().decode(raw, where)
        return None if value is None else float(value)


@dataclass(frozen=True)
class _Choice(_Scalar):
    options: tuple[str, ...]

    def what(self) -> str:
        return "one of " + ", ".join(self.options)

    def accepts(self, raw: Any) -> bool:
        return isinstance(raw, str) and raw in self.options


class _Flag(_Scalar):
    def what(self) -> str:
        return "true or false"

    def accepts(self, raw: Any) -> bool:
        return isinstance(raw, bool)


class _HeaderName(_Scalar):
    off = True

    def what(self) -> str:
        return "a lower-case header name"

    def accepts(self, raw: Any) -> bool:
        return isinstance(raw, str) and _TOKEN_RE.match(raw) is not None


@dataclass(frozen=True)
class _Set:
    """A frozenset on the wire as a sorted list without repeats."""

    item: Any                  # the kind of each item
    nonempty: bool = False

    def expected(self) -> str:
        return ("a non-empty" if self.nonempty else "a") + f" list of {self.item.expected()}, without repeats"

    def encode(self, value: Any) -> Any:
        return sorted(value)

    def decode(self, raw: Any, where: str) -> Any:
        if not isinstance(raw, list) or (self.nonempty and not raw):
            raise _fail(where, f"expected {self.expected()}, got {_shown(raw)}")
        items = frozenset(self.item.decode(x, f"{where}[{i}]") for i, x in enumerate(raw))
        if len(items) != len(raw):
            raise _fail(where, "repeats an item")
        return items


@dataclass(frozen=True)
class PolicyField:
    """One field of the wire form: its attribute, wire name, source label and kind."""

    attr: str
    wire: str
    label: str
    kind: Any


@dataclass(frozen=True)
class _Section:
    """A nested policy dataclass, an object on the wire (`off`: null allowed, None)."""

    cls: type
    fields: tuple[PolicyField, ...]
    off: bool = False

    def expected(self) -> str:
        return "an object" + (" or null" if self.off else "")

    def encode(self, value: Any) -> Any:
        if value is None:
            return None
        return {f.wire: f.kind.encode(getattr(value, f.attr)) for f in self.fields}

    def decode(self, raw: Any, where: str) -> Any:
        if raw is None and self.off:
            return None
        if not isinstance(raw, dict):
            raise _fail(where, f"expected {self.expected()}, got {_shown(raw)}")
        names = {f.wire for f in self.fields}
        unknown = sorted(k for k in raw if k not in names)
        if unknown:
            raise _fail(f"{where}.{unknown[0]}", "unknown field")
        values = {}
        for f in self.fields:
            if f.wire not in raw:
                raise _fail(f"{where}.{f.wire}", "missing")
            values[f.attr] = f.kind.decode(raw[f.wire], f"{where}.{f.wire}")
        obj = self.cls(**values)
        _check_together(obj, where)
        return obj


_SECONDS = _Number(0.0, low_open=True)
_SECONDS_OR_OFF = _Number(0.0, low_open=True, off=True)
_PERCENT = _Number(0.0, low_open=False, high=100.0)
_LIMIT = _Int(1, UNLIMITED)
_COUNT_OR_OFF = _Int(1, 1_000_000, off=True)

RETRIES = _Section(RetryPolicy, (
    PolicyField("attempts", "attempts", "mesh.retries.attempts", _Int(0, MAX_RETRY_ATTEMPTS)),
    PolicyField("per_try_timeout", "per_try_timeout_s", "mesh.retries.per-try-timeout", _SECONDS_OR_OFF),
    PolicyField("on", "retry_on", "mesh.retries.on", _Set(_Choice(RETRY_ON), nonempty=True)),
    PolicyField("status_codes", "status_codes", "mesh.retries.status-codes", _Set(_Int(100, 599))),
    PolicyField("backoff_base", "backoff_base_s", "mesh.retries.backoff", _SECONDS),
    PolicyField("backoff_max", "backoff_max_s", "mesh.retries.backoff", _SECONDS),
    PolicyField("budget_percent", "budget_percent", "mesh.retries.budget", _PERCENT),
    PolicyField("budget_min", "budget_min", "mesh.retries.budget", _Int(0, 1_000_000)),
    PolicyField("non_idempotent", "non_idempotent", "mesh.retries.non-idempotent", _Flag()),
))
CIRCUIT = _Section(CircuitPolicy, (
    PolicyField("max_connections", "max_connections", "mesh.circuit.max-connections", _LIMIT),
    PolicyField("max_pending", "max_pending", "mesh.circuit.max-pending", _LIMIT),
    PolicyField("max_requests", "max_requests", "mesh.circuit.max-requests", _LIMIT),
))
OUTLIER = _Section(OutlierPolicy, (
    PolicyField("consecutive_5xx", "consecutive_5xx", "mesh.outlier.consecutive-5xx", _COUNT_OR_OFF),
    PolicyField("consecutive_gateway_errors", "consecutive_gateway_errors",
                "mesh.outlier.consecutive-gateway-errors", _COUNT_OR_OFF),
    PolicyField("interval", "interval_s", "mesh.outlier.interval", _SECONDS),
    PolicyField("base_ejection", "base_ejection_s", "mesh.outlier.base-ejection", _SECONDS),
    PolicyField("max_ejection", "max_ejection_s", "mesh.outlier.base-ejection", _SECONDS),
    PolicyField("max_ejection_percent", "max_ejection_percent", "mesh.outlier.max-ejection-percent", _PERCENT),
    PolicyField("min_health_percent", "min_health_percent", "mesh.outlier.min-health-percent", _PERCENT),
))
RATE_LIMIT = _Section(RateLimitPolicy, (
    PolicyField("rate_per_s", "rate_per_s", "mesh.ratelimit", _Number(0.0, low_open=True)),
    PolicyField("burst", "burst", "mesh.ratelimit.burst", _Number(1.0, low_open=False)),
    PolicyField("per_caller", "per_caller", "mesh.ratelimit.per-caller", _Flag()),
), off=True)
POLICY = _Section(TrafficPolicy, (
    PolicyField("lb", "lb", "mesh.lb", _Choice(LB_POLICIES)),
    PolicyField("hash_header", "hash_header", "mesh.lb.hash-header", _HeaderName()),
    PolicyField("timeout", "timeout_s", "mesh.timeout", _SECONDS_OR_OFF),
    PolicyField("retries", "retries", "mesh.retries.*", RETRIES),
    PolicyField("circuit", "circuit", "mesh.circuit.*", CIRCUIT),
    PolicyField("outlier", "outlier", "mesh.outlier.*", OUTLIER),
    PolicyField("ratelimit", "rate_limit", "mesh.ratelimit", RATE_LIMIT),
))


def _check_together(obj: Any, where: str) -> None:
    """The rules between fields of one section that the label decoder also enforces."""
    if isinstance(obj, TrafficPolicy) and (obj.lb == "ring-hash") != (obj.hash_header is not None):
        raise _fail(f"{where}.hash_header", "set exactly when lb is ring-hash")
    if isinstance(obj, RetryPolicy):
        if ("retriable-status-codes" in obj.on) != bool(obj.status_codes):
            raise _fail(f"{where}.status_codes", "non-empty exactly when retry_on has retriable-status-codes")
        if obj.backoff_max < obj.backoff_base:
            raise _fail(f"{where}.backoff_max_s", "less than backoff_base_s")
    if isinstance(obj, OutlierPolicy) and obj.max_ejection < obj.base_ejection:
        raise _fail(f"{where}.max_ejection_s", "less than base_ejection_s")


def encode_policy_wire(policy: TrafficPolicy) -> dict[str, Any]:
    """The JSON-ready form of a TrafficPolicy (every field present)."""
    return POLICY.encode(policy)


def decode_policy_wire(raw: Any, where: str = "policy") -> TrafficPolicy:
    """A TrafficPolicy from its wire form; raises PolicyWireError naming the field under `where`."""
    if isinstance(raw, dict) and any(isinstance(k, str) and k.startswith("mesh.") for k in raw):
        # A node must never be handed labels to parse: that is the wire form of older meshd builds.
        label = next(k for k in raw if isinstance(k, str) and k.startswith("mesh."))
        raise _fail(where, f"label strings ({label}) instead of typed fields: a meshd of another build")
    return POLICY.decode(raw, where)


def policy_difference(mine: TrafficPolicy, theirs: TrafficPolicy) -> tuple[str, str, Any, Any] | None:
    """The first field where two policies differ: (wire path, source label, my wire value, theirs)."""
    section, a, b, path = POLICY, mine, theirs, ""
    while True:
        for f in section.fields:
            va, vb = getattr(a, f.attr), getattr(b, f.attr)
            if va == vb:
                continue
            if isinstance(f.kind, _Section) and va is not None and vb is not None:
                section, a, b, path = f.kind, va, vb, f"{path}{f.wire}."
                break
            return f"{path}{f.wire}", f.label, f.kind.encode(va), f.kind.encode(vb)
        else:
            return None
