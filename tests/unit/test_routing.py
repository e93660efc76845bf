"""The sidecar's route table (sidecar.routing): built from hand-made snapshots, no sockets."""

from __future__ import annotations

import dataclasses

import pytest

from meshcore.snapshot import Endpoint, GatewayRoute, MeshConfig, ServiceConfig, Snapshot
from sidecar.routing import (
    EMPTY_TABLE, PASSTHROUGH, build_route_table, find_by_address, find_by_host, local_cluster,
    passthrough_cluster, route_gateway, route_outbound, split_host,
)


def svc(name, port=8080, protocol="http", aliases=(), namespace="shop"):
    return ServiceConfig(name=name, namespace=namespace, protocol=protocol, port=port,
                         identity=f"spiffe://mesh.local/ns/{namespace}/sa/{name}", aliases=tuple(aliases))


def ep(instance, address, version="v1", port=15006):
    return Endpoint(instance=instance, address=address, port=port, version=version,
                    identity="spiffe://mesh.local/ns/shop/sa/x")


def snapshot(version=3):
    services = {
        "payments": svc("payments", 8080, aliases=("pay",)),
        "db": svc("db", 5432, protocol="tcp"),
        "empty": svc("empty", 9000),
    }
    endpoints = {
        "payments": (ep("c1", "172.20.0.5", "v1"), ep("c2", "172.20.0.6", "v2")),
        "db": (ep("c3", "172.20.0.7"),),
    }
    routes = (
        GatewayRoute(service="payments", path="/pay", host=None, strip_prefix=True),
        GatewayRoute(service="db", path="/db", host=None, strip_prefix=False),
        GatewayRoute(service="empty", path=None, host="empty.example", strip_prefix=False),
    )
    return Snapshot(version=version, config=MeshConfig(services=services, endpoints=endpoints,
                                                       gateway_routes=routes))


@pytest.fixture(scope="module")
def table():
    return build_route_table(snapshot())


def test_table_has_version_clusters_and_endpoints(table):
    assert table.version == 3
    assert set(table.clusters) == {"payments", "db", "empty"}
    pay = table.clusters["payments"]
    assert pay.mesh and pay.protocol == "http"
    assert [e.instance for e in pay.endpoints] == ["c1", "c2"]
    assert pay.keys == (("172.20.0.5", 15006), ("172.20.0.6", 15006))
    assert table.endpoints("empty") == ()
    assert table.endpoints("nope") == ()
    assert table.service("db").protocol == "tcp"


@pytest.mark.parametrize("host", [
    "payments", "payments:8080", "PAYMENTS:8080", "payments:1234", "payments.shop", "payments.shop:8080",
    "pay", "pay:80", "Pay.Shop", "payments.",
])
def test_host_lookup_by_name_alias_namespace_any_port_any_case(table, host):
    cluster = find_by_host(table, host)
    assert cluster is not None and cluster.name == "payments"


@pytest.mark.parametrize("host", ["payment", "payments.other", "example.com", "", "172.20.0.5"])
def test_host_lookup_misses(table, host):
    assert find_by_host(table, host) is None


def test_address_lookup_needs_the_service_port(table):
    assert find_by_address(table, "172.20.0.6", 8080).name == "payments"
    assert find_by_address(table, "172.20.0.7", 5432).name == "db"
    assert find_by_address(table, "172.20.0.6", 9999) is None
    assert find_by_address(table, "10.0.0.1", 8080) is None


def test_route_outbound_prefers_host_then_address_then_passthrough(table):
    # Host names the service even when the original destination is something else.
    assert route_outbound(table, "payments:8080", ("10.1.1.1", 80)).name == "payments"
    # Unknown host: the original destination address decides.
    assert route_outbound(table, "10.9.9.9", ("172.20.0.5", 8080)).name == "payments"
    # An absolute-form authority given as a name (explicit proxy) is found too.
    assert route_outbound(table, None, ("pay", 8080)).name == "payments"
    unknown = route_outbound(table, "example.com", ("93.184.216.34", 443))
    assert unknown.name == PASSTHROUGH and not unknown.mesh
    assert unknown.keys == (("93.184.216.34", 443),)
    assert route_outbound(table, "example.com", None) is None


def test_service_names_win_over_another_services_alias():
    services = {"a": svc("a", aliases=("b",)), "b": svc("b")}
    t = build_route_table(Snapshot(version=1, config=MeshConfig(services=services)))
    assert find_by_host(t, "b").name == "b"
    assert find_by_host(t, "a").name == "a"


def test_table_is_immutable_and_swapping_is_a_reference_change(table):
    with pytest.raises(TypeError):
        table.hosts["x"] = None  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        table.version = 9  # type: ignore[misc]
    newer = build_route_table(snapshot(version=4))
    assert newer.version == 4 and table.version == 3


def test_empty_table_routes_everything_to_passthrough():
    assert EMPTY_TABLE.clusters == {}
    assert route_outbound(EMPTY_TABLE, "payments", ("10.0.0.2", 8080)).name == PASSTHROUGH


def test_gateway_route_strips_prefix_and_keeps_query(table):
    cluster, route, path = route_gateway(table, "anything.example", "/pay/charge?id=1")
    assert cluster.name == "payments" and route.strip_prefix
    assert path == "/charge?id=1"
    assert route_gateway(table, "x", "/pay")[2] == "/"
    assert route_gateway(table, "x", "/pay?x=1")[2] == "/?x=1"


def test_gateway_route_by_host_and_misses(table):
    cluster, _, path = route_gateway(table, "empty.example:8080", "/a/b")
    assert cluster.name == "empty" and path == "/a/b"
    assert route_gateway(table, "other.example", "/payments") is None  # /pay is a prefix by segment only
    assert route_gateway(table, "x", "/db/q") is None                   # tcp services are not routable


@pytest.mark.parametrize("raw, expected", [
    ("payments", ("payments", None)), ("Payments:8080", ("payments", 8080)), ("a.b.:80", ("a.b", 80)),
    ("[::1]:8443", ("::1", 8443)), ("[fe80::1]", ("fe80::1", None)), ("::1", ("::1", None)),
    ("host:notaport", ("host:notaport", None)),
])
def test_split_host(raw, expected):
    assert split_host(raw) == expected


def test_split_host_default_port():
    assert split_host("payments", 80) == ("payments", 80)


def test_local_and_passthrough_clusters_are_not_mesh_hops():
    local = local_cluster("payments", "v2", 9000)
    assert not local.mesh and local.keys == (("127.0.0.1", 9000),) and local.endpoints[0].version == "v2"
    pt = passthrough_cluster("10.0.0.9", 443)
    assert not pt.mesh and pt.name == PASSTHROUGH
