"""Decode the traffic policy of a destination service from its `mesh.*` labels; pure, stdlib only.

The labels live on the destination service's containers; every caller's sidecar applies them when it
sends requests to that service (Istio's DestinationRule + VirtualService retries/timeouts, in labels).
Decoding happens once, in meshd's snapshot build, never on a node: the result is a tree of frozen
dataclasses that the snapshot carries as typed fields (meshcore.policy_wire) and whose fields the
data path reads as plain attributes.

`POLICY_LABELS` lists every label with its default and meaning (the README prints it).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from .durations import UNIT_SECONDS, parse_duration
from .labels import LabelDecodeError, decode_bool, decode_decimal

LB_POLICIES = ("least-request", "round-robin", "random", "ring-hash")
HTTP_RETRY_ON = ("connect-failure", "reset", "5xx", "gateway-error", "retriable-status-codes")
# Istio's retryOn names for gRPC: a response whose grpc-status is that code (meshcore.grpc maps them)
GRPC_RETRY_ON = ("cancelled", "deadline-exceeded", "internal", "resource-exhausted", "unavailable")
RETRY_ON = HTTP_RETRY_ON + GRPC_RETRY_ON
FAILURES = ("connect-failure", "reset", "timeout")  # transport outcomes the data path reports
UNLIMITED = 2**32 - 1          # Istio's circuit breaker thresholds: effectively no limit
MAX_RETRY_ATTEMPTS = 10        # upper bound for mesh.retries.attempts (retry storms)
MAX_EJECTION_TIME_S = 300.0    # Envoy's outlier_detection.max_ejection_time default
RATE_LIMIT_MAX_BUCKETS = 10_000  # per-caller token buckets kept (least recently used evicted)

DEFAULT_RETRY_ON = frozenset({"connect-failure", "reset"})

# (label, default, meaning): the README prints this table.
POLICY_LABELS: tuple[tuple[str, str, str], ...] = (
    ("mesh.lb", "least-request",
     "load balancing: least-request (power of two choices) | round-robin | random | ring-hash"),
    ("mesh.lb.hash-header", "-", "ring-hash only: request header whose value picks the endpoint"),
    ("mesh.timeout", "off", "whole-request timeout, all tries included (e.g. 250ms, 2s, 1m)"),
    ("mesh.retries.attempts", "2", "retries after the first try (0 disables retries; at most 10)"),
    ("mesh.retries.per-try-timeout", "off", "timeout of each try; an expired try may be retried"),
    ("mesh.retries.on", "connect-failure,reset",
     "comma list of connect-failure, reset, 5xx, gateway-error, retriable-status-codes; for gRPC also "
     "cancelled, deadline-exceeded, internal, resource-exhausted, unavailable (the response's grpc-status)"),
    ("mesh.retries.status-codes", "-", "comma list of HTTP statuses for retriable-status-codes"),
    ("mesh.retries.backoff", "25ms,250ms", "base[,max] of exponential backoff with full jitter; max = 10x base"),
    ("mesh.retries.budget", "20%,3",
     "percent[,min]: retries in flight may be this share of active requests, and at least min"),
    ("mesh.retries.non-idempotent", "false",
     "true: also retry POST/PATCH/... after the request was sent (it may have been processed)"),
    ("mesh.circuit.max-connections", str(UNLIMITED), "connections per caller sidecar to the service"),
    ("mesh.circuit.max-pending", str(UNLIMITED), "requests waiting for a connection"),
    ("mesh.circuit.max-requests", str(UNLIMITED), "requests in flight; beyond it: 503, flag UO"),
    ("mesh.outlier.consecutive-5xx", "5", "eject an endpoint after this many 5xx/failures in a row (off: 0)"),
    ("mesh.outlier.consecutive-gateway-errors", "off", "eject after this many 502/503/504/failures in a row"),
    ("mesh.outlier.interval", "10s", "an endpoint's ejection count decays by one per interval spent healthy"),
    ("mesh.outlier.base-ejection", "30s", "ejection time = base x times ejected (at most 300s)"),
    ("mesh.outlier.max-ejection-percent", "10%", "share of endpoints ejected at once; one may always be"),
    ("mesh.outlier.min-health-percent", "50%", "below this share of healthy endpoints, ejections are ignored "
     "(panic, Envoy's default threshold); at 0% every endpoint ejected answers 503 UH at once"),
    ("mesh.ratelimit", "off", "inbound token bucket: N/s, N/m or N/h"),
    ("mesh.ratelimit.burst", "N", "bucket size (default: the N of mesh.ratelimit)"),
    ("mesh.ratelimit.per-caller", "false", "true: one bucket per caller identity (at most 10,000 kept)"),
)
POLICY_LABEL_NAMES = frozenset(name for name, _, _ in POLICY_LABELS)
# Prefixes this module owns: a label under them that is not in POLICY_LABEL_NAMES is a typo.
POLICY_PREFIXES = ("mesh.lb", "mesh.timeout", "mesh.retries.", "mesh.circuit.", "mesh.outlier.", "mesh.ratelimit")

_INT_RE = re.compile(r"^-?[0-9]+$")
_RATE_RE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)\s*/\s*(s|m|h)$")
_OFF = ("off", "none")
_TOKEN_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # RFC 9110 token (header field name)


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 2                               # retries after the first try (Istio's counting)
    per_try_timeout: float | None = None            # seconds; None = off
    on: frozenset[str] = DEFAULT_RETRY_ON
    status_codes: frozenset[int] = frozenset()
    backoff_base: float = 0.025
    backoff_max: float = 0.25
    budget_percent: float = 20.0
    budget_min: int = 3
    non_idempotent: bool = False


@dataclass(frozen=True)
class CircuitPolicy:
    max_connections: int = UNLIMITED
    max_pending: int = UNLIMITED
    max_requests: int = UNLIMITED


@dataclass(frozen=True)
class OutlierPolicy:
    consecutive_5xx: int | None = 5                 # None = off
    consecutive_gateway_errors: int | None = None   # None = off
    interval: float = 10.0
    base_ejection: float = 30.0
    max_ejection_percent: float = 10.0
    max_ejection: float = MAX_EJECTION_TIME_S
    # Below this share of healthy endpoints ejections are ignored (panic), Envoy's default
    # healthy_panic_threshold: a lone instance is never ejected into a hard outage, so a service
    # that fails because its own upstream fails is not cut off by its callers. 0% = no panic.
    min_health_percent: float = 50.0


@dataclass(frozen=True)
class RateLimitPolicy:
    rate_per_s: float
    burst: float
    per_caller: bool = False


@dataclass(frozen=True)
class TrafficPolicy:
    lb: str = "least-request"
    hash_header: str | None = None                  # lower case; ring-hash only
    timeout: float | None = None                    # seconds; None = off
    retries: RetryPolicy = field(default_factory=RetryPolicy)
    circuit: CircuitPolicy = field(default_factory=CircuitPolicy)
    outlier: OutlierPolicy = field(default_factory=OutlierPolicy)
    ratelimit: RateLimitPolicy | None = None        # None = off


DEFAULT_POLICY = TrafficPolicy()


# ---- value decoders ----------------------------------------------------------------------------

def decode_duration(label: str, raw: str) -> float:
    """Seconds from a duration label (meshcore.durations: `ms`, `s`, `m`, `h`, `d`, unit required) or
    LabelDecodeError naming the label."""
    try:
        return parse_duration(raw)
    except ValueError as exc:
        raise LabelDecodeError(label, str(exc)) from None


def _positive_duration(label: str, raw: str, allow_off: bool = False) -> float | None:
    if allow_off and raw.strip().lower() in _OFF:
        return None
    value = decode_duration(label, raw)
    if value <= 0:
        raise LabelDecodeError(label, f"{raw!r} must be more than zero" + (" (or off)" if allow_off else ""))
    return value


def decode_percent(label: str, raw: str) -> float:
    """A percentage 0..100 from `20%` or `20` (decimals allowed) or LabelDecodeError naming the label."""
    text = raw.strip()
    body = text[:-1].rstrip() if text.endswith("%") else text
    if not re.fullmatch(r"-?[0-9]+(\.[0-9]+)?", body):
        raise LabelDecodeError(label, f"{raw!r} is not a percentage (like 20%)")
    value = float(body)
    if not 0.0 <= value <= 100.0:
        raise LabelDecodeError(label, f"{raw!r} is outside 0%..100%")
    return value


def decode_int(label: str, raw: str, low: int, high: int) -> int:
    """An integer in low..high (plain ASCII digits) or LabelDecodeError naming the label."""
    text = raw.strip()
    if not _INT_RE.match(text):
        raise LabelDecodeError(label, f"{raw!r} is not a whole number")
    return decode_decimal(label, text, low, high)


def _count_or_off(label: str, raw: str) -> int | None:
    if raw.strip().lower() in _OFF:
        return None
    value = decode_int(label, raw, 0, 1_000_000)
    return value or None


def _comma_list(raw: str) -> list[str]:
    return [part.strip() for part in raw.split(",") if part.strip()]


# ---- sections ----------------------------------------------------------------------------------

def _decode_retries(labels: dict[str, str]) -> RetryPolicy:
    d = RetryPolicy()
    attempts = d.attempts
    if "mesh.retries.attempts" in labels:
        attempts = decode_int("mesh.retries.attempts", labels["mesh.retries.attempts"], 0, MAX_RETRY_ATTEMPTS)
    per_try = d.per_try_timeout
    if "mesh.retries.per-try-timeout" in labels:
        per_try = _positive_duration("mesh.retries.per-try-timeout", labels["mesh.retries.per-try-timeout"],
                                     allow_off=True)
    on = d.on
    if "mesh.retries.on" in labels:
        words = [w.lower() for w in _comma_list(labels["mesh.retries.on"])]
        if not words:
            raise LabelDecodeError("mesh.retries.on", "empty (to disable retries set mesh.retries.attempts=0)")
        for word in words:
            if word not in RETRY_ON:
                raise LabelDecodeError("mesh.retries.on", f"{word!r} is not one of {', '.join(RETRY_ON)}")
        on = frozenset(words)
    codes: frozenset[int] = frozenset()
    if "mesh.retries.status-codes" in labels:
        raw = labels["mesh.retries.status-codes"]
        items = _comma_list(raw)
        if not items:
            raise LabelDecodeError("mesh.retries.status-codes", "empty: list HTTP statuses like 503,429")
        codes = frozenset(decode_int("mesh.retries.status-codes", item, 100, 599) for item in items)
        if "retriable-status-codes" not in on:
            raise LabelDecodeError("mesh.retries.status-codes",
                                   "needs retriable-status-codes in mesh.retries.on")
    elif "retriable-status-codes" in on:
        raise LabelDecodeError("mesh.retries.on", "retriable-status-codes needs mesh.retries.status-codes")
    base, cap = d.backoff_base, d.backoff_max
    if "mesh.retries.backoff" in labels:
        label = "mesh.retries.backoff"
        parts = labels[label].split(",")
        if len(parts) > 2 or not parts[0].strip():
            raise LabelDecodeError(label, f"{labels[label]!r} is not base[,max] (like 25ms,250ms)")
        base = _positive_duration(label, parts[0])
        cap = _positive_duration(label, parts[1]) if len(parts) == 2 else base * 10
        if cap < base:
            raise LabelDecodeError(label, f"max {parts[1].strip()} is less than base {parts[0].strip()}")
    percent, minimum = d.budget_percent, d.budget_min
    if "mesh.retries.budget" in labels:
        label = "mesh.retries.budget"
        parts = labels[label].split(",")
        if len(parts) > 2:
            raise LabelDecodeError(label, f"{labels[label]!r} is not percent[,min] (like 20%,3)")
        percent = decode_percent(label, parts[0])
        if len(parts) == 2:
            minimum = decode_int(label, parts[1], 0, 1_000_000)
    non_idem = d.non_idempotent
    if "mesh.retries.non-idempotent" in labels:
        non_idem = decode_bool("mesh.retries.non-idempotent", labels["mesh.retries.non-idempotent"])
    return RetryPolicy(attempts=attempts, per_try_timeout=per_try, on=on, status_codes=codes,
                       backoff_base=base, backoff_max=cap, budget_percent=percent, budget_min=minimum,
                       non_idempotent=non_idem)


def _decode_circuit(labels: dict[str, str]) -> CircuitPolicy:
    values = {}
    for attr, label in (("max_connections", "mesh.circuit.max-connections"),
                        ("max_pending", "mesh.circuit.max-pending"),
                        ("max_requests", "mesh.circuit.max-requests")):
        if label in labels:
            values[attr] = decode_int(label, labels[label], 1, UNLIMITED)
    return CircuitPolicy(**values)


def _decode_outlier(labels: dict[str, str]) -> OutlierPolicy:
    d = OutlierPolicy()
    c5 = d.consecutive_5xx
    if "mesh.outlier.consecutive-5xx" in labels:
        c5 = _count_or_off("mesh.outlier.consecutive-5xx", labels["mesh.outlier.consecutive-5xx"])
    cgw = d.consecutive_gateway_errors
    if "mesh.outlier.consecutive-gateway-errors" in labels:
        cgw = _count_or_off("mesh.outlier.consecutive-gateway-errors",
                            labels["mesh.outlier.consecutive-gateway-errors"])
    interval = d.interval
    if "mesh.outlier.interval" in labels:
        interval = _positive_duration("mesh.outlier.interval", labels["mesh.outlier.interval"])
    base = d.base_ejection
    if "mesh.outlier.base-ejection" in labels:
        base = _positive_duration("mesh.outlier.base-ejection", labels["mesh.outlier.base-ejection"])
    pct = d.max_ejection_percent
    if "mesh.outlier.max-ejection-percent" in labels:
        pct = decode_percent("mesh.outlier.max-ejection-percent", labels["mesh.outlier.max-ejection-percent"])
    min_health = d.min_health_percent
    if "mesh.outlier.min-health-percent" in labels:
        min_health = decode_percent("mesh.outlier.min-health-percent", labels["mesh.outlier.min-health-percent"])
    return OutlierPolicy(consecutive_5xx=c5, consecutive_gateway_errors=cgw, interval=interval,
                         base_ejection=base, max_ejection_percent=pct,
                         max_ejection=max(MAX_EJECTION_TIME_S, base), min_health_percent=min_health)


def _decode_ratelimit(labels: dict[str, str]) -> RateLimitPolicy | None:
    if "mesh.ratelimit" not in labels:
        for dependent in ("mesh.ratelimit.burst", "mesh.ratelimit.per-caller"):
            if dependent in labels:
                raise LabelDecodeError(dependent, "needs mesh.ratelimit (like 100/s)")
        return None
    raw = labels["mesh.ratelimit"]
    if raw.strip().lower() in _OFF:
        return None
    m = _RATE_RE.match(raw.strip().lower())
    if not m:
        raise LabelDecodeError("mesh.ratelimit", f"{raw!r} is not a rate (like 100/s, 600/m, 1000/h)")
    count = float(m.group(1))
    if not math.isfinite(count):
        raise LabelDecodeError("mesh.ratelimit", f"{raw[:20]!r}... is too large")
    if count <= 0:
        raise LabelDecodeError("mesh.ratelimit", f"{raw!r} must allow more than zero requests")
    rate = count / UNIT_SECONDS[m.group(2)]
    burst = max(count, 1.0)
    if "mesh.ratelimit.burst" in labels:
        burst = float(decode_int("mesh.ratelimit.burst", labels["mesh.ratelimit.burst"], 1, UNLIMITED))
    per_caller = False
    if "mesh.ratelimit.per-caller" in labels:
        per_caller = decode_bool("mesh.ratelimit.per-caller", labels["mesh.ratelimit.per-caller"])
    return RateLimitPolicy(rate_per_s=rate, burst=burst, per_caller=per_caller)


def is_policy_label(label: str) -> bool:
    """True for a label this module decodes, or one under its prefixes (a typo to report)."""
    return label.startswith(POLICY_PREFIXES)


def policy_labels(labels: dict[str, str]) -> dict[str, str]:
    """Only the traffic-policy labels of a container (what a snapshot needs to carry)."""
    return {k: v for k, v in labels.items() if k.startswith(POLICY_PREFIXES)}


def decode_traffic_policy(labels: dict[str, str]) -> TrafficPolicy:
    """The TrafficPolicy of a service from its labels; raises LabelDecodeError naming the label."""
    for key in labels:
        if key.startswith(POLICY_PREFIXES) and key not in POLICY_LABEL_NAMES:
            raise LabelDecodeError(key, "unknown traffic policy label")
    lb = "least-request"
    if "mesh.lb" in labels:
        lb = labels["mesh.lb"].strip().lower()
        if lb not in LB_POLICIES:
            raise LabelDecodeError("mesh.lb", f"{labels['mesh.lb']!r} is not one of {', '.join(LB_POLICIES)}")
    hash_header = None
    if "mesh.lb.hash-header" in labels:
        hash_header = labels["mesh.lb.hash-header"].strip().lower()
        if not _TOKEN_RE.match(hash_header):
            raise LabelDecodeError("mesh.lb.hash-header", f"{labels['mesh.lb.hash-header']!r} is not a header name")
        if lb != "ring-hash":
            raise LabelDecodeError("mesh.lb.hash-header", "needs mesh.lb=ring-hash")
    elif lb == "ring-hash":
        raise LabelDecodeError("mesh.lb", "ring-hash needs mesh.lb.hash-header (the header to hash)")
    timeout = None
    if "mesh.timeout" in labels:
        timeout = _positive_duration("mesh.timeout", labels["mesh.timeout"], allow_off=True)
    return TrafficPolicy(lb=lb, hash_header=hash_header, timeout=timeout, retries=_decode_retries(labels),
                         circuit=_decode_circuit(labels), outlier=_decode_outlier(labels),
                         ratelimit=_decode_ratelimit(labels))
