"""Per destination service traffic state of one node, and the decisions the request path asks of it.

A `ServiceTraffic` holds what the traffic layers of `sidecar.proxy` need for one mesh service: the
typed `TrafficPolicy` of the snapshot (meshcore.policy; meshd decoded it from the labels, a node
never reads a label), the live `ServiceRules` (meshcore.routing_rules), a
`CircuitBreaker`, an `OutlierDetector`, a `RetryBudget`, the inbound `RateLimiter`, the load-balancing
choice, and the service's endpoints grouped by version (`Subset`s, each a `Cluster` of its own).

Lifetime: one object per service name for the life of the node (`TrafficRegistry`). A snapshot swap
re-syncs it from the new `Cluster` (subsets rebuilt, policy applied only when it changed, thresholds
updated in place), so counters, breakers, budgets and ejections are not reset by config
pushes that do not concern them. The sync is done by `ProxyState.apply_snapshot` and, should a table
be swapped in another way, lazily at the first request that sees the new cluster (an identity check).

Nothing here is async or reads a clock; callers pass `now` and random floats (meshcore convention).
"""

from __future__ import annotations

from time import monotonic
from typing import Any

from meshcore.lb import merge_exclusions, pick_p2c, pick_random, pick_round_robin
from meshcore.policy import DEFAULT_POLICY, RetryPolicy, TrafficPolicy
from meshcore.resilience import (
    CircuitBreaker, HashRing, OutlierDetector, RateLimiter, RetryBudget, decide_fault,
)
from meshcore.routing_rules import ServiceRules, choose_mirror, choose_version

from .routing import Cluster, RouteTable, make_cluster

LB_LEAST_REQUEST, LB_ROUND_ROBIN, LB_RANDOM, LB_RING_HASH = 0, 1, 2, 3
_LB_CODES = {"least-request": LB_LEAST_REQUEST, "round-robin": LB_ROUND_ROBIN, "random": LB_RANDOM,
             "ring-hash": LB_RING_HASH}


def retry_statuses(policy: RetryPolicy) -> frozenset[int] | None:
    """The response statuses worth asking `should_retry` about; None when retries are off.

    503 is always in (when any failure kind is retried): a peer inbound's 503 carrying `x-mesh-flags`
    UF or UH means its app was unreachable, which the retry layer treats as a connect failure.
    """
    if policy.attempts <= 0:
        return None
    on = policy.on
    codes: set[int] = set()
    if "5xx" in on:
        codes.update(range(500, 600))
    if "gateway-error" in on:
        codes.update((502, 503, 504))
    if "retriable-status-codes" in on:
        codes.update(policy.status_codes)
    if on - {"retriable-status-codes"}:
        codes.add(503)
    return frozenset(codes)


class Subset:
    """The endpoints of one version of a service (or all of them), with their balancer state."""

    __slots__ = ("cluster", "traffic", "version", "ring", "rr")

    def __init__(self, cluster: Cluster, traffic: "ServiceTraffic", version: str | None, ring: bool):
        self.cluster = cluster
        self.traffic = traffic
        self.version = version
        self.ring = HashRing([f"{a}:{p}" for a, p in cluster.keys]) if ring and cluster.keys else None
        self.rr = 0   # round-robin counter


class ServiceTraffic:
    """The traffic state of one destination service (see the module docstring for its lifetime)."""

    __slots__ = ("name", "cluster", "policy", "rules", "fault", "mirror", "lb", "hash_header",
                 "timeout", "per_try_timeout", "retry_on", "breaker", "outlier", "budget", "limiter",
                 "all", "subsets", "retry_overflows", "retries_total")

    def __init__(self, name: str):
        self.name = name
        self.cluster: Cluster | None = None
        policy = DEFAULT_POLICY
        self.breaker = CircuitBreaker.from_policy(policy.circuit)
        self.outlier = OutlierDetector(policy.outlier)
        self.budget = RetryBudget.from_policy(policy.retries)
        self.limiter: RateLimiter | None = None
        self.retry_overflows = 0   # retries refused by the budget
        self.retries_total = 0     # retries started
        self._apply_policy(policy)
        self.rules: ServiceRules | None = None
        self.fault = None
        self.mirror = None
        self.all: Subset | None = None
        self.subsets: dict[str, Subset] = {}

    def _apply_policy(self, policy: TrafficPolicy) -> None:
        """Take a (new) policy: thresholds are updated in place, so in-flight counts stay right."""
        self.policy = policy
        self.lb = _LB_CODES[policy.lb]
        self.hash_header = policy.hash_header.encode("latin-1") if policy.hash_header else None
        self.timeout = policy.timeout
        self.per_try_timeout = policy.retries.per_try_timeout
        self.retry_on = retry_statuses(policy.retries)
        c, b = policy.circuit, self.breaker
        b.max_connections, b.max_pending, b.max_requests = c.max_connections, c.max_pending, c.max_requests
        o, d = policy.outlier, self.outlier
        d.c5xx_limit = o.consecutive_5xx or 0
        d.cgw_limit = o.consecutive_gateway_errors or 0
        d.interval, d.base, d.max_ejection, d.max_percent = (o.interval, o.base_ejection, o.max_ejection,
                                                             o.max_ejection_percent)
        d.min_health = o.min_health_percent
        r = policy.retries
        self.budget.ratio = r.budget_percent / 100.0
        self.budget.min_concurrency = r.budget_min
        rl = policy.ratelimit
        old = self.limiter
        if rl is None:
            self.limiter = None
        elif old is None or (old.rate, old.burst, old.per_caller) != (rl.rate_per_s, rl.burst, rl.per_caller):
            self.limiter = RateLimiter.from_policy(rl)

    def sync(self, cluster: Cluster) -> None:
        """Follow a new snapshot's cluster of this service (once per snapshot)."""
        svc = cluster.service
        policy = svc.policy if svc is not None else DEFAULT_POLICY
        if policy != self.policy:
            self._apply_policy(policy)
        rules = svc.rules if svc is not None else None
        self.rules = rules
        self.fault = rules.fault if rules is not None else None
        self.mirror = rules.mirror if rules is not None else None
        ring = self.lb == LB_RING_HASH
        self.all = Subset(cluster, self, None, ring)
        by_version: dict[str, list] = {}
        for ep in cluster.endpoints:
            by_version.setdefault(ep.version, []).append(ep)
        self.subsets = {v: Subset(make_cluster(cluster.name, cluster.protocol, tuple(eps), mesh=cluster.mesh,
                                               service=svc), self, v, ring)
                        for v, eps in by_version.items()}
        self.outlier.set_endpoints(cluster.keys)
        self.cluster = cluster

    def state(self, now: float) -> dict[str, Any]:
        """JSON-ready state for an admin page."""
        b = self.breaker
        return {"lb": self.policy.lb, "versions": sorted(self.subsets),
                "breaker": {"requests": b.requests, "pending": b.pending, "connections": b.connections,
                            "overflows": b.overflows_total},
                "retry_budget": {"active_requests": self.budget.active_requests,
                                 "active_retries": self.budget.active_retries,
                                 "overflows": self.retry_overflows, "retries": self.retries_total},
                "outlier": {f"{k[0]}:{k[1]}" if isinstance(k, tuple) else k: v
                            for k, v in self.outlier.state(now).items()},
                "rate_limited": self.limiter.limited_total if self.limiter is not None else 0}


class TrafficRegistry:
    """ServiceTraffic by service name, for one node."""

    __slots__ = ("services",)

    def __init__(self) -> None:
        self.services: dict[str, ServiceTraffic] = {}

    def of(self, cluster: Cluster) -> ServiceTraffic:
        """The state of `cluster`'s service, synced to this cluster (cheap when already synced)."""
        tr = self.services.get(cluster.name)
        if tr is None:
            tr = self.services[cluster.name] = ServiceTraffic(cluster.name)
        if tr.cluster is not cluster:
            tr.sync(cluster)
        return tr

    def apply(self, table: RouteTable) -> None:
        """Sync every service of a new table; forget the services it no longer has."""
        for cluster in table.clusters.values():
            self.of(cluster)
        for name in [n for n in self.services if n not in table.clusters]:
            del self.services[name]


# ---- per-request decisions (the layers of sidecar.proxy call these) ----------------------------

def request_header(ex: Any, name: bytes) -> bytes | None:
    """The value of a request header (lower-case `name`) of an exchange; Host included."""
    if name == b"host":
        return ex.host
    lines = ex.lines
    for i in range(0, len(lines), 4):
        if lines[i].lower() == name:
            return lines[i + 2]
    return None


def choose_subset(ex: Any, tr: ServiceTraffic, rand: float) -> Subset | None:
    """Rules layer: header/path route rules, then the weighted split, pick a version
    (meshcore.routing_rules.choose_version); its subset, `tr.all` without a preference, or None when
    the chosen version has no endpoints now (the caller answers 503 UH, like Istio's empty subset)."""
    rules = tr.rules
    if rules is None:
        return tr.all

    def lookup(name: str) -> str | None:
        value = request_header(ex, name.encode("latin-1"))
        return value.decode("latin-1").strip() if value is not None else None

    version = choose_version(rules, lookup, ex.target.decode("latin-1"), rand)
    if version is None:
        return tr.all
    return tr.subsets.get(version)


def choose_mirror_subset(tr: ServiceTraffic, rand: float) -> Subset | None:
    """Mirror layer: the subset to copy this request to (None: no mirror, or no endpoints)."""
    version = choose_mirror(tr.rules, rand)
    return tr.subsets.get(version) if version is not None else None


def fault_of(tr: ServiceTraffic, rand_abort: float, rand_delay: float) -> tuple[int | None, float]:
    """Fault layer: (abort status or None, delay seconds) for this request."""
    return decide_fault(tr.fault, rand_abort, rand_delay)


def balance_subset(state: Any, sub: Subset, exclude: Any, hash_value: bytes | None) -> int | None:
    """Balance layer: an endpoint index of the subset, by the service's LB choice, skipping endpoints
    ejected by the outlier detector or after a connect failure, unless that would skip all
    (meshcore.lb.merge_exclusions: an ejected endpoint beats none)."""
    cluster = sub.cluster
    keys = cluster.keys
    n = len(keys)
    tr = sub.traffic
    outlier = tr.outlier
    ejected = state.ejected
    if outlier.ejections_total or ejected:  # something was ever ejected: look at the clock
        now = monotonic()
        if outlier.any_ejected(now):
            # Outlier ejections are not undone when every endpoint is ejected (Istio's default
            # minHealthPercent 0%): the caller gets 503 UH at once instead of calling a failing
            # service; `healthy` returns them all only in panic (mesh.outlier.min-health-percent).
            healthy = outlier.healthy(keys, now)
            if not healthy:
                return None
            if len(healthy) < n:
                ok = set(healthy)
                exclude = set(exclude)
                exclude.update(i for i, k in enumerate(keys) if k not in ok)
    if ejected:
        out = [i for i, k in enumerate(keys) if ejected.get(k, 0.0) > now]
        if out:
            exclude = merge_exclusions(exclude, out, n)
    lb = tr.lb
    if lb == LB_LEAST_REQUEST:
        if n == 1:
            return None if exclude else 0
        counts = state.in_flight
        rand = state.random
        return pick_p2c([counts.get(k, 0) for k in keys], rand(), rand(), exclude)
    if lb == LB_ROUND_ROBIN:
        sub.rr += 1
        return pick_round_robin(n, sub.rr, exclude)
    if lb == LB_RING_HASH and hash_value is not None and sub.ring is not None:
        idx = sub.ring.pick(hash_value.decode("latin-1"))
        if idx is not None and (not exclude or idx not in exclude):
            return idx
    return pick_random(n, state.random(), exclude)


