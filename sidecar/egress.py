"""Egress control on the data path: whether a call to a destination outside the mesh (the proxy's
passthrough cluster) may leave, and how a blocked one ends.

The decision is meshcore.egress's; the mode and the node's own service's `mesh.egress` come with each
snapshot (`EgressControl.update`). A blocked HTTP request is answered 502 with response flag `EB`
(counted in istio_requests_total with destination_service `BlackHoleCluster`, Istio's name for
where registry-only sends unknown traffic); a blocked CONNECT is answered 502 `EB`; a blocked
non-HTTP connection is reset. Every block counts in `mesh_sidecar_egress_blocked_total`, which meshd's
metrics hub turns into `egress_blocked` events (`meshctl events`).

What is checked is what the caller asked for: the absolute-form authority or CONNECT target of the
explicit proxy (the proxy dials that name), else the original destination address and, for HTTP,
the Host header's name. Like Istio's sidecar, this is traffic policy for cooperating apps, not a
security boundary: an app that sets a permitted Host on a connection to another address is passed
to that address (docs/EGRESS.md).
"""

from __future__ import annotations

from meshcore.egress import EGRESS_REGISTRY_ONLY, EgressRule, decode_egress_list, egress_allowed
from meshcore.metrics import Counter, Registry
from meshcore.snapshot import MeshConfig, qualified_index

from .routing import Cluster, split_host

FLAG_EGRESS_BLOCKED = "EB"            # not an Envoy flag: Envoy has no registry-only verdict of its own
BLACKHOLE = "BlackHoleCluster"        # Istio's destination of traffic registry-only does not pass
BLACKHOLE_CLUSTER = Cluster(name=BLACKHOLE, protocol="http", endpoints=(), keys=(), mesh=False)
EGRESS_BLOCKED_METRIC = "mesh_sidecar_egress_blocked"
MAX_DESTINATIONS = 100                # distinct destination labels; more are counted as "other"
_BLOCKED_BODY = b"egress to %b is blocked: registry-only mesh, not in this service's mesh.egress\n"
_CONNECT_BLOCKED = (b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nx-mesh-flags: EB\r\n"
                    b"connection: close\r\n\r\n")


class EgressControl:
    """The node's egress mode and allow-list (from the latest snapshot) and its blocked-call counter."""

    __slots__ = ("service", "namespace", "active", "mode", "rules", "counter", "_children")

    def __init__(self, service: str, registry: Registry, namespace: str | None = None):
        self.service = service
        self.namespace = namespace                   # the node's project: which `service` is its own
        self.active = False                          # registry-only: passthrough calls are checked
        self.mode = ""
        self.rules: tuple[EgressRule, ...] | None = None
        self.counter = Counter(EGRESS_BLOCKED_METRIC, "Calls to destinations outside the mesh blocked by "
                               "registry-only egress control.", ("source_workload", "destination", "protocol"),
                               registry=registry)
        self._children: dict[tuple[str, str], object] = {}

    def update(self, config: MeshConfig) -> None:
        """Take the mode and this node's service's mesh.egress from a new snapshot's config."""
        own = qualified_index(config.services).get((self.service, self.namespace)) if self.namespace else None
        svc = config.services.get(own or self.service)
        entries = svc.egress if svc is not None else None
        self.mode = config.egress_mode
        self.rules = decode_egress_list(",".join(entries)) if entries else None
        self.active = self.mode == EGRESS_REGISTRY_ONLY

    def allows(self, hosts: tuple[str, ...], port: int) -> bool:
        """Whether any of `hosts` (names or addresses the caller asked for) may be called on `port`."""
        return any(egress_allowed(self.mode, self.rules, host, port) for host in hosts if host)

    def count_blocked(self, destination: str, protocol: str) -> None:
        """One blocked call to `destination` (host:port) over `protocol` (http, connect, tcp)."""
        key = (destination, protocol)
        if key not in self._children and len(self._children) >= MAX_DESTINATIONS:
            key = ("other", protocol)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.counter.labels(self.service, key[0], protocol)
        child.inc()


def http_egress_blocked(down, ex, cluster: Cluster) -> bool:
    """Outbound request to the passthrough `cluster`: False when it may leave; else it is answered
    502 `EB` (ex.cluster becomes the BlackHoleCluster) and True."""
    control: EgressControl | None = down.state.egress
    if control is None or not control.active:
        return False
    address, port = cluster.keys[0]
    if ex.dest is not None:          # explicit proxy: the proxy dials the authority's name itself
        hosts: tuple[str, ...] = (address,)
    else:
        name = split_host(ex.host.decode("latin-1"))[0] if ex.host else ""
        hosts = (address, name)
    if control.allows(hosts, port):
        return False
    shown = host_port(hosts[-1] or address, port)
    control.count_blocked(shown, "http")
    ex.cluster = BLACKHOLE_CLUSTER
    down.raw = None                  # a sniffed connection's first request: answered, parsing goes on
    down._reply(ex, 502, FLAG_EGRESS_BLOCKED, _BLOCKED_BODY % shown.encode("latin-1", "replace"))
    return True


def host_port(host: str, port: int) -> str:
    """`host:port`, an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def tunnel_egress_blocked(down, cluster: Cluster, connect: bool) -> bool:
    """A byte tunnel to the passthrough `cluster` (a transparent non-HTTP connection, or `connect`
    an explicit CONNECT): False when it may leave; else the client gets 502 `EB` (CONNECT) or a reset."""
    control: EgressControl | None = down.state.egress
    if control is None or not control.active:
        return False
    address, port = cluster.keys[0]
    if control.allows((address,), port):
        return False
    control.count_blocked(host_port(address, port), "connect" if connect else "tcp")
    down.closing = True
    if connect:
        down.transport.write(_CONNECT_BLOCKED)
        down.transport.close()
    else:
        down.transport.abort()       # as for an unreachable destination: the client sees a reset
    return True
