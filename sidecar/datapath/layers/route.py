"""The route layers (`Route`, `RouteByHost`, `RouteTo`): the request's cluster (outbound: `route_by_host`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from ...routing import Cluster, RouteTable, route_outbound
from ..wire import FLAG_NO_ROUTE, Reply
from .base import Layer

if TYPE_CHECKING:
    from ..downstream import _Downstream
    from ..exchange import Exchange

RouteFn = Callable[["_Downstream", "Exchange"], "Cluster | Reply"]


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
            return self.failed(down, ex)
        return down._routed(ex, target)


class RouteByHost(Route):
    """route (outbound): route_by_host, called directly (a C call compiled)."""

    def __init__(self):
        Route.__init__(self, route_by_host, "route by host")

    def on_request(self, down: _Downstream, ex: Exchange) -> int:
        try:
            target = route_by_host(down, ex)
        except Exception:  # noqa: BLE001
            return self.failed(down, ex)
        return down._routed(ex, target)


class RouteTo(Route):
    """route (inbound): always `cluster`, the local app."""

    __slots__ = ("cluster",)

    def __init__(self, cluster: Cluster):
        Route.__init__(self, None, "route to the local app")
        self.cluster = cluster

    def on_request(self, down: _Downstream, ex: Exchange) -> int:
        return down._routed(ex, self.cluster)


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
