"""Table tests of meshcore.snapshot: workloads, config building, gateway routing and the wire form."""

from __future__ import annotations

import copy
import json

import pytest

from meshcore.labels import COMPOSE_PROJECT, COMPOSE_SERVICE, ContainerInfo, LabelError
from meshcore.policy import decode_traffic_policy
from meshcore.snapshot import (
    Announcement, Endpoint, GatewayRoute, MeshConfig, ServiceConfig, Snapshot, SnapshotError, build_config,
    build_workloads, decode_snapshot, encode_snapshot, match_gateway_route, rewrite_path,
)

TD = "mesh.local"


def ctr(name: str, labels: dict[str, str] | None = None, *, ports: tuple[int, ...] = (8080,), ip: str | None = None,
        running: bool = True, enable: bool = True, project: str = "shop", health: str = "") -> ContainerInfo:
    """A container `name` of compose service `name`, id `id-<name>`, address `ip` on network `shop_default`."""
    base = {COMPOSE_SERVICE: name, COMPOSE_PROJECT: project}
    if enable:
        base["mesh.enable"] = "true"
    base.update(labels or {})
    return ContainerInfo(id=f"id-{name}", name=f"/{name}", labels=base, exposed_ports=ports,
                         networks={"shop_default": ip} if ip else {}, running=running, health=health)


def ann(name: str, service: str, ip: str, version: str = "v1") -> Announcement:
    return Announcement(instance=f"id-{name}", service=service, version=version, address=ip, port=15006,
                        identity=f"spiffe://{TD}/ns/shop/sa/{service}")


def build(containers, announcements=()):
    return build_config(build_workloads(containers), announcements, TD)


# ---- build_workloads -------------------------------------------------------------------------------

@pytest.mark.parametrize("containers, expected_names", [
    ([ctr("orders"), ctr("db", enable=False)], ["/orders"]),
    ([ctr("orders"), ctr("orders-mesh", {"mesh.owner": "meshd", "mesh.role": "sidecar"})], ["/orders"]),
    ([ctr("meshd-gateway", {"mesh.owner": "meshd"})], []),
    ([ctr("b"), ctr("a"), ctr("c")], ["/a", "/b", "/c"]),          # sorted by name
    ([ctr("x", {"mesh.enable": "false"})], []),
])
def test_build_workloads_selects_meshed_containers(containers, expected_names):
    assert [wl.container.name for wl in build_workloads(containers)] == expected_names


def test_bad_container_degrades_only_itself():
    wls = build_workloads([ctr("orders", {"mesh.port": "abc"}), ctr("catalog")])
    by_name = {wl.container.name: wl for wl in wls}
    assert by_name["/orders"].spec is None
    assert by_name["/orders"].error == LabelError("orders", "mesh.port", "'abc' is not a port number")
    assert by_name["/catalog"].error is None and by_name["/catalog"].spec.service == "catalog"
    config, errors = build_config(wls, [ann("catalog", "catalog", "10.0.0.3")], TD)
    assert list(config.services) == ["catalog"]
    assert errors == [by_name["/orders"].error]


# ---- build_config: announcements ----------------------------------------------------------------

GOOD = ctr("orders", {"mesh.version": "v2"}, ip="10.0.0.2")


@pytest.mark.parametrize("containers, announcement, why", [
    ([GOOD], ann("ghost", "orders", "10.0.0.2"), "unknown container"),
    ([ctr("orders", ip="10.0.0.2", running=False)], ann("orders", "orders", "10.0.0.2"), "stopped container"),
    ([GOOD, ctr("catalog", ip="10.0.0.3")], ann("orders", "catalog", "10.0.0.2"), "wrong service"),
    ([GOOD, ctr("catalog", ip="10.0.0.3")], ann("orders", "orders", "10.0.0.3"), "another container's address"),
    ([GOOD], ann("orders", "orders", "10.0.0.99"), "address not the container's"),
    ([ctr("orders", {"mesh.port": "abc"}, ip="10.0.0.2")], ann("orders", "orders", "10.0.0.2"), "bad labels"),
    ([ctr("db", ip="10.0.0.4", enable=False)], ann("db", "db", "10.0.0.4"), "not meshed"),
    ([ctr("orders", ip="10.0.0.2", health="starting")], ann("orders", "orders", "10.0.0.2"), "health: starting"),
    ([ctr("orders", ip="10.0.0.2", health="unhealthy")], ann("orders", "orders", "10.0.0.2"), "health: unhealthy"),
])
def test_announcements_ignored(containers, announcement, why):
    config, _ = build(containers, [announcement])
    assert config.endpoints == {}, why


def test_announcement_accepted_version_from_labels():
    config, errors = build([GOOD], [ann("orders", "orders", "10.0.0.2", version="v9")])
    assert errors == []
    assert config.endpoints == {"orders": (Endpoint(instance="id-orders", address="10.0.0.2", port=15006,
                                                    version="v2", identity=f"spiffe://{TD}/ns/shop/sa/orders"),)}


def test_healthy_or_unchecked_containers_are_endpoints():
    config, _ = build([ctr("orders", ip="10.0.0.2", health="healthy"), ctr("users", ip="10.0.0.3")],
                      [ann("orders", "orders", "10.0.0.2"), ann("users", "users", "10.0.0.3")])
    assert sorted(config.endpoints) == ["orders", "users"]


def test_endpoints_sorted_and_deduplicated():
    cs = [ctr("orders-a", {"mesh.service": "orders"}, ip="10.0.0.9"),
          ctr("orders-b", {"mesh.service": "orders"}, ip="10.0.0.2")]
    anns = [ann("orders-a", "orders", "10.0.0.9"), ann("orders-b", "orders", "10.0.0.2"),
            ann("orders-a", "orders", "10.0.0.9")]
    config, _ = build(cs, anns)
    assert [e.address for e in config.endpoints["orders"]] == ["10.0.0.2", "10.0.0.9"]


def test_service_config_and_aliases():
    cs = [ctr("catalog-v1", {"mesh.service": "catalog"}, ip="10.0.0.5"),
          ctr("catalog-v2", {"mesh.service": "catalog", "mesh.version": "v2"}, ip="10.0.0.6"),
          ctr("orders", {"mesh.protocol": "tcp"}, ports=(5000,))]
    config, errors = build(cs, [ann("catalog-v1", "catalog", "10.0.0.5"), ann("catalog-v2", "catalog", "10.0.0.6")])
    assert errors == []
    assert config.services == {
        "catalog": ServiceConfig(name="catalog", namespace="shop", protocol="http", port=8080,
                                 identity=f"spiffe://{TD}/ns/shop/sa/catalog", aliases=("catalog-v1", "catalog-v2")),
        "orders": ServiceConfig(name="orders", namespace="shop", protocol="tcp", port=5000,
                                identity=f"spiffe://{TD}/ns/shop/sa/orders", aliases=()),
    }
    assert {e.version for e in config.endpoints["catalog"]} == {"v1", "v2"}


@pytest.mark.parametrize("second_labels, second_ports, label, fragment", [
    ({"mesh.service": "orders"}, (9090,), "mesh.port", "9090 differs from 8080"),
    ({"mesh.service": "orders", "mesh.port": "9090"}, (8080,), "mesh.port", "9090 differs from 8080"),
    ({"mesh.service": "orders", "mesh.protocol": "tcp"}, (8080,), "mesh.protocol", "'tcp' differs from 'http'"),
])
def test_conflicts_within_a_service(second_labels, second_ports, label, fragment):
    cs = [ctr("orders", ip="10.0.0.2"), ctr("orders-v2", second_labels, ports=second_ports, ip="10.0.0.3")]
    config, errors = build(cs, [ann("orders", "orders", "10.0.0.2"), ann("orders-v2", "orders", "10.0.0.3")])
    assert len(errors) == 1
    assert (errors[0].container, errors[0].label) == ("orders-v2", label)
    assert fragment in errors[0].message
    assert config.services["orders"].port == 8080
    # the conflicting instance is kept out of the endpoints
    assert [e.instance for e in config.endpoints["orders"]] == ["id-orders"]


def test_same_service_name_in_another_project_is_its_own_service():
    """Two compose projects with a service `web`: no label error; the oldest project's keeps the bare
    key, the later one's is `web.<project>`, each with its own identity and endpoints
    (tests/unit/test_projects.py has the whole table)."""
    import dataclasses

    first = dataclasses.replace(ctr("web", ip="10.0.0.2", project="zulu"), created="2026-12-05T09:00:00.1Z")
    later = dataclasses.replace(ctr("a-web", {"mesh.service": "web"}, ip="10.0.1.2", project="alpha"),
                                created="2026-12-05T10:00:00.2Z")   # sorts first by name, came later
    config, errors = build([first, later], [ann("web", "web", "10.0.0.2"), ann("a-web", "web", "10.0.1.2")])
    assert errors == []
    assert config.services["web"].identity == f"spiffe://{TD}/ns/zulu/sa/web"
    assert config.services["web.alpha"].identity == f"spiffe://{TD}/ns/alpha/sa/web"
    assert [e.instance for e in config.endpoints["web"]] == ["id-web"]
    assert [e.instance for e in config.endpoints["web.alpha"]] == ["id-a-web"]


@pytest.mark.parametrize("a_labels, b_labels, conflict_label", [
    ({"mesh.gateway.path": "/api"}, {"mesh.gateway.path": "/api/"}, "mesh.gateway.path"),
    ({"mesh.gateway.host": "a.example"}, {"mesh.gateway.host": "A.example"}, "mesh.gateway.host"),
    ({"mesh.gateway.path": "/x", "mesh.gateway.host": "h.example"},
     {"mesh.gateway.path": "/x", "mesh.gateway.host": "h.example"}, "mesh.gateway.path"),
    ({"mesh.gateway.path": "/api"}, {"mesh.gateway.path": "/api", "mesh.gateway.host": "h.example"}, None),
    ({"mesh.gateway.path": "/api"}, {"mesh.gateway.path": "/api2"}, None),
])
def test_gateway_route_conflicts(a_labels, b_labels, conflict_label):
    config, errors = build([ctr("alpha", a_labels), ctr("beta", b_labels)])
    if conflict_label is None:
        assert errors == []
        assert len(config.gateway_routes) == 2
    else:
        assert len(errors) == 1
        assert (errors[0].container, errors[0].label) == ("beta", conflict_label)
        assert "already belongs to alpha" in errors[0].message
        assert [r.service for r in config.gateway_routes] == ["alpha"]


def test_same_route_from_instances_of_one_service_is_fine():
    cs = [ctr("web-v1", {"mesh.service": "web", "mesh.gateway.path": "/"}),
          ctr("web-v2", {"mesh.service": "web", "mesh.gateway.path": "/"})]
    config, errors = build(cs)
    assert errors == []
    assert config.gateway_routes == (GatewayRoute("web", "/", None, False),)


# ---- gateway routing ---------------------------------------------------------------------------

ROUTE_CONTAINERS = [
    ctr("web", {"mesh.gateway.path": "/"}),
    ctr("api", {"mesh.gateway.path": "/api"}),
    ctr("orders", {"mesh.gateway.path": "/api/orders", "mesh.gateway.strip-prefix": "true"}),
    ctr("admin", {"mesh.gateway.host": "admin.example.com"}),
    ctr("tenant", {"mesh.gateway.host": "*.tenants.example", "mesh.gateway.path": "/app"}),
]


@pytest.fixture(scope="module")
def routes():
    config, errors = build(ROUTE_CONTAINERS)
    assert errors == []
    return config.gateway_routes


def test_routes_most_specific_first(routes):
    assert [r.service for r in routes] == ["tenant", "admin", "orders", "api", "web"]


@pytest.mark.parametrize("host, path, expected", [
    ("x.example", "/", "web"),
    ("x.example", "/index.html", "web"),
    ("x.example", "/api", "api"),
    ("x.example", "/api/x", "api"),
    ("x.example", "/api?q=1", "api"),
    ("x.example", "/api/orders", "orders"),
    ("x.example", "/api/orders/42", "orders"),
    ("x.example", "/api/orders?id=1", "orders"),
    ("x.example", "/api/ordersX", "api"),          # prefix boundary
    ("x.example", "/apix", "web"),
    ("admin.example.com", "/api/orders", "admin"),  # a host match beats any path-only route
    ("ADMIN.example.com:8080", "/", "admin"),       # case and port ignored
    ("a.tenants.example", "/app/1", "tenant"),      # wildcard host + path
    ("a.b.tenants.example", "/app", "tenant"),
    ("a.tenants.example", "/other", "web"),
    ("tenants.example", "/app", "web"),             # the wildcard needs a subdomain
    ("eviltenants.example", "/app", "web"),
])
def test_match_gateway_route(routes, host, path, expected):
    route = match_gateway_route(routes, host, path)
    assert route is not None and route.service == expected


@pytest.mark.parametrize("host, path", [("x.example", "/"), ("x.example", "/apix"), ("x.example", "/ap")])
def test_no_catch_all_no_match(routes, host, path):
    assert match_gateway_route([r for r in routes if r.path != "/" and r.host is None], host, path) is None


@pytest.mark.parametrize("route, path, expected", [
    (GatewayRoute("o", "/api/orders", None, True), "/api/orders/42", "/42"),
    (GatewayRoute("o", "/api/orders", None, True), "/api/orders", "/"),
    (GatewayRoute("o", "/api/orders", None, True), "/api/orders?id=1", "/?id=1"),
    (GatewayRoute("o", "/api/orders", None, True), "/api/orders/a/b?c=d", "/a/b?c=d"),
    (GatewayRoute("o", "/api/orders", None, False), "/api/orders/42", "/api/orders/42"),
    (GatewayRoute("o", "/", None, True), "/x", "/x"),
    (GatewayRoute("o", None, "h.example", True), "/x", "/x"),
])
def test_rewrite_path(route, path, expected):
    assert rewrite_path(route, path) == expected


# ---- wire form -----------------------------------------------------------------------------------

def sample_snapshot() -> Snapshot:
    cs = [ctr("catalog-v1", {"mesh.service": "catalog", "mesh.gateway.path": "/api/catalog",
                             "mesh.gateway.strip-prefix": "true"}, ip="10.0.0.5"),
          ctr("catalog-v2", {"mesh.service": "catalog", "mesh.version": "v2"}, ip="10.0.0.6"),
          ctr("web", {"mesh.gateway.host": "shop.example"}, ip="10.0.0.7"),
          ctr("db", {"mesh.protocol": "tcp"}, ports=(5432,), ip="10.0.0.8"),
          ctr("recommendations", {"mesh.protocol": "grpc", "mesh.retries.on": "unavailable,reset"},
              ports=(50051,), ip="10.0.0.9"),
          ctr("feed", {"mesh.protocol": "http2"}, ports=(8443,), ip="10.0.0.10")]
    anns = [ann("catalog-v1", "catalog", "10.0.0.5"), ann("catalog-v2", "catalog", "10.0.0.6"),
            ann("web", "web", "10.0.0.7"), ann("recommendations", "recommendations", "10.0.0.9")]
    config, errors = build(cs, anns)
    assert errors == []
    return Snapshot(version=7, config=config)


def test_grpc_and_http2_services_carry_their_protocol_and_grpc_retry_names():
    services = decode_snapshot(json.loads(json.dumps(encode_snapshot(sample_snapshot())))).config.services
    assert (services["recommendations"].protocol, services["feed"].protocol) == ("grpc", "http2")
    assert services["recommendations"].policy.retries.on == frozenset({"unavailable", "reset"})


def test_round_trip():
    snap = sample_snapshot()
    assert decode_snapshot(encode_snapshot(snap)) == snap
    assert decode_snapshot(json.loads(json.dumps(encode_snapshot(snap)))) == snap


def test_round_trip_empty():
    snap = Snapshot(version=0, config=MeshConfig())
    assert decode_snapshot(encode_snapshot(snap)) == snap


def _set(path, value):
    """A mutation of the wire dict: set (or delete, for value `...`) the item at `path`."""
    def mutate(wire):
        target = wire
        for key in path[:-1]:
            target = target[key]
        if value is ...:
            del target[path[-1]]
        else:
            target[path[-1]] = value
        return wire
    return mutate


@pytest.mark.parametrize("mutate, fragment", [
    (lambda w: [w], "snapshot: expected an object"),
    (_set(["version"], ...), "snapshot.version: missing"),
    (_set(["version"], "7"), "snapshot.version: expected int"),
    (_set(["version"], True), "snapshot.version: expected int"),
    (_set(["schema"], ...), "snapshot.schema: missing"),
    (_set(["schema"], 1), "snapshot.schema: 1 is not supported (want 2; meshd is of another build)"),
    (_set(["services"], []), "snapshot.services: expected dict"),
    (_set(["services", "catalog", "port"], "8080"), "services.catalog.port: expected int"),
    (_set(["services", "catalog", "port"], False), "services.catalog.port: expected int"),
    (_set(["services", "catalog", "protocol"], "udp"), "services.catalog.protocol"),
    (_set(["services", "catalog", "identity"], ...), "services.catalog.identity: missing"),
    (_set(["services", "catalog", "aliases"], "catalog-v1"), "services.catalog.aliases: expected list"),
    (_set(["services", "catalog", "aliases"], [1]), "services.catalog.aliases"),
    (_set(["services", "catalog"], "x"), "services.catalog"),
    (_set(["endpoints"], []), "snapshot.endpoints: expected dict"),
    (_set(["endpoints", "ghost"], []), "endpoints.ghost: no such service"),
    (_set(["endpoints", "catalog"], {}), "endpoints.catalog: expected a list"),
    (_set(["endpoints", "catalog", 0, "port"], "15006"), "endpoints.catalog[0].port: expected int"),
    (_set(["endpoints", "catalog", 1, "address"], ...), "endpoints.catalog[1].address: missing"),
    (_set(["endpoints", "catalog", 0], "10.0.0.5"), "endpoints.catalog[0]"),
    (_set(["gateway_routes"], {}), "snapshot.gateway_routes: expected list"),
    (_set(["gateway_routes", 0, "service"], "ghost"), "gateway_routes[0].service: 'ghost' is not a service"),
    (_set(["gateway_routes", 0, "path"], 5), "gateway_routes[0]: path and host"),
    (_set(["gateway_routes", 1, "host"], ["x"]), "gateway_routes[1]: path and host"),
    (_set(["gateway_routes", 0, "strip_prefix"], "yes"), "gateway_routes[0].strip_prefix: expected bool"),
    (_set(["gateway_routes", 0], None), "gateway_routes[0]"),
])
def test_decode_snapshot_errors_name_the_field(mutate, fragment):
    wire = mutate(copy.deepcopy(encode_snapshot(sample_snapshot())))
    with pytest.raises(SnapshotError) as excinfo:
        decode_snapshot(wire)
    assert fragment in str(excinfo.value)


# ---- traffic policy and live rules in the snapshot -------------------------------------------------

def test_bad_policy_label_degrades_only_its_container():
    wls = build_workloads([ctr("payments", {"mesh.retries.attempts": "many"}), ctr("orders")])
    by_name = {wl.container.name: wl for wl in wls}
    assert by_name["/payments"].spec is None
    assert by_name["/payments"].error.label == "mesh.retries.attempts"
    assert by_name["/orders"].error is None


def test_policy_typo_is_named():
    [wl] = build_workloads([ctr("payments", {"mesh.retries.attempt": "3"})])
    assert wl.error is not None and wl.error.label == "mesh.retries.attempt"


def test_policy_carried_per_service_and_conflicts_reported():
    a = ctr("payments-a", {"mesh.service": "payments", "mesh.retries.attempts": "3"}, ip="10.0.0.1")
    b = ctr("payments-b", {"mesh.service": "payments", "mesh.retries.attempts": "5"}, ip="10.0.0.2")
    config, errors = build([a, b])
    assert config.services["payments"].policy.retries.attempts == 3
    assert [(e.container, e.label, e.message) for e in errors] == [
        ("payments-b", "mesh.retries.attempts",
         "retries.attempts 5 differs from 3 of other payments instances (traffic policy is per service)")]


@pytest.mark.parametrize("first, second, label, message", [
    ({"mesh.timeout": "2s"}, {"mesh.timeout": "2000ms"}, None, None),           # the same policy
    ({"mesh.retries.attempts": "2"}, {}, None, None),                            # the default, said or not
    ({"mesh.lb": "random"}, {}, "mesh.lb", 'lb "least-request" differs from "random"'),
    ({}, {"mesh.timeout": "1s"}, "mesh.timeout", "timeout_s 1.0 differs from null"),
    ({}, {"mesh.retries.budget": "20%,5"}, "mesh.retries.budget", "retries.budget_min 5 differs from 3"),
    ({"mesh.circuit.max-requests": "10"}, {"mesh.circuit.max-requests": "20"}, "mesh.circuit.max-requests",
     "circuit.max_requests 20 differs from 10"),
    ({}, {"mesh.outlier.consecutive-5xx": "off"}, "mesh.outlier.consecutive-5xx",
     "outlier.consecutive_5xx null differs from 5"),
    ({}, {"mesh.ratelimit": "2/s"}, "mesh.ratelimit", 'rate_limit {"rate_per_s": 2.0'),
    ({"mesh.ratelimit": "2/s"}, {"mesh.ratelimit": "2/s", "mesh.ratelimit.per-caller": "true"},
     "mesh.ratelimit.per-caller", "rate_limit.per_caller true differs from false"),
])
def test_instances_of_a_service_must_agree_on_its_policy(first, second, label, message):
    a = ctr("payments-a", {"mesh.service": "payments", **first}, ip="10.0.0.1")
    b = ctr("payments-b", {"mesh.service": "payments", **second}, ip="10.0.0.2")
    config, errors = build([a, b])
    assert config.services["payments"].policy == decode_traffic_policy(first)
    if label is None:
        assert errors == []
    else:
        [error] = errors
        assert (error.container, error.label) == ("payments-b", label)
        assert error.message.startswith(message) and "of other payments instances" in error.message


def test_policy_and_rules_round_trip():
    from meshcore.routing_rules import ServiceRules, validate_split
    rules = {"catalog": ServiceRules(service="catalog", split=validate_split("catalog", {"v1": 90, "v2": 10}, None))}
    config, errors = build_config(build_workloads([ctr("catalog", {"mesh.lb": "round-robin"}, ip="10.0.0.9")]),
                                  [ann("catalog", "catalog", "10.0.0.9")], TD, rules=rules)
    assert not errors
    snap = Snapshot(version=4, config=config)
    back = decode_snapshot(json.loads(json.dumps(encode_snapshot(snap))))
    assert back == snap
    assert back.config.services["catalog"].rules.split is not None


@pytest.mark.parametrize("policy, rules, field", [
    ({"lb": "fastest"}, None, "services.catalog.policy.lb: expected one of least-request"),
    ({"lb": 3}, None, "services.catalog.policy.lb"),
    ({"retries": {"attempts": -1}}, None, "services.catalog.policy.retries.attempts: expected an integer 0..10"),
    ({"mesh.lb": "random"}, None, "services.catalog.policy: label strings (mesh.lb) instead of typed fields"),
    (..., None, "services.catalog.policy: missing"),
    (None, {"service": "catalog", "split": {"weights": [["v1", 90], ["v2", 20]]}}, "services.catalog.rules"),
])
def test_decode_snapshot_rejects_bad_policy_or_rules(policy, rules, field):
    config, _ = build([ctr("catalog", ip="10.0.0.9")])
    wire = encode_snapshot(Snapshot(version=1, config=config))
    if policy is ...:
        del wire["services"]["catalog"]["policy"]
    elif policy is not None:
        for key, value in policy.items():  # a change of one field (of one section) of the encoded policy
            target = wire["services"]["catalog"]["policy"]
            if isinstance(value, dict) and key in target:
                target[key].update(value)
            else:
                target[key] = value
    wire["services"]["catalog"]["rules"] = rules
    with pytest.raises(SnapshotError) as exc:
        decode_snapshot(wire)
    assert str(exc.value).startswith(field)


# ---- zero trust in the snapshot: mtls, allow, policies, JWT routes ------------------------------------

def test_zero_trust_fields_round_trip_and_conflicts():
    from meshcore.authz import Policy, make_rule

    cs = [ctr("payments", {"mesh.mtls": "permissive", "mesh.allow": "orders,gateway"}, ip="10.0.0.2"),
          ctr("orders", {"mesh.gateway.path": "/o", "mesh.gateway.auth": "jwt",
                         "mesh.gateway.jwt.issuer": "https://idp", "mesh.gateway.jwt.audience": "shop"}, ip="10.0.0.3")]
    policy = Policy(default="deny", rules=(make_rule("deny", "orders", "payments", "/admin", "POST"),))
    config, errors = build_config(build_workloads(cs), [], TD, policies=policy)
    assert errors == []
    pay = config.services["payments"]
    assert pay.mtls == "permissive" and pay.allow == ("gateway", "orders")
    assert config.services["orders"].mtls == "strict" and config.services["orders"].allow is None
    [route] = config.gateway_routes
    assert (route.auth, route.jwt_issuer, route.jwt_audience) == ("jwt", "https://idp", "shop")
    snap = Snapshot(version=3, config=config)
    assert decode_snapshot(json.loads(json.dumps(encode_snapshot(snap)))) == snap
    # Instances of one service must agree on mtls and allow.
    cs2 = [ctr("p1", {"mesh.service": "payments", "mesh.mtls": "permissive"}),
           ctr("p2", {"mesh.service": "payments"})]
    _, errors = build_config(build_workloads(cs2), [], TD)
    assert [(e.container, e.label) for e in errors] == [("p2", "mesh.mtls")]


@pytest.mark.parametrize("mutate, fragment", [
    (lambda w: w["services"]["payments"].update(mtls="off"), "services.payments.mtls"),
    (lambda w: w["services"]["payments"].update(allow="orders"), "services.payments.allow"),
    (lambda w: w["gateway_routes"][0].update(auth="basic"), "gateway_routes[0].auth"),
    (lambda w: w.update(policies={"default": "maybe", "rules": []}), "policies.default"),
    (lambda w: w.update(policies={"default": "allow", "rules": [{"action": "allow"}]}), "policies.rules[0]"),
])
def test_zero_trust_fields_decode_strictly(mutate, fragment):
    cs = [ctr("payments", ip="10.0.0.2"), ctr("orders", {"mesh.gateway.path": "/o"}, ip="10.0.0.3")]
    config, _ = build_config(build_workloads(cs), [], TD)
    wire = encode_snapshot(Snapshot(version=1, config=config))
    mutate(wire)
    with pytest.raises(SnapshotError) as exc:
        decode_snapshot(wire)
    assert fragment in str(exc.value)
