"""A listener's request path (`Stack`): its chain of layers in the order they run, written by the
builders here (`outbound_chain`, `inbound_chain`; the gateway's in gateway.server), and what the
exchange needs besides. `python -m sidecar.datapath.chain` prints the chains."""

from __future__ import annotations

from typing import Any

from meshcore.lb import DEFAULT_MAX_TRIES

from ..routing import Cluster, local_cluster
from ..telemetry import REPORTER_DESTINATION, REPORTER_SOURCE
from ..traffic import choose_mirror_subset, choose_subset, fault_of
from .h2bridge import H2_PROTOCOLS, serve_h2
from .h2upstream import H2AppConnector, H2PeerConnector
# Each layer from its own module, not the package: compiled, this module can run while the package's
# __init__ is still importing its first layer (the engine's modules initialise each other, engine.py).
from .layers.authorize import Authorize
from .layers.balance import LeastRequest, TrafficBalance
from .layers.base import Balance, Layer
from .layers.breaker import Breaker
from .layers.fault import Fault
from .layers.metrics import Metrics
from .layers.mirror import Mirror
from .layers.ratelimit import RateLimit
from .layers.retries import Retries
from .layers.route import RouteByHost, RouteTo
from .layers.rules import Rules
from .layers.timeout import Timeout
from .layers.trace import StartTrace
from .layers.traffic import Traffic
from .pools import UpstreamPools
from .speedups import name_table
from .state import ProxyState
from .wire import INBOUND_REQUEST_HEADERS, OUTBOUND_REQUEST_HEADERS


class Stack:
    """One listener's request path: its chain of layers (run in order) and what the exchange needs
    besides (header actions, mesh headers, pool, gauge); built once per listener (keyword arguments).

    A plain class, not a dataclass: compiled (stack.pxd), its fields are read-only C struct members,
    read several times per request."""

    __slots__ = ("direction", "reporter", "source_name", "chain", "enders", "request_headers", "header_table",
                 "mesh_headers", "balance", "max_tries", "connect_timeout", "pool", "gauge", "breaker", "outlier",
                 "h2", "connect", "connect_h2")

    def __init__(self, *, direction: str, reporter: str, source_name: str, chain: tuple,
                 request_headers: dict, mesh_headers: bytes, connect_timeout: float, pool: UpstreamPools,
                 gauge: Any, h2: Any = None, connect: Any = None, connect_h2: Any = None):
        self.direction = direction              # "outbound" | "inbound" | "gateway" (connection gauge label)
        self.reporter = reporter                # metrics reporter
        self.source_name = source_name          # x-mesh-source we send, and source_workload we report
        self.chain = tuple(chain)               # the layers, in the order they run
        last = self.chain[-1]
        if not isinstance(last, Balance) or any(isinstance(layer, Balance) for layer in self.chain[:-1]):
            raise ValueError("a chain ends with its one balance layer")
        # each on_end once the exchange ends, innermost first: an outer layer (metrics) sees the inner
        # ones' state released, as a response unwinds a stack of layers
        self.enders = tuple(layer for layer in reversed(self.chain) if layer.ends)
        self.balance = last
        self.max_tries = last.max_tries
        self.outlier = last.outlier
        self.breaker = any(isinstance(layer, Breaker) for layer in self.chain)   # connects take its slots too
        self.request_headers = request_headers  # header actions while parsing (hop-by-hop etc.)
        self.header_table = name_table(request_headers)
        self.mesh_headers = mesh_headers        # headers added on mesh hops
        self.connect_timeout = connect_timeout
        self.pool = pool                        # keep-alive connections
        self.gauge = gauge                      # connections-active gauge child
        self.h2 = h2                            # h2(down, first bytes): serves a connection opened with the
                                                # HTTP/2 preface (h2bridge.serve_h2), or None
        self.connect = connect                  # connect(loop, factory, host, port, ssl, server_hostname,
                                                # verify) to every endpoint (h2upstream.H2AppConnector), None:
                                                # a TCP connection (TLS on mesh hops)
        self.connect_h2 = connect_h2            # the same, for the mesh hops to HTTP/2 services
                                                # (h2upstream.H2PeerConnector), None: HTTP/1.1 to them too


def mesh_source_headers(source: str, version: str) -> bytes:
    return b"x-mesh-source: %s\r\nx-mesh-source-version: %s\r\n" % (source.encode(), version.encode())


def outbound_chain(route: Layer | None = None, after_route: tuple = ()) -> tuple:
    """The outbound layers in the order they run (the gateway passes its route and its JWT check)."""
    return (
        Metrics(),                         # metrics: the request series, span, access log (at the end)
        StartTrace(),                      # trace context: this hop's ids, headers for the next hop
        route or RouteByHost(),            # route: the service (cluster), unknown -> passthrough
        *after_route,
        Traffic(),                         # mesh services: their sidecar.traffic state
        Rules(choose_subset),              # rules + split: a version's endpoints (none: 503 UH)
        Timeout(),                         # whole-request timeout (504 UT), from here on
        Fault(fault_of),                   # fault: delay (DI), abort (FI)
        Breaker(),                         # circuit breaker: overflow -> 503 UO
        Retries(),                         # retries: budget, held body (the decision: response head)
        Mirror(choose_mirror_subset),      # mirror: fire-and-forget copy, once the request is whole
        TrafficBalance(DEFAULT_MAX_TRIES),  # balance (LB choice, ejected skipped) + connect-retry + pool
    )


def inbound_chain(cluster: Cluster) -> tuple:
    """The inbound layers in the order they run: everything goes to the local app."""
    return (
        Metrics(),                         # metrics
        StartTrace(),                      # trace context
        RateLimit(),                       # rate limit: 429 RL
        Authorize(),                       # authorize: 403 RBAC; XFCC for the app
        RouteTo(cluster),                  # route: the local app
        LeastRequest(1),                   # balance + one connect + pool
    )


def build_outbound_stack(state: ProxyState, *, route: Layer | None = None, after_route: tuple = (),
                         source: str | None = None, direction: str = "outbound",
                         request_headers: dict = OUTBOUND_REQUEST_HEADERS) -> Stack:
    """The outbound request path (outbound_chain; the gateway passes its own route layers)."""
    source = source or state.service
    return Stack(
        direction=direction, reporter=REPORTER_SOURCE, source_name=source,
        chain=outbound_chain(route, after_route),
        request_headers=request_headers,                        # drop hop-by-hop and the app's
        mesh_headers=mesh_source_headers(source, state.version),  # x-mesh-source; add ours
        connect_timeout=state.connect_timeout, pool=state.pools, gauge=state.telemetry.connections(direction),
        h2=serve_h2,                                            # HTTP/2 from the app or a gateway client
        connect_h2=H2PeerConnector.for_tls(state.tls, state.connect_timeout),   # HTTP/2 hops
    )


def build_inbound_stack(state: ProxyState, app_port: int, *, protocol: str = "http",
                        app_host: str = "127.0.0.1") -> Stack:
    """The inbound path (inbound_chain): everything goes to the local app over pooled connections
    (HTTP/2 streams over h2c for an app of protocol grpc or http2)."""
    cluster = local_cluster(state.service, state.version, app_port, protocol, app_host)
    return Stack(
        direction="inbound", reporter=REPORTER_DESTINATION, source_name=state.service,
        chain=inbound_chain(cluster), request_headers=INBOUND_REQUEST_HEADERS, mesh_headers=b"",
        connect_timeout=state.connect_timeout, pool=state.pools, gauge=state.telemetry.connections("inbound"),
        connect=H2AppConnector() if protocol in H2_PROTOCOLS else None,
        h2=serve_h2,                                   # HTTP/2 streams from a peer's h2 hop (ALPN h2)
    )


