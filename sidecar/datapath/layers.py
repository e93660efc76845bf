"""The layers of the request path (`Layer` and one class per concern), run in order by the downstream
(dispatch.py), and the decisions they call: route by host, rate limit, authorize, balance."""

from __future__ import annotations

import math
from time import monotonic
from typing import TYPE_CHECKING, Any, Callable, Collection

from meshcore.grpc import cap_grpc_timeout
from meshcore.lb import DEFAULT_MAX_TRIES, connect_tries, merge_exclusions, pick_p2c

from ..routing import Cluster, RouteTable, route_outbound
from ..traffic import LB_LEAST_REQUEST, LB_RING_HASH, ServiceTraffic, balance_subset, request_header
from .hoptrace import begin_trace
from .wire import (
    FLAG_FAULT_ABORT, FLAG_FAULT_DELAY, FLAG_NO_HEALTHY_UPSTREAM, FLAG_NO_ROUTE, FLAG_OVERFLOW, FLAG_RATE_LIMITED,
    FLAG_RBAC, HELD, NEXT, Reply, _join_flags, caller_of, log,
)

if TYPE_CHECKING:
    from .downstream import _Downstream
    from .exchange import Exchange
    from .state import ProxyState

# ---- the layer chain ----------------------------------------------------------------------------
# A listener's request path is a tuple of Layer objects, run in order by _Dispatcher._proceed: each one's
# on_request says NEXT (the next layer runs) or HELD (it answered the request, or it holds it until a
# timer of its own resumes the chain at the layer after it). The last layer balances and
# connects. At the end of an exchange the layers that keep per-request state (`ends`) get on_end.
# Compiled (layers.pxd), the layers are extension types and the chain's calls are C calls.


class _Lane:
    """What the traffic layers read per request of a destination's sidecar.traffic.ServiceTraffic,
    copied into one object (compiled: C fields, no attribute lookups on the ServiceTraffic) while
    that ServiceTraffic follows `cluster`: every change to these fields comes with a new cluster
    (ServiceTraffic.sync). The breaker, budget and outlier detector are the ServiceTraffic's own."""

    __slots__ = ("tr", "cluster", "rules", "all", "timeout", "fault", "mirror", "retry_on", "per_try_timeout",
                 "breaker", "budget", "outlier")

    def __init__(self, tr: ServiceTraffic):
        self.tr = tr
        self.cluster = tr.cluster
        self.rules = tr.rules
        self.all = tr.all
        self.timeout = tr.timeout
        self.fault = tr.fault
        self.mirror = tr.mirror
        self.retry_on = tr.retry_on
        self.per_try_timeout = tr.per_try_timeout
        self.breaker = tr.breaker
        self.budget = tr.budget
        self.outlier = tr.outlier


RouteFn = Callable[["_Downstream", "Exchange"], "Cluster | Reply"]


class Layer:
    """One concern of the request path: on_request in chain order, on_end once per exchange when `ends`."""

    __slots__ = ("name", "ends")

    def __init__(self, name: str, ends: bool = False):
        self.name = name
        self.ends = ends

    def on_request(self, down: _Downstream, ex: Exchange) -> int:
        """NEXT to go on, HELD once this layer answered or holds the request."""
        return NEXT

    def on_end(self, down: _Downstream, ex: Exchange) -> None:
        """The exchange is over: release what on_request took."""

    def __repr__(self) -> str:
        return self.name


class StartTrace(Layer):
    """trace context: this hop's trace (begin_trace) and the headers that carry it to the next hop."""

    def __init__(self):
        Layer.__init__(self, "trace context")

    def on_request(self, down: _Downstream, ex: Exchange) -> int:
        ex.trace, ex.trace_headers = begin_trace(down.state.tracing, ex.tp, ex.b3)
        trace = ex.trace
        # No context made (begin_trace): a child exactly when the request had a traceparent.
        if ex.ts is not None and (ex.tp is not None if trace is None else trace.is_child):
            # tracestate belongs to the caller's trace: dropped when a new one starts (W3C 3.3.1).
            ex.trace_headers += b"tracestate: %b\r\n" % ex.ts
        return NEXT


class RateLimit(Layer):
    """rate limit (inbound): the local service's token bucket (limit_inbound), 429 RL."""

    def __init__(self):
        Layer.__init__(self, "rate limit")

    def on_request(self, down: _Downstream, ex: Exchange) -> int:
        limited = limit_inbound(down, ex)
        if limited is None:
            return NEXT
        down._answer(ex, limited)
        return HELD


class Authorize(Layer):
    """authorize (inbound): `state.authz` on the verified caller, 403 RBAC; the app gets the XFCC header."""

    def __init__(self):
        Layer.__init__(self, "authorize")

    def on_request(self, down: _Downstream, ex: Exchange) -> int:
        try:
            denied = authorized(down, ex)
        except Exception:  # noqa: BLE001
            log.exception("authorize layer failed")
            down._reply(ex, 500, FLAG_NO_ROUTE, b"route error\n")
            return HELD
        if denied is None:
            return NEXT
        down._answer(ex, denied)
        return HELD


class Route(Layer):
    """route: the request's cluster from `fn(down, ex) -> Cluster | Reply` (a Reply is answered)."""

    __slots__ = ("fn",)

    def __init__(self, fn: RouteFn, name: str = "route"):
        Layer.__init__(self, name)
        self.fn = fn

    def on_request(self, down: _Downstream, ex: Exchange) -> int:
        try:
            target = self.fn(down, ex)
        except Exception:  # noqa: BLE001
            log.exception("route layer failed")
            down._reply(ex, 500, FLAG_NO_ROUTE, b"route error\n")
            return HELD
        return down._routed(ex, target)


class RouteByHost(Route):
    """route (outbound): route_by_host, called directly (a C call compiled)."""

    def __init__(self):
        Route.__init__(self, route_by_host, "route by host")

    def on_request(self, down: _Downstream, ex: Exchange) -> int:
        try:
            target = route_by_host(down, ex)
        except Exception:  # noqa: BLE001
            log.exception("route layer failed")
            down._reply(ex, 500, FLAG_NO_ROUTE, b"route error\n")
            return HELD
        return down._routed(ex, target)


class RouteTo(Route):
    """route (inbound): always `cluster`, the local app."""

    __slots__ = ("cluster",)

    def __init__(self, cluster: Cluster):
        Route.__init__(self, None, "route to the local app")
        self.cluster = cluster

    def on_request(self, down: _Downstream, ex: Exchange) -> int:
        return down._routed(ex, self.cluster)


class Traffic(Layer):
    """traffic state: a mesh destination's sidecar.traffic state (its _Lane), read by the layers after it."""

    def __init__(self):
        Layer.__init__(self, "traffic state")

    def on_request(self, down: _Downstream, ex: Exchange) -> int:
        cluster = ex.cluster
        if not cluster.mesh:
            return NEXT
        state = down.state
        lanes = state.lanes
        lane = lanes.get(cluster.name)
        if lane is None or lane.cluster is not cluster or lane.tr.cluster is not cluster:
            # first request after a snapshot swap: sync (state.traffic.of), then copy
            lane = lanes[cluster.name] = _Lane(state.traffic.of(cluster))
        ex.traffic = lane.tr
        ex.lane = lane
        sub = lane.all
        ex.subset = sub
        ex.cluster = sub.cluster
        return NEXT


class Rules(Layer):
    """rules and split: a version's endpoints (`choose(ex, traffic, rand)`); none: 503 UH."""

    __slots__ = ("choose",)

    def __init__(self, choose: Callable):
        Layer.__init__(self, "rules + split")
        self.choose = choose

    def on_request(self, down: _Downstream, ex: Exchange) -> int:
        lane = ex.lane
        if lane is None or lane.rules is None:
            return NEXT
        sub = self.choose(ex, lane.tr, down.state.random())
        if sub is None:
            down._reply(ex, 503, FLAG_NO_HEALTHY_UPSTREAM, b"no healthy upstream for the version\n")
            return HELD
        ex.subset = sub
        ex.cluster = sub.cluster
        return NEXT


class Timeout(Layer):
    """timeout: the whole request's (a fault delay, backoffs and every try), 504 UT."""

    def __init__(self):
        Layer.__init__(self, "timeout", True)

    def on_request(self, down: _Downstream, ex: Exchange) -> int:
        lane = ex.lane
        timeout = lane.timeout if lane is not None else None
        if ex.grpc_timeout is not None:
            # gRPC's own deadline is honoured, the mesh's timeout its cap; the next hop is told the
            # smaller one (gRPC over HTTP/2: grpc-timeout).
            timeout, sent_on = cap_grpc_timeout(timeout, ex.grpc_timeout)
            ex.grpc_timeout = sent_on.encode("latin-1") if sent_on is not None else None
        if timeout is not None:
            ex.timer = down.loop.call_later(timeout, down._timed_out, ex)
        return NEXT

    def on_end(self, down: _Downstream, ex: Exchange) -> None:
        if ex.timer is not None:
            ex.timer.cancel()
            ex.timer = None


class Fault(Layer):
    """fault: delay (DI) first, then abort (FI), Envoy's order (`fault(traffic, rand, rand)`)."""

    __slots__ = ("fault",)

    def __init__(self, fault: Callable):
        Layer.__init__(self, "fault", True)
        self.fault = fault

    def on_request(self, down: _Downstream, ex: Exchange) -> int:
        lane = ex.lane
        if lane is None or lane.fault is None:
            return NEXT
        rand = down.state.random
        abort, delay = self.fault(lane.tr, rand(), rand())
        if delay > 0:
            ex.flags = _join_flags(ex.flags, FLAG_FAULT_DELAY)
            ex.fault_abort = abort or 0
            ex.wait = down.loop.call_later(delay, down._fault_delayed, ex)
            return HELD
        if abort is not None:
            down._reply(ex, abort, FLAG_FAULT_ABORT, b"fault filter abort\n")
            return HELD
        return NEXT

    def on_end(self, down: _Downstream, ex: Exchange) -> None:
        if ex.wait is not None:
            ex.wait.cancel()
            ex.wait = None


class Breaker(Layer):
    """circuit breaker: a request slot of the service's breaker, overflow 503 UO (also guards connects)."""

    def __init__(self):
        Layer.__init__(self, "circuit breaker", True)

    def on_request(self, down: _Downstream, ex: Exchange) -> int:
        lane = ex.lane
        if lane is None:
            return NEXT
        if not lane.breaker.try_acquire_request():
            down._reply(ex, 503, FLAG_OVERFLOW, b"upstream overflow\n")
            return HELD
        ex.admitted = True
        return NEXT

    def on_end(self, down: _Downstream, ex: Exchange) -> None:
        if ex.admitted:
            ex.admitted = False
            ex.lane.breaker.release_request()


class Retries(Layer):
    """retries: the budget counts the request; the body is held (HOLD_LIMIT) for a retry by the
    response head's decision (_Dispatcher._response_head: backoff, budget, per-try timeout, URX)."""

    def __init__(self):
        Layer.__init__(self, "retries + budget", True)

    def on_request(self, down: _Downstream, ex: Exchange) -> int:
        lane = ex.lane
        if lane is None:
            return NEXT
        lane.budget.start_request()
        ex.budgeted = True
        if lane.retry_on is not None:
            ex.retry_on = lane.retry_on
            ex.keep_held = True
        return NEXT

    def on_end(self, down: _Downstream, ex: Exchange) -> None:
        if ex.budgeted:
            ex.budgeted = False
            ex.lane.budget.finish_request()
        if ex.in_retry:
            ex.in_retry = False
            ex.lane.budget.finish_retry()
        if ex.try_timer is not None:
            ex.try_timer.cancel()
            ex.try_timer = None
        if ex.wait is not None:
            ex.wait.cancel()
            ex.wait = None


class Mirror(Layer):
    """mirror: a fire-and-forget copy to `choose(traffic, rand)`'s subset, sent once the request is whole."""

    __slots__ = ("choose",)

    def __init__(self, choose: Callable):
        Layer.__init__(self, "mirror")
        self.choose = choose

    def on_request(self, down: _Downstream, ex: Exchange) -> int:
        lane = ex.lane
        if lane is None or lane.mirror is None or ex.upgrade is not None:
            return NEXT   # an upgrade (a WebSocket) is a conversation, not a request to copy
        mirror = self.choose(ex.traffic, down.state.random())
        if mirror is not None:
            ex.mirror = mirror
            ex.keep_held = True
            if ex.req_done:
                down._send_mirror(ex)
        return NEXT


class Balance(Layer):
    """balance + connect, the chain's last layer: an endpoint (`pick`), tried up to `max_tries`
    connects on other endpoints (meshcore.lb.connect_tries), over a pooled or new connection."""

    __slots__ = ("max_tries", "outlier")

    def __init__(self, name: str, max_tries: int, outlier: bool):
        Layer.__init__(self, name)
        self.max_tries = max_tries
        self.outlier = outlier   # every try's outcome goes to the service's OutlierDetector

    def on_request(self, down: _Downstream, ex: Exchange) -> int:
        ex.tries_left = connect_tries(len(ex.cluster.endpoints), self.max_tries)
        down._pick(ex)
        return HELD

    def pick(self, state: ProxyState, cluster: Cluster, exclude: Collection[int], ex: Any = None) -> int | None:
        """The endpoint index for the next try, or None."""
        return balance_least_request(state, cluster, exclude, ex)


class LeastRequest(Balance):
    """balance: least-request P2C (balance_least_request)."""

    def __init__(self, max_tries: int = 1):
        Balance.__init__(self, "balance (least request) + connect", max_tries, False)


class TrafficBalance(Balance):
    """balance: the service's LB choice over the version subset (balance_traffic), outcomes to outlier detection."""

    def __init__(self, max_tries: int = DEFAULT_MAX_TRIES):
        Balance.__init__(self, "balance (mesh.lb, outliers) + connect", max_tries, True)

    def pick(self, state: ProxyState, cluster: Cluster, exclude: Collection[int], ex: Any = None) -> int | None:
        return balance_traffic(state, cluster, exclude, ex)



def route_by_host(down: _Downstream, ex: Exchange) -> Cluster | Reply:
    """Outbound route: by Host header, else the original destination; unknown -> passthrough."""
    state = down.state
    table = state.table
    host = ex.host
    if host:
        if state.host_index_of is not table:   # the first request after a table swap
            state.host_index = host_index(table)
            state.host_index_of = table
        hit = state.host_index.get(host)   # route_outbound's first case, a service's exact name, inlined
        if hit is not None:
            return hit
    cluster = route_outbound(table, host.decode("latin-1") if host is not None else None, ex.dest or down.orig_dst)
    return cluster if cluster is not None else _NO_ROUTE


def host_index(table: RouteTable) -> dict:
    """`table.hosts` keyed by the bytes of a Host header naming them (latin-1, as route_by_host
    decodes one): the header is looked up as it came. A name with no such bytes is left out."""
    out = {}
    for name, cluster in table.hosts.items():
        try:
            out[name.encode("latin-1")] = cluster
        except UnicodeEncodeError:
            continue   # no Host header decodes to it
    return out


_NO_ROUTE = Reply(404, FLAG_NO_ROUTE, b"no route to the destination\n")


def limit_inbound(down: _Downstream, ex: Exchange) -> Reply | None:
    """Inbound rate limit (`mesh.ratelimit` of the local service): 429, `retry-after`, flag RL."""
    limiter = down.state.inbound_limiter
    if limiter is None:
        return None
    ok, after = limiter.check(caller_of(down, ex) if limiter.per_caller else "", monotonic())
    if ok:
        return None
    seconds = max(1, math.ceil(after)) if after != math.inf else 3600
    return Reply(429, FLAG_RATE_LIMITED, b"rate limited\n", headers=b"retry-after: %d\r\n" % seconds)


def balance_least_request(state: ProxyState, cluster: Cluster, exclude: Collection[int],
                          _ex: Any = None) -> int | None:
    """P2C least-request over the endpoints' in-flight counts (meshcore.lb.pick_p2c), skipping
    endpoints ejected after a connect failure while others remain (meshcore.lb.merge_exclusions)."""
    keys = cluster.keys
    if len(keys) == 1:
        return None if exclude else 0
    ejected = state.ejected
    if ejected:
        now = monotonic()
        out = [i for i, k in enumerate(keys) if ejected.get(k, 0.0) > now]
        exclude = merge_exclusions(exclude, out, len(keys))
    counts = state.in_flight
    rand = state.random
    return pick_p2c([counts.get(k, 0) for k in keys], rand(), rand(), exclude)


def balance_traffic(state: ProxyState, cluster: Cluster, exclude: Collection[int],
                    ex: Exchange | None = None) -> int | None:
    """The service's LB choice (`mesh.lb`: least-request P2C, round-robin, random, ring-hash on
    `mesh.lb.hash-header`) over the exchange's version subset, skipping ejected endpoints
    (sidecar.traffic.balance_subset); least-request for anything without traffic state."""
    sub = ex.subset if ex is not None else None
    if sub is None:
        return balance_least_request(state, cluster, exclude)
    tr = sub.traffic
    lb = tr.lb
    if lb == LB_LEAST_REQUEST and not state.ejected and not tr.outlier.ejections_total:
        # Nothing was ever ejected (the usual case): balance_subset's pick is then balance_least_request's
        # over the subset, a C call instead of one into interpreted code.
        return balance_least_request(state, sub.cluster, exclude)
    hv = request_header(ex, tr.hash_header) if lb == LB_RING_HASH and tr.hash_header else None
    return balance_subset(state, sub, exclude, hv)



def authorized(down: _Downstream, ex: Exchange) -> Reply | None:
    """Inbound authorization: `state.authz` decides on the verified caller; a denial is 403 `RBAC`
    with `x-mesh-denied: <reason>`. An allowed mTLS request gets `x-forwarded-client-cert` for the app."""
    authz = down.state.authz
    if authz is not None:
        decision = authz.check_request(down.peer_identity, ex.method, ex.target)
        if not decision.allowed:
            reason = decision.reason.encode("latin-1", "replace")
            return Reply(403, FLAG_RBAC, b"RBAC: access denied: %b\n" % reason,
                         headers=b"x-mesh-denied: %b\r\n" % reason)
    if down.peer_xfcc:
        ex.extra = (ex.extra or b"") + down.peer_xfcc
    return None

