"""The sidecar's routing table: which cluster (set of endpoints) a request or connection goes to.

Pure and not async. A `RouteTable` is immutable and built whole from a snapshot; the proxy keeps one
reference (`ProxyState.table`) and swaps it atomically when a new snapshot arrives, so a request
always sees one consistent table.

Words are Envoy's: a *cluster* is what a request is balanced over (a mesh service's endpoints, the
local app, or the original destination of a connection the mesh does not know: `PassthroughCluster`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from meshcore.snapshot import (
    Endpoint, GatewayRoute, MeshConfig, ServiceConfig, Snapshot, match_gateway_route, qualified_index,
    rewrite_path, search_names,
)

PASSTHROUGH = "PassthroughCluster"
UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True, eq=False)
class Cluster:
    """Endpoints a request can be balanced over, with what the data path needs precomputed."""

    name: str                          # the service name, PASSTHROUGH, or the local service name
    protocol: str                      # "http" or "tcp"
    endpoints: tuple[Endpoint, ...]
    keys: tuple[tuple[str, int], ...]  # (address, port) of each endpoint: pool and load keys
    mesh: bool                         # a mesh hop (peer sidecar's inbound): mesh headers and TLS
    service: ServiceConfig | None = None


def make_cluster(name: str, protocol: str, endpoints: tuple[Endpoint, ...], *, mesh: bool,
                 service: ServiceConfig | None = None) -> Cluster:
    """A cluster with its endpoint keys filled in."""
    return Cluster(name=name, protocol=protocol, endpoints=endpoints,
                   keys=tuple((e.address, e.port) for e in endpoints), mesh=mesh, service=service)


def passthrough_cluster(address: str, port: int) -> Cluster:
    """The original destination of a connection or request the mesh does not know, as a cluster."""
    ep = Endpoint(instance=PASSTHROUGH, address=address, port=port, version=UNKNOWN, identity="")
    return Cluster(name=PASSTHROUGH, protocol="http", endpoints=(ep,), keys=((address, port),), mesh=False)


def local_cluster(service: str, version: str, app_port: int, protocol: str = "http",
                  address: str = "127.0.0.1") -> Cluster:
    """The sidecar's own app (inbound's upstream)."""
    ep = Endpoint(instance="local", address=address, port=app_port, version=version, identity="")
    return Cluster(name=service, protocol=protocol, endpoints=(ep,), keys=((address, app_port),), mesh=False)


@dataclass(frozen=True, eq=False)
class RouteTable:
    """Everything routing needs from one snapshot, indexed for one dict lookup per request."""

    version: int
    clusters: Mapping[str, Cluster] = field(default_factory=dict)          # service name -> cluster
    hosts: Mapping[str, Cluster] = field(default_factory=dict)             # host name (lower) -> cluster
    addresses: Mapping[tuple[str, int], Cluster] = field(default_factory=dict)  # (ip, service port)
    gateway_routes: tuple[GatewayRoute, ...] = ()
    vips: Mapping[str, str] = field(default_factory=dict)   # service name -> virtual IP (sidecar.dns)
    own: str | None = None      # the snapshot key of the node's own service (None: not in the snapshot)

    def service(self, name: str) -> ServiceConfig | None:
        c = self.clusters.get(name)
        return c.service if c is not None else None

    def endpoints(self, name: str) -> tuple[Endpoint, ...]:
        c = self.clusters.get(name)
        return c.endpoints if c is not None else ()


EMPTY_TABLE = RouteTable(version=0, clusters=MappingProxyType({}), hosts=MappingProxyType({}),
                         addresses=MappingProxyType({}))


def build_route_table(snapshot: Snapshot, vips: Mapping[str, str] | None = None,
                      home: tuple[str, str] | None = None) -> RouteTable:
    """Index a snapshot: clusters by service, host names (name, aliases, `name.namespace`, each also
    with `:port`), and endpoint addresses (with the service's port) for transparent capture.

    `home` is the node's (service, project): a bare name resolves first in that project (a search
    domain, `meshcore.snapshot.search_names`), and `own` is the key of that service.
    `vips` (service name -> virtual IP, handed out by the sidecar's DNS proxy) are indexed too: as a
    host (any port) and as an address with the service's port, so a connection to a VIP routes to its
    service even without a Host header."""
    cfg: MeshConfig = snapshot.config
    clusters: dict[str, Cluster] = {}
    hosts: dict[str, Cluster] = {}
    addresses: dict[tuple[str, int], Cluster] = {}
    for name, svc in cfg.services.items():
        cluster = make_cluster(name, svc.protocol, tuple(cfg.endpoints.get(name, ())), mesh=True, service=svc)
        clusters[name] = cluster
    for host, name in search_names(cfg.services, home[1] if home else None).items():
        cluster = clusters[name]
        hosts[host] = cluster
        hosts[f"{host}:{cluster.service.port}"] = cluster  # the common form of a Host header, exact
    for name, cluster in clusters.items():
        svc = cluster.service
        for ep in cluster.endpoints:
            addresses[(ep.address, svc.port)] = cluster
    table_vips = {}
    for name, vip in (vips or {}).items():
        cluster = clusters.get(name)
        if cluster is not None:
            table_vips[name] = vip
            hosts[vip] = cluster
            addresses[(vip, cluster.service.port)] = cluster
    own = qualified_index(cfg.services).get(home) if home else None
    return RouteTable(version=snapshot.version, clusters=MappingProxyType(clusters),
                      hosts=MappingProxyType(hosts), addresses=MappingProxyType(addresses),
                      gateway_routes=tuple(cfg.gateway_routes), vips=MappingProxyType(table_vips), own=own)


def split_host(host: str, default_port: int | None = None) -> tuple[str, int | None]:
    """`Host` header or authority -> (lowercase name without trailing dot, port or default).

    Handles `name`, `name:port`, `[v6]` and `[v6]:port`; a bad port counts as none.
    """
    host = host.strip()
    port: int | None = default_port
    if host.startswith("["):
        end = host.find("]")
        name = host[1:end] if end > 0 else host[1:]
        rest = host[end + 1:] if end > 0 else ""
        if rest.startswith(":") and rest[1:].isdigit():
            port = int(rest[1:])
    else:
        name, sep, rest = host.rpartition(":")
        if not sep:
            name = rest
        elif rest.isdigit() and ":" not in name:
            port = int(rest)
        else:
            name = host  # a bare IPv6 address or a bad port: keep it whole
    return name.rstrip(".").lower(), port


def find_by_host(table: RouteTable, host: str) -> Cluster | None:
    """The cluster a `Host` header (service name, alias or `name.namespace`; any port) means."""
    hit = table.hosts.get(host)
    if hit is not None:
        return hit
    name, _ = split_host(host)
    return table.hosts.get(name)


def find_by_address(table: RouteTable, address: str, port: int) -> Cluster | None:
    """The cluster whose endpoint is `address` and whose service port is `port` (transparent capture)."""
    return table.addresses.get((address, port))


def route_outbound(table: RouteTable, host: str | None, dest: tuple[str, int] | None) -> Cluster | None:
    """The destination of an outbound request: by Host header, else by the original destination
    address; an unknown destination is the passthrough cluster of `dest`; None when there is none."""
    if host:
        hit = find_by_host(table, host)
        if hit is not None:
            return hit
    if dest is not None:
        hit = table.addresses.get(dest)
        if hit is not None:
            return hit
        name, _ = split_host(dest[0])
        hit = table.hosts.get(name)
        if hit is not None:
            return hit
        return passthrough_cluster(dest[0], dest[1])
    return None


def route_gateway(table: RouteTable, host: str, path: str) -> tuple[Cluster, GatewayRoute, str] | None:
    """The gateway's route for an external request: (cluster, route, upstream path) or None.

    HTTP services (HTTP/1.1, HTTP/2, gRPC) are reachable through the gateway; tcp ones are not.
    """
    route = match_gateway_route(table.gateway_routes, host, path)
    if route is None:
        return None
    cluster = table.clusters.get(route.service)
    if cluster is None or cluster.protocol == "tcp":
        return None
    return cluster, route, rewrite_path(route, path)
