"""Per-request resilience decisions: retries, backoff, budgets, breakers, outlier detection, rate
limits, weighted picks, consistent hashing, fault injection. Pure, standard library only.

Nothing here reads a clock or a random source: callers pass `now` (monotonic seconds) and random
floats in [0, 1). Nothing here is thread-safe; one sidecar event loop owns each object.
The stateful classes use __slots__ and plain counters so the data path pays attribute access only.
"""

from __future__ import annotations

import hashlib
import math
from bisect import bisect_right
from collections import OrderedDict
from functools import lru_cache
from typing import Any, Sequence

from .policy import OutlierPolicy, RetryPolicy

# ---- response flags (Envoy access log %RESPONSE_FLAGS%, also Istio's `response_flags` label) ----
UH = "UH"    # Envoy access log docs: no healthy upstream hosts in the upstream cluster (503)
UF = "UF"    # Envoy access log docs: upstream connection failure (503)
UO = "UO"    # Envoy access log docs: upstream overflow, i.e. circuit breaking (503)
URX = "URX"  # Envoy access log docs: rejected because the upstream retry limit or max connect attempts was reached
RL = "RL"    # Envoy access log docs: rate limited locally by the HTTP rate limit filter (429)
FI = "FI"    # Envoy access log docs: request aborted with a response code by fault injection
DI = "DI"    # Envoy access log docs: request processing was delayed by fault injection
UT = "UT"    # Envoy access log docs: upstream request timeout (504)
UC = "UC"    # Envoy access log docs: upstream connection termination (503)
NR = "NR"    # Envoy access log docs: no route configured for the request (404) or no matching filter chain
NO_FLAGS = "-"  # Envoy prints "-" when no flag is set

# RFC 9110 section 9.2.2: the idempotent methods (the safe ones plus PUT and DELETE).
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


# ---- retries -----------------------------------------------------------------------------------

def backoff_delay(attempt: int, base: float, cap: float, rand: float) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2**attempt)).

    `attempt` counts from 0 (the wait before the first retry). AWS Architecture Blog "Exponential
    Backoff And Jitter"; Envoy's retry back-off uses the same shape (base 25ms, max 10x base).
    """
    if attempt < 0:
        attempt = 0
    # 2**attempt grows without bound; once it passes cap/base the cap decides anyway.
    ceiling = cap if attempt >= 62 else min(cap, base * (1 << attempt))
    return rand * ceiling


class RetryBudget:
    """Envoy's retry budget: retries in flight < max(min_concurrency, percent% of active requests).

    `active_requests` counts requests in flight to the service (first tries, each counted once until
    the caller is answered); `active_retries` counts retries in flight. The shell calls
    start_request/finish_request around each request and start_retry/finish_retry around each retry.
    """

    __slots__ = ("ratio", "min_concurrency", "active_requests", "active_retries")

    def __init__(self, percent: float = 20.0, min_concurrency: int = 3):
        self.ratio = percent / 100.0
        self.min_concurrency = min_concurrency
        self.active_requests = 0
        self.active_retries = 0

    @classmethod
    def from_policy(cls, policy: RetryPolicy) -> "RetryBudget":
        return cls(policy.budget_percent, policy.budget_min)

    def limit(self) -> float:
        """How many retries may be in flight right now."""
        return max(self.min_concurrency, self.ratio * self.active_requests)

    def can_retry(self, now: float) -> bool:
        """True when one more retry fits. `now` is unused today (kept for a per-second allowance
        like Linkerd's, so the call sites will not change)."""
        return self.active_retries < max(self.min_concurrency, self.ratio * self.active_requests)

    def start_request(self) -> None:
        self.active_requests += 1

    def finish_request(self) -> None:
        if self.active_requests > 0:
            self.active_requests -= 1

    def start_retry(self) -> None:
        self.active_retries += 1

    def finish_retry(self) -> None:
        if self.active_retries > 0:
            self.active_retries -= 1


def is_idempotent(method: str) -> bool:
    """RFC 9110 section 9.2.2 (method names are case-sensitive; the shell passes them as received)."""
    return method in IDEMPOTENT_METHODS


def should_retry(policy: RetryPolicy, attempt: int, method: str, status: int | None,
                 failure: str | None, request_sent: bool) -> bool:
    """Whether to retry a try that ended with `status` (a response) or `failure` (no response).

    `attempt` = retries done so far (0 after the first try failed); retried while attempt < policy.attempts.
    `failure` is one of connect-failure, reset, timeout (a per-try timeout; the whole-request timeout is
    final and never retried). Envoy semantics (router retry_on, x-envoy-retry-on):
      connect-failure        connect failures only
      reset                  no response at all: connect failure, reset, per-try timeout
      5xx                    any 500..599 response, and every failure (they become 503/504)
      gateway-error          502, 503, 504 responses, and every failure (Envoy counts a reset as 503)
      retriable-status-codes the statuses in policy.status_codes
    Non-idempotent methods (anything outside RFC 9110 9.2.2) are not retried once the request was
    sent, unless policy.non_idempotent; before sending (connect failure) every method may retry.
    """
    if attempt >= policy.attempts:
        return False
    if request_sent and not policy.non_idempotent and method not in IDEMPOTENT_METHODS:
        return False
    on = policy.on
    if failure is not None:
        if failure == "connect-failure" and "connect-failure" in on:
            return True
        return "reset" in on or "5xx" in on or "gateway-error" in on
    if status is None:
        return False
    if status >= 500 and status <= 599:
        if "5xx" in on:
            return True
        if (status == 502 or status == 503 or status == 504) and "gateway-error" in on:
            return True
    return status in policy.status_codes and "retriable-status-codes" in on


# ---- circuit breaker (Envoy thresholds) ---------------------------------------------------------

class CircuitBreaker:
    """Envoy's circuit breaking: counters against thresholds, no closed/open state machine.

    A try_acquire_* that returns False means overflow: answer 503 with flag UO and do not call the
    matching release. Every successful acquire must be released exactly once.
    """

    __slots__ = ("max_connections", "max_pending", "max_requests", "connections", "pending", "requests",
                 "overflows_total")

    def __init__(self, max_connections: int, max_pending: int, max_requests: int):
        self.max_connections = max_connections
        self.max_pending = max_pending
        self.max_requests = max_requests
        self.connections = 0
        self.pending = 0
        self.requests = 0
        self.overflows_total = 0

    @classmethod
    def from_policy(cls, policy: Any) -> "CircuitBreaker":
        """From a policy.CircuitPolicy."""
        return cls(policy.max_connections, policy.max_pending, policy.max_requests)

    def try_acquire_request(self) -> bool:
        if self.requests >= self.max_requests:
            self.overflows_total += 1
            return False
        self.requests += 1
        return True

    def release_request(self) -> None:
        if self.requests > 0:
            self.requests -= 1

    def try_acquire_pending(self) -> bool:
        if self.pending >= self.max_pending:
            self.overflows_total += 1
            return False
        self.pending += 1
        return True

    def release_pending(self) -> None:
        if self.pending > 0:
            self.pending -= 1

    def try_acquire_connection(self) -> bool:
        if self.connections >= self.max_connections:
            self.overflows_total += 1
            return False
        self.connections += 1
        return True

    def release_connection(self) -> None:
        if self.connections > 0:
            self.connections -= 1


# ---- outlier detection (Envoy, consecutive 5xx / gateway errors) -------------------------------

class _Host:
    __slots__ = ("c5xx", "cgw", "times", "until")

    def __init__(self) -> None:
        self.c5xx = 0
        self.cgw = 0
        self.times = 0            # ejections counted for the next ejection's length
        self.until = 0.0          # ejected while now < until; after that, when it came back


class OutlierDetector:
    """Passive health of one service's endpoints, keyed by an endpoint key (e.g. "address:port").

    - A response >= 500, or a failure (connect-failure, reset, timeout; Envoy maps them to 503/504),
      counts toward consecutive-5xx; 502/503/504 and failures also toward consecutive-gateway-errors
      (a 500 resets that one). Any response < 500 resets both counts.
    - Reaching a threshold ejects the endpoint for base_ejection x times ejected, at most max_ejection
      (300 s, Envoy's default). `times` decays by one per `interval` spent back in service, as in Envoy.
    - At most max_ejection_percent of the known endpoints are ejected at once, except that one endpoint
      may always be ejected (Envoy's always_eject_one_host); a refused ejection keeps the count, so the
      next error ejects once there is room.
    - Ejected endpoints return exactly when their time is over (Envoy waits for the next interval tick).
    - healthy(): the endpoints not ejected. When the healthy share falls below min_health_percent
      (default 50%, Envoy's panic threshold) it returns all of them; at 0% there is no panic, so with
      every endpoint ejected callers get an immediate 503 UH instead of calling a failing service.
    Call set_endpoints() whenever the snapshot changes so percentages use the real endpoint count.
    `clean` holds the known endpoints whose consecutive counts are both zero: for them record() of a
    response < 500 changes nothing, so a caller may skip it (the data path does, on each success).
    """

    __slots__ = ("c5xx_limit", "cgw_limit", "interval", "base", "max_ejection", "max_percent", "_hosts",
                 "_ejected", "ejections_total", "panics_total", "min_health", "clean")

    def __init__(self, policy: OutlierPolicy | None = None):
        policy = policy or OutlierPolicy()
        self.c5xx_limit = policy.consecutive_5xx or 0          # 0 = off
        self.cgw_limit = policy.consecutive_gateway_errors or 0
        self.interval = policy.interval
        self.base = policy.base_ejection
        self.max_ejection = policy.max_ejection
        self.max_percent = policy.max_ejection_percent
        self.min_health = policy.min_health_percent
        self._hosts: dict[str, _Host] = {}
        self._ejected: dict[str, float] = {}   # key -> until (may hold expired entries; pruned lazily)
        self.clean: set[str] = set()
        self.ejections_total = 0
        self.panics_total = 0

    def set_endpoints(self, keys: Sequence[str]) -> None:
        """The current endpoint set: state of vanished endpoints is dropped, new ones start clean."""
        wanted = set(keys)
        for key in list(self._hosts):
            if key not in wanted:
                del self._hosts[key]
                self._ejected.pop(key, None)
                self.clean.discard(key)
        for key in wanted:
            if key not in self._hosts:
                self._hosts[key] = _Host()
                self.clean.add(key)

    def _host(self, key: str) -> _Host:
        host = self._hosts.get(key)
        if host is None:
            host = self._hosts[key] = _Host()
            self.clean.add(key)
        return host

    def _active_ejections(self, now: float) -> int:
        ejected = self._ejected
        if ejected:
            for key in [k for k, until in ejected.items() if until <= now]:
                del ejected[key]
        return len(ejected)

    def any_ejected(self, now: float) -> bool:
        """True while some endpoint is ejected (cheap when none is: the data path asks per request)."""
        return bool(self._ejected) and self._active_ejections(now) > 0

    def is_ejected(self, key: str, now: float) -> bool:
        until = self._ejected.get(key)
        return until is not None and now < until

    def record(self, key: str, outcome: int | str, now: float) -> bool:
        """Record one try's outcome (an HTTP status, or a failure word); True when this ejected the key."""
        host = self._hosts.get(key)
        if host is None:
            host = self._host(key)
        if type(outcome) is int:
            if outcome < 500:
                host.c5xx = 0
                host.cgw = 0
                self.clean.add(key)
                return False
            gateway = outcome == 502 or outcome == 503 or outcome == 504
        else:
            gateway = True     # connect-failure, reset, timeout: Envoy maps them to 503/504
        self.clean.discard(key)
        host.c5xx += 1
        if gateway:
            host.cgw += 1
        else:
            host.cgw = 0
        if (self.c5xx_limit and host.c5xx >= self.c5xx_limit) or (self.cgw_limit and host.cgw >= self.cgw_limit):
            return self._eject(key, host, now)
        return False

    def _eject(self, key: str, host: _Host, now: float) -> bool:
        if self.is_ejected(key, now):
            return False
        active = self._active_ejections(now)
        total = len(self._hosts)
        if active > 0 and 100.0 * (active + 1) / total > self.max_percent:
            return False
        if host.times and self.interval > 0:
            # Envoy decrements the ejection multiplier once per interval the host stays healthy.
            host.times = max(0, host.times - int((now - host.until) / self.interval))
        host.times += 1
        host.until = now + min(self.max_ejection, self.base * host.times)
        host.c5xx = 0
        host.cgw = 0
        self.clean.add(key)
        self._ejected[key] = host.until
        self.ejections_total += 1
        return True

    def healthy(self, endpoint_keys: Sequence[str], now: float) -> list[str]:
        """The keys not ejected now; all of them in panic (healthy share below min_health_percent)."""
        ejected = self._ejected
        if not ejected or not self._active_ejections(now):
            return list(endpoint_keys)
        out = [k for k in endpoint_keys if not (k in ejected and now < ejected[k])]
        if endpoint_keys and 100.0 * len(out) < self.min_health * len(endpoint_keys):
            self.panics_total += 1
            return list(endpoint_keys)
        return out

    def state(self, now: float | None = None) -> dict[str, dict[str, Any]]:
        """Per-endpoint state for the admin API (JSON-ready)."""
        out = {}
        for key, host in sorted(self._hosts.items()):
            until = self._ejected.get(key)
            out[key] = {
                "ejected": until is not None and (now is None or now < until),
                "ejected_until": until,
                "times_ejected": host.times,
                "consecutive_5xx": host.c5xx,
                "consecutive_gateway_errors": host.cgw,
            }
        return out


# ---- rate limiting -----------------------------------------------------------------------------

class TokenBucket:
    """A token bucket of `burst` tokens refilled at `rate_per_s`; starts full."""

    __slots__ = ("rate", "burst", "tokens", "last")

    def __init__(self, rate_per_s: float, burst: float):
        if rate_per_s <= 0 or burst <= 0:
            raise ValueError("rate and burst must be more than zero")
        self.rate = rate_per_s
        self.burst = burst
        self.tokens = burst
        self.last: float | None = None

    def take(self, now: float, n: float = 1) -> tuple[bool, float]:
        """(allowed, retry_after_s): take n tokens, or say how long until n are there (inf if never)."""
        last = self.last
        if last is None:
            self.last = now
        elif now > last:
            tokens = self.tokens + (now - last) * self.rate
            self.tokens = tokens if tokens < self.burst else self.burst
            self.last = now
        # now < last (a caller's clock went backwards): no refill, keep `last`.
        if self.tokens >= n - 1e-9:  # refills add up in floating point: 4 x 0.25 is 0.9999...
            self.tokens = max(0.0, self.tokens - n)
            return True, 0.0
        if n > self.burst:
            return False, math.inf
        return False, (n - self.tokens) / self.rate


class RateLimiter:
    """Inbound rate limit: one bucket, or one per caller identity (LRU, at most max_buckets kept).

    An evicted caller starts again with a full bucket: the bound trades exactness for memory.
    """

    __slots__ = ("rate", "burst", "per_caller", "max_buckets", "_shared", "_buckets", "limited_total")

    def __init__(self, rate_per_s: float, burst: float, per_caller: bool = False, max_buckets: int = 10_000):
        self.rate = rate_per_s
        self.burst = burst
        self.per_caller = per_caller
        self.max_buckets = max_buckets
        self._shared = TokenBucket(rate_per_s, burst)
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self.limited_total = 0

    @classmethod
    def from_policy(cls, policy: Any) -> "RateLimiter":
        """From a policy.RateLimitPolicy."""
        return cls(policy.rate_per_s, policy.burst, policy.per_caller)

    def check(self, caller: str, now: float) -> tuple[bool, float]:
        """(allowed, retry_after_s) for one request from `caller` (a SPIFFE id or source name)."""
        if not self.per_caller:
            result = self._shared.take(now)
        else:
            buckets = self._buckets
            bucket = buckets.get(caller)
            if bucket is None:
                bucket = buckets[caller] = TokenBucket(self.rate, self.burst)
                if len(buckets) > self.max_buckets:
                    buckets.popitem(last=False)
            else:
                buckets.move_to_end(caller)
            result = bucket.take(now)
        if not result[0]:
            self.limited_total += 1
        return result

    def __len__(self) -> int:
        return len(self._buckets)


# ---- weighted pick, consistent hashing ---------------------------------------------------------

def pick_weighted(weights: Sequence[tuple[str, int]], rand: float) -> str:
    """The name whose cumulative weight band holds rand * total (weights are ints, usually summing to
    100); zero weights are never picked. Raises ValueError when no weight is positive."""
    total = 0
    for _, w in weights:
        total += w
    if total <= 0:
        raise ValueError("no positive weight to pick from")
    point = rand * total
    acc = 0
    last = None
    for name, w in weights:
        if w <= 0:
            continue
        acc += w
        last = name
        if point < acc:
            return name
    return last  # rand == 1.0 or float rounding: the last positive band


def _hash64(text: str) -> int:
    # Stable across processes and hosts (Python's hash() is salted per process).
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


class HashRing:
    """Consistent hashing (Envoy's ring hash): `vnodes` points per endpoint key on a 64-bit ring;
    a request key goes to the first point at or after its hash. Removing an endpoint moves only the
    keys that were on it. Build once per endpoint set; pick() is a bisect."""

    __slots__ = ("keys", "_points", "_owners")

    def __init__(self, keys: Sequence[str], vnodes: int = 100):
        self.keys = tuple(keys)
        ring = sorted((_hash64(f"{key}#{v}"), i) for i, key in enumerate(self.keys) for v in range(vnodes))
        self._points = [h for h, _ in ring]
        self._owners = [i for _, i in ring]

    def pick(self, key: str) -> int | None:
        """The index (into keys) of the endpoint owning `key`; None for an empty ring."""
        points = self._points
        if not points:
            return None
        pos = bisect_right(points, _hash64(key))
        return self._owners[pos if pos < len(points) else 0]


@lru_cache(maxsize=64)
def _ring(keys: tuple[str, ...]) -> HashRing:
    return HashRing(keys)


def ring_hash_pick(key: str, endpoint_keys: Sequence[str]) -> int | None:
    """The index of the endpoint that owns `key` on the ring of `endpoint_keys` (rings are cached)."""
    return _ring(tuple(endpoint_keys)).pick(key)


# ---- fault injection ---------------------------------------------------------------------------

def decide_fault(fault: Any, rand_abort: float, rand_delay: float) -> tuple[int | None, float]:
    """(abort_status or None, delay_s) for one request under a routing_rules.Fault (or None).

    Each part applies independently with its percentage (Envoy: delay first, then abort; flags DI, FI).
    """
    if fault is None:
        return None, 0.0
    abort = fault.abort_status if fault.abort_status is not None and rand_abort * 100.0 < fault.abort_percent else None
    delay = fault.delay_s if fault.delay_s > 0 and rand_delay * 100.0 < fault.delay_percent else 0.0
    return abort, delay
