"""The request path's contracts: `Layer` (one concern: NEXT or HELD, then on_end), `Balance` (the last), `_Lane`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Collection

from meshcore.lb import connect_tries

from ..wire import FLAG_NO_ROUTE, HELD, NEXT, log

if TYPE_CHECKING:
    from ...routing import Cluster
    from ...traffic import ServiceTraffic
    from ..downstream import _Downstream
    from ..exchange import Exchange
    from ..state import ProxyState

# ---- the layer chain ----------------------------------------------------------------------------
# A listener's request path is a tuple of Layer objects, run in order by _Dispatcher._proceed: each one's
# on_request says NEXT (the next layer runs) or HELD (it answered the request, or it holds it until a
# timer of its own resumes the chain at the layer after it). The last layer balances and
# connects. At the end of an exchange the layers that keep per-request state (`ends`) get on_end.
# Each concern is a module of this package; compiled (its .pxd, which cimports this one), every layer
# is an extension type subclassing Layer, and the chain's calls are C calls.


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

    def failed(self, down: _Downstream, ex: Exchange) -> int:
        """What a hook does when its decision raised: log it with the traceback, answer 500 `NR`, HELD.
        Only that request fails; the connection serves its next one."""
        log.exception("%s layer failed", self.name)
        down._reply(ex, 500, FLAG_NO_ROUTE, b"route error\n")
        return HELD

    def __repr__(self) -> str:
        return self.name


class Balance(Layer):
    """balance + connect, the chain's last layer: an endpoint (`pick`), tried up to `max_tries`
    connects on other endpoints (meshcore.lb.connect_tries), over a pooled or new connection.

    Here beside Layer, not in balance.py with the picks: the stack (stack.pxd) and the dispatcher call
    `pick` through this declaration, and compiled, a .pxd the stack's cimports reach must not subclass
    Layer (base.pxd cimports the responder's, which cimports the stack's: Layer is then half-declared)."""

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
        """The endpoint index for the next try, or None (balance.py's layers)."""
        raise NotImplementedError
