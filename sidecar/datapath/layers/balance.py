"""The balance + connect layers (`LeastRequest`, `TrafficBalance`: a `Balance`, the chain's last) and their picks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Collection

from meshcore.lb import DEFAULT_MAX_TRIES, merge_exclusions, pick_p2c

from ...routing import Cluster
from ...traffic import LB_LEAST_REQUEST, LB_RING_HASH, balance_subset, request_header
from ..speedups import monotonic
from .base import Balance

if TYPE_CHECKING:
    from ..exchange import Exchange
    from ..state import ProxyState


class LeastRequest(Balance):
    """balance: least-request P2C (balance_least_request)."""

    def __init__(self, max_tries: int = 1):
        Balance.__init__(self, "balance (least request) + connect", max_tries, False)

    def pick(self, state: ProxyState, cluster: Cluster, exclude: Collection[int], ex: Any = None) -> int | None:
        """The endpoint index for the next try, or None."""
        return balance_least_request(state, cluster, exclude, ex)


class TrafficBalance(Balance):
    """balance: the service's LB choice over the version subset (balance_traffic), outcomes to outlier detection."""

    def __init__(self, max_tries: int = DEFAULT_MAX_TRIES):
        Balance.__init__(self, "balance (mesh.lb, outliers) + connect", max_tries, True)

    def pick(self, state: ProxyState, cluster: Cluster, exclude: Collection[int], ex: Any = None) -> int | None:
        return balance_traffic(state, cluster, exclude, ex)


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
