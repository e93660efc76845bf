"""Table tests of meshcore.labels: every label, defaults and the errors that name the label."""

from __future__ import annotations

import pytest

from meshcore.labels import (
    COMPOSE_PROJECT, COMPOSE_SERVICE, KNOWN_LABELS, RESERVED_PORTS, ContainerInfo, GatewayRule,
    LabelDecodeError, LabelError, MeshSpec, decode_bool, decode_container, decode_labels, decode_port,
    is_mesh_enabled, is_mesh_owned, spiffe_id,
)


def info(labels: dict[str, str] | None = None, ports: tuple[int, ...] = (8080,), name: str = "/shop-orders-1",
         service: str | None = "orders", project: str | None = "shop") -> ContainerInfo:
    base = {"mesh.enable": "true"}
    if service is not None:
        base[COMPOSE_SERVICE] = service
    if project is not None:
        base[COMPOSE_PROJECT] = project
    base.update(labels or {})
    return ContainerInfo(id="c" * 64, name=name, labels=base, exposed_ports=ports)


def error_of(ci: ContainerInfo) -> LabelDecodeError:
    with pytest.raises(LabelDecodeError) as excinfo:
        decode_labels(ci)
    return excinfo.value


# ---- defaults ----------------------------------------------------------------------------------

def test_defaults():
    spec = decode_labels(info())
    assert spec == MeshSpec(service="orders", namespace="shop", port=8080, version="v1", protocol="http",
                            capture="transparent", gateway=None)


@pytest.mark.parametrize("labels, service, name, expected", [
    ({}, "orders", "/shop-orders-1", "orders"),                   # compose service name
    ({"mesh.service": "catalog"}, "catalog-v1", "/x", "catalog"),  # the label wins
    ({}, None, "/billing", "billing"),                           # no compose: container name, '/' dropped
    ({"mesh.service": " pay "}, "orders", "/x", "pay"),           # surrounding blanks ignored
])
def test_service_name(labels, service, name, expected):
    assert decode_labels(info(labels, service=service, name=name)).service == expected


@pytest.mark.parametrize("project, expected", [("shop", "shop"), (None, "default"), ("", "default")])
def test_namespace_from_compose_project(project, expected):
    assert decode_labels(info(project=project)).namespace == expected


# ---- every label: good values ------------------------------------------------------------------

@pytest.mark.parametrize("labels, attr, expected", [
    ({"mesh.port": "9000"}, "port", 9000),
    ({"mesh.port": " 9000 "}, "port", 9000),
    ({"mesh.port": "1"}, "port", 1),
    ({"mesh.port": "65535"}, "port", 65535),
    ({"mesh.version": "v2"}, "version", "v2"),
    ({"mesh.version": "2.1.0-rc_1"}, "version", "2.1.0-rc_1"),
    ({"mesh.protocol": "tcp"}, "protocol", "tcp"),
    ({"mesh.protocol": "HTTP"}, "protocol", "http"),
    ({"mesh.protocol": "grpc"}, "protocol", "grpc"),
    ({"mesh.protocol": "GRPC"}, "protocol", "grpc"),
    ({"mesh.protocol": "http2"}, "protocol", "http2"),
    ({"mesh.capture": "explicit"}, "capture", "explicit"),
    ({"mesh.capture": "Transparent"}, "capture", "transparent"),
    ({"mesh.gateway.path": "/api/orders"}, "gateway", GatewayRule("/api/orders", None, False)),
    ({"mesh.gateway.path": "/api/orders/"}, "gateway", GatewayRule("/api/orders", None, False)),
    ({"mesh.gateway.path": "/"}, "gateway", GatewayRule("/", None, False)),
    ({"mesh.gateway.path": "//"}, "gateway", GatewayRule("/", None, False)),
    ({"mesh.gateway.host": "Shop.Example.com"}, "gateway", GatewayRule(None, "shop.example.com", False)),
    ({"mesh.gateway.host": "*.example.com"}, "gateway", GatewayRule(None, "*.example.com", False)),
    ({"mesh.gateway.path": "/api", "mesh.gateway.strip-prefix": "true"}, "gateway", GatewayRule("/api", None, True)),
    ({"mesh.gateway.path": "/api", "mesh.gateway.strip-prefix": "no"}, "gateway", GatewayRule("/api", None, False)),
    ({"mesh.gateway.path": "/api", "mesh.gateway.host": "a.example"}, "gateway",
     GatewayRule("/api", "a.example", False)),
])
def test_label_values(labels, attr, expected):
    assert getattr(decode_labels(info(labels)), attr) == expected


@pytest.mark.parametrize("ports, expected", [((8080,), 8080), ((3000,), 3000)])
def test_single_exposed_port_is_used(ports, expected):
    assert decode_labels(info(ports=ports)).port == expected


def test_port_label_wins_over_exposed_ports():
    assert decode_labels(info({"mesh.port": "9000"}, ports=(80, 443))).port == 9000


# ---- errors name the label ---------------------------------------------------------------------

@pytest.mark.parametrize("labels, ports, label, fragment", [
    ({"mesh.port": "abc"}, (8080,), "mesh.port", "not a port number"),
    ({"mesh.port": ""}, (8080,), "mesh.port", "not a port number"),
    ({"mesh.port": "80.5"}, (8080,), "mesh.port", "not a port number"),
    ({"mesh.port": "8_080"}, (8080,), "mesh.port", "not a port number"),
    ({"mesh.port": "0"}, (8080,), "mesh.port", "outside 1..65535"),
    ({"mesh.port": "-1"}, (8080,), "mesh.port", "outside 1..65535"),
    ({"mesh.port": "70000"}, (8080,), "mesh.port", "outside 1..65535"),
    ({"mesh.port": "15001"}, (8080,), "mesh.port", "reserved"),
    ({"mesh.port": "15006"}, (8080,), "mesh.port", "reserved"),
    ({"mesh.port": "15020"}, (8080,), "mesh.port", "reserved"),
    ({}, (15001,), "mesh.port", "reserved"),                 # the one exposed port is the sidecar's
    ({}, (), "mesh.port", "exposes none"),
    ({}, (80, 443), "mesh.port", "exposes 80, 443"),
    ({"mesh.service": "Orders"}, (8080,), "mesh.service", "not a valid name"),
    ({"mesh.service": "orders_v1"}, (8080,), "mesh.service", "not a valid name"),
    ({"mesh.service": "-orders"}, (8080,), "mesh.service", "not a valid name"),
    ({"mesh.service": "a" * 64}, (8080,), "mesh.service", "not a valid name"),
    ({"mesh.version": "v 2"}, (8080,), "mesh.version", "not a version name"),
    ({"mesh.version": "-v2"}, (8080,), "mesh.version", "not a version name"),
    ({"mesh.version": ""}, (8080,), "mesh.version", "not a version name"),
    ({"mesh.protocol": "udp"}, (8080,), "mesh.protocol", "not one of http, tcp, http2, grpc"),
    ({"mesh.protocol": "h2c"}, (8080,), "mesh.protocol", "not one of"),
    ({"mesh.protocol": ""}, (8080,), "mesh.protocol", "not one of"),
    ({"mesh.capture": "iptables"}, (8080,), "mesh.capture", "not one of transparent, explicit"),
    ({"mesh.foo": "1"}, (8080,), "mesh.foo", "unknown mesh label"),
    ({"mesh.gateway.prefix": "/x"}, (8080,), "mesh.gateway.prefix", "unknown mesh label"),
    ({"mesh.gateway.path": "api"}, (8080,), "mesh.gateway.path", "starting with '/'"),
    ({"mesh.gateway.path": ""}, (8080,), "mesh.gateway.path", "starting with '/'"),
    ({"mesh.gateway.path": "/a b"}, (8080,), "mesh.gateway.path", "starting with '/'"),
    ({"mesh.gateway.host": "bad host"}, (8080,), "mesh.gateway.host", "not a host name"),
    ({"mesh.gateway.host": "*"}, (8080,), "mesh.gateway.host", "not a host name"),
    ({"mesh.gateway.strip-prefix": "true"}, (8080,), "mesh.gateway.strip-prefix", "needs mesh.gateway.path"),
    ({"mesh.gateway.host": "a.example", "mesh.gateway.strip-prefix": "true"}, (8080,),
     "mesh.gateway.strip-prefix", "needs mesh.gateway.path"),
    ({"mesh.gateway.path": "/api", "mesh.gateway.strip-prefix": "maybe"}, (8080,),
     "mesh.gateway.strip-prefix", "not a boolean"),
    ({"mesh.protocol": "tcp", "mesh.gateway.path": "/db"}, (5432,), "mesh.gateway.path", "HTTP/1.1 only"),
    ({"mesh.protocol": "tcp", "mesh.gateway.host": "db.example"}, (5432,), "mesh.gateway.host", "HTTP/1.1 only"),
    ({"mesh.protocol": "grpc", "mesh.gateway.path": "/rpc"}, (50051,), "mesh.gateway.path",
     "mesh.protocol=grpc"),
])
def test_label_errors_name_the_label(labels, ports, label, fragment):
    exc = error_of(info(labels, ports=ports))
    assert exc.label == label
    assert fragment in exc.message
    assert label in str(exc)


@pytest.mark.parametrize("labels", [
    {"mesh.owner": "meshd"}, {"mesh.role": "sidecar"}, {"mesh.sidecar.for": "abc"}, {"mesh.enable": "true"},
])
def test_owned_labels_are_not_unknown(labels):
    assert decode_labels(info(labels)).service == "orders"


def test_every_known_label_is_decoded():
    labels = {"mesh.service": "orders", "mesh.port": "8080", "mesh.version": "v3", "mesh.protocol": "http",
              "mesh.capture": "explicit", "mesh.gateway.path": "/o", "mesh.gateway.host": "o.example",
              "mesh.gateway.strip-prefix": "true", "mesh.mtls": "permissive", "mesh.allow": "gateway, users",
              "mesh.gateway.auth": "jwt", "mesh.gateway.jwt.issuer": "https://idp.example",
              "mesh.gateway.jwt.audience": "shop", "mesh.hold": "false", "mesh.egress": "api.example:443"}
    assert set(labels) | {"mesh.enable"} == set(KNOWN_LABELS)
    assert decode_labels(info(labels)) == MeshSpec(
        service="orders", namespace="shop", port=8080, version="v3", protocol="http", capture="explicit",
        gateway=GatewayRule("/o", "o.example", True, "jwt", "https://idp.example", "shop"),
        mtls="permissive", allow=("gateway", "users"), hold=False, egress=("api.example:443",))


def test_zero_trust_label_defaults():
    spec = decode_labels(info({}))
    assert spec.mtls == "strict" and spec.allow is None and spec.hold is True


@pytest.mark.parametrize("labels, label, fragment", [
    ({"mesh.mtls": "off"}, "mesh.mtls", "not one of strict, permissive"),
    ({"mesh.hold": "later"}, "mesh.hold", "not a boolean"),
    ({"mesh.allow": ""}, "mesh.allow", "comma-separated"),
    ({"mesh.allow": "Orders"}, "mesh.allow", "not a service name"),
    ({"mesh.gateway.path": "/o", "mesh.gateway.auth": "basic"}, "mesh.gateway.auth", "not one of none, jwt"),
    ({"mesh.gateway.auth": "jwt"}, "mesh.gateway.auth", "needs mesh.gateway.path"),
    ({"mesh.gateway.path": "/o", "mesh.gateway.jwt.issuer": "x"}, "mesh.gateway.jwt.issuer", "needs mesh.gateway.auth=jwt"),
    ({"mesh.gateway.path": "/o", "mesh.gateway.auth": "jwt", "mesh.gateway.jwt.audience": "a b"},
     "mesh.gateway.jwt.audience", "not a valid value"),
])
def test_zero_trust_label_errors_name_the_label(labels, label, fragment):
    exc = error_of(info(labels))
    assert exc.label == label and fragment in exc.message


def test_decode_container_returns_label_error_naming_container():
    err = decode_container(info({"mesh.port": "abc"}, name="/shop-orders-1"))
    assert err == LabelError(container="shop-orders-1", label="mesh.port", message="'abc' is not a port number")
    assert str(err) == "shop-orders-1: label mesh.port: 'abc' is not a port number"


# ---- helpers -----------------------------------------------------------------------------------

@pytest.mark.parametrize("labels, expected", [
    ({"mesh.enable": "true"}, True), ({"mesh.enable": "TRUE"}, True), ({"mesh.enable": "1"}, True),
    ({"mesh.enable": "yes"}, True), ({"mesh.enable": "on"}, True), ({"mesh.enable": " true "}, True),
    ({"mesh.enable": "false"}, False), ({"mesh.enable": ""}, False), ({"mesh.enable": "nope"}, False), ({}, False),
])
def test_is_mesh_enabled(labels, expected):
    assert is_mesh_enabled(labels) is expected


@pytest.mark.parametrize("labels, expected", [({"mesh.owner": "meshd"}, True), ({"mesh.role": "x"}, False), ({}, False)])
def test_is_mesh_owned(labels, expected):
    assert is_mesh_owned(labels) is expected


@pytest.mark.parametrize("raw, expected", [("true", True), ("On", True), ("0", False), ("off", False), ("no", False)])
def test_decode_bool(raw, expected):
    assert decode_bool("mesh.x", raw) is expected


@pytest.mark.parametrize("port", sorted(RESERVED_PORTS))
def test_every_reserved_port_refused(port):
    with pytest.raises(LabelDecodeError, match="reserved"):
        decode_port("mesh.port", str(port))


@pytest.mark.parametrize("domain, namespace, service, expected", [
    ("mesh.local", "shop", "orders", "spiffe://mesh.local/ns/shop/sa/orders"),
    ("example.org", "default", "db", "spiffe://example.org/ns/default/sa/db"),
])
def test_spiffe_id(domain, namespace, service, expected):
    assert spiffe_id(domain, namespace, service) == expected
