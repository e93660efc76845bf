"""Table tests of Compose projects as namespaces: snapshot keys (meshcore.snapshot), the sidecar's name
resolution (sidecar.routing, sidecar.dns) and the names users give meshd (resolve_service)."""

from __future__ import annotations

import pytest

from meshcore.labels import COMPOSE_PROJECT, COMPOSE_SERVICE, ContainerInfo
from meshcore.snapshot import (
    Announcement, ServiceNameError, Snapshot, assign_owners, build_config, build_workloads, resolve_or_keep,
    resolve_service, search_names,
)
from sidecar.dns import VipAllocator, mesh_names
from sidecar.routing import build_route_table, find_by_host, route_outbound

TD = "mesh.local"


def app(project: str, service: str, minute: int, labels: dict[str, str] | None = None) -> ContainerInfo:
    """Container `<project>-<service>-1` of compose service `service`, created at 10:<minute>, with an
    address of its own on `<project>_default`."""
    ip = f"10.{sum(map(ord, project)) % 250}.{sum(map(ord, service)) % 250}.{minute + 2}"
    return ContainerInfo(
        id=f"id-{project}-{service}", name=f"/{project}-{service}-1",
        labels={COMPOSE_PROJECT: project, COMPOSE_SERVICE: service, "mesh.enable": "true", **(labels or {})},
        exposed_ports=(80,), networks={f"{project}_default": ip}, created=f"2026-12-05T10:{minute:02d}:00Z")


def announced(containers) -> list[Announcement]:
    return [Announcement(instance=c.id, service=c.labels.get("mesh.service", c.labels[COMPOSE_SERVICE]),
                         version="v1", address=next(iter(c.networks.values())), port=15006, identity="")
            for c in containers]


def build(containers, owners=None):
    config, errors = build_config(build_workloads(containers), announced(containers), TD, owners=owners)
    assert errors == []
    return config


def keys(config) -> dict[str, tuple[str, str]]:
    """snapshot key -> (project, identity's tail)"""
    return {k: (s.namespace, s.identity.removeprefix(f"spiffe://{TD}/")) for k, s in config.services.items()}


# ---- snapshot keys ----------------------------------------------------------------------------------

ONE = [app("a", "web", 1), app("a", "db", 2), app("a", "client", 3)]
TWO = ONE + [app("b", "web", 4), app("b", "client", 5)]
THREE = TWO + [app("c", "web", 0)]   # created first, but after a and b claimed the names (owners)


@pytest.mark.parametrize("containers, owners, expected", [
    (ONE, None, {"client": ("a", "ns/a/sa/client"), "db": ("a", "ns/a/sa/db"), "web": ("a", "ns/a/sa/web")}),
    (TWO, None, {"client": ("a", "ns/a/sa/client"), "client.b": ("b", "ns/b/sa/client"),
                 "db": ("a", "ns/a/sa/db"), "web": ("a", "ns/a/sa/web"), "web.b": ("b", "ns/b/sa/web")}),
    # b's older containers would win a fresh assignment, but the names are already held by a
    ([app("b", "web", 0)] + ONE, {"web": "a", "db": "a", "client": "a"},
     {"client": ("a", "ns/a/sa/client"), "db": ("a", "ns/a/sa/db"), "web": ("a", "ns/a/sa/web"),
      "web.b": ("b", "ns/b/sa/web")}),
    (THREE, {"web": "a", "db": "a", "client": "a"},
     {"client": ("a", "ns/a/sa/client"), "client.b": ("b", "ns/b/sa/client"), "db": ("a", "ns/a/sa/db"),
      "web": ("a", "ns/a/sa/web"), "web.b": ("b", "ns/b/sa/web"), "web.c": ("c", "ns/c/sa/web")}),
])
def test_a_name_used_by_several_projects_is_qualified_except_for_its_holder(containers, owners, expected):
    config = build(containers, owners)
    assert keys(config) == expected
    for key in expected:   # each key has its own project's instances only
        project = expected[key][0]
        assert config.endpoints[key] and all(e.instance.startswith(f"id-{project}-") for e in config.endpoints[key])


@pytest.mark.parametrize("previous, containers, expected", [
    ({}, ONE, {"client": "a", "db": "a", "web": "a"}),
    ({}, [app("b", "web", 0)] + ONE, {"client": "a", "db": "a", "web": "b"}),   # the oldest container's
    ({"web": "a", "db": "a", "client": "a"}, TWO, {"client": "a", "db": "a", "web": "a"}),
    # a went away: b keeps its keys (web.b) while it runs; db is no one's any more
    ({"web": "a", "db": "a", "client": "a"}, [c for c in TWO if "-a-" not in c.id],
     {"client": "a", "web": "a"}),
    # ... and when a comes back (new containers, newer than b's), it is `web` again
    ({"client": "a", "web": "a"}, [c for c in TWO if "-b-" in c.id] + [app("a", "web", 9)],
     {"client": "a", "web": "a"}),
    # every container gone: the names are free, and the next project alone has them bare
    ({"client": "a", "web": "a"}, [], {}),
    ({}, [app("c", "web", 9)], {"web": "c"}),
    # while any web is left, the holder keeps the name, even if only another project's web is left
    ({"client": "a", "web": "a"}, [app("c", "web", 9)], {"web": "a"}),
])
def test_owners_keep_a_name_while_any_project_uses_it(previous, containers, expected):
    assert assign_owners(previous, build_workloads(containers)) == expected


def test_a_project_going_away_leaves_the_other_keys_as_they_were():
    owners = assign_owners({}, build_workloads(TWO))
    rest = [c for c in TWO if "-a-" not in c.id]
    owners = assign_owners(owners, build_workloads(rest))
    assert sorted(build(rest, owners).services) == ["client.b", "web.b"]
    assert sorted(build(ONE, assign_owners(owners, build_workloads(ONE))).services) == ["client", "db", "web"]


def test_rules_and_gateway_routes_follow_the_key():
    from meshcore.routing_rules import ServiceRules
    rules = {"web": ServiceRules(service="web"), "web.b": ServiceRules(service="web.b")}
    containers = ONE + [app("b", "web", 4, {"mesh.gateway.path": "/b"})]
    config, errors = build_config(build_workloads(containers), (), TD, rules=rules)
    assert errors == []
    assert config.services["web"].rules is rules["web"] and config.services["web.b"].rules is rules["web.b"]
    assert [r.service for r in config.gateway_routes] == ["web.b"]


def test_a_gateway_route_claimed_by_two_projects_stays_with_the_oldest():
    containers = [app("a", "web", 1, {"mesh.gateway.path": "/"}), app("b", "web", 2, {"mesh.gateway.path": "/"})]
    config, errors = build_config(build_workloads(containers), (), TD)
    assert [(e.container, e.label) for e in errors] == [("b-web-1", "mesh.gateway.path")]
    assert "already belongs to web" in errors[0].message
    assert [r.service for r in config.gateway_routes] == ["web"]


@pytest.mark.parametrize("allow, project, expected", [
    ("client", "a", ("client",)),
    ("client", "b", ("client.b",)),          # the caller's own project first
    ("client.b", "a", ("client.b",)),
    ("client.a", "b", ("client",)),          # a holds the name: its key is bare
    ("db", "b", ("db",)),                    # no db in b: the only db
    ("gateway,*", "b", ("*", "gateway")),
    ("nosuch", "b", ("nosuch",)),
])
def test_mesh_allow_names_resolve_from_the_services_project(allow, project, expected):
    containers = TWO + [app(project, "api", 7, {"mesh.allow": allow})]
    config = build(containers)
    assert config.services["api"].allow == expected   # api is unique: bare in either project


# ---- names from a caller's project (search domain) -----------------------------------------------

@pytest.mark.parametrize("namespace, host, expected", [
    ("a", "web", "web"), ("b", "web", "web.b"), ("c", "web", "web.c"),
    ("a", "web.b", "web.b"), ("b", "web.a", "web"), ("c", "web.a", "web"),
    ("b", "db", "db"), ("b", "db.a", "db"),
    ("d", "web", "web"),     # a project without web: the one holding the name bare
    (None, "web", "web"),
    ("a", "web.d", None), ("a", "nosuch", None), ("b", "db.b", None),
])
def test_a_bare_name_resolves_in_the_callers_project_first(namespace, host, expected):
    config = build(THREE, {"web": "a", "db": "a", "client": "a"})
    assert search_names(config.services, namespace).get(host) == expected


def test_a_bare_name_with_no_holder_and_several_services_is_not_resolved():
    config = build(TWO, {"web": "gone", "client": "gone", "db": "a"})
    names = search_names(config.services, "c")
    assert "web" not in names and names["web.a"] == "web.a" and names["web.b"] == "web.b"
    assert search_names(config.services, "b")["web"] == "web.b"


def test_aliases_resolve_like_names_and_lose_to_them():
    containers = [app("a", "frontend", 1, {"mesh.service": "web"}), app("b", "frontend", 2, {"mesh.service": "web"})]
    config = build(containers)
    assert config.services["web"].aliases == ("frontend",) and config.services["web.b"].aliases == ("frontend",)
    assert search_names(config.services, "b")["frontend"] == "web.b"
    assert search_names(config.services, "b")["frontend.a"] == "web"


@pytest.mark.parametrize("namespace, host, expected", [
    ("a", "web", "web"), ("a", "web:80", "web"), ("b", "web", "web.b"), ("b", "WEB:80", "web.b"),
    ("b", "web.a:80", "web"), ("a", "web.b", "web.b"), ("b", "client", "client.b"),
])
def test_route_table_of_a_node_uses_its_project(namespace, host, expected):
    table = build_route_table(Snapshot(1, build(TWO)), home=("client", namespace))
    assert find_by_host(table, host).name == expected
    assert route_outbound(table, host, ("10.9.9.9", 80)).name == expected
    assert table.own == ("client" if namespace == "a" else "client.b")


def test_dns_answers_each_project_its_own_service_vip():
    config = build(TWO)
    vips = VipAllocator().assign(config.services)
    assert vips["web"] != vips["web.b"]
    in_a = mesh_names(build_route_table(Snapshot(1, config), vips, home=("client", "a")))
    in_b = mesh_names(build_route_table(Snapshot(1, config), vips, home=("client", "b")))
    assert in_a["web"] == vips["web"] and in_b["web"] == vips["web.b"]
    assert in_a["web.b"] == in_b["web.b"] == vips["web.b"] and in_b["web.a"] == vips["web"]
    assert all(":" not in name and not name[0].isdigit() for name in in_a)


def test_without_a_home_a_table_resolves_as_before():
    table = build_route_table(Snapshot(1, build(ONE)))
    assert table.own is None
    assert {h for h in table.hosts if ":" not in h} == {"web", "web.a", "db", "db.a", "client", "client.a"}


# ---- names users give meshd (meshctl) -----------------------------------------------------------

@pytest.mark.parametrize("containers, name, expected", [
    (ONE, "web", "web"), (ONE, "web.a", "web"),
    (TWO, "db", "db"), (TWO, "web.a", "web"), (TWO, "web.b", "web.b"), (TWO, "client.b", "client.b"),
])
def test_resolve_service_takes_a_name_when_unambiguous(containers, name, expected):
    assert resolve_service(build(containers).services, name) == expected


@pytest.mark.parametrize("name, message, choices", [
    ("web", "'web' is ambiguous: projects a, b, c each have one; name one of web.a, web.b, web.c",
     ("web.a", "web.b", "web.c")),
    ("nosuch", "no mesh service named 'nosuch'", ()),
    ("web.d", "no mesh service 'web' in project 'd'", ()),
])
def test_resolve_service_names_the_choices_when_ambiguous(name, message, choices):
    with pytest.raises(ServiceNameError) as info:
        resolve_service(build(THREE, {"web": "a", "db": "a", "client": "a"}).services, name)
    assert str(info.value) == message and info.value.choices == choices


# ---- authorization by identity ------------------------------------------------------------------

def test_policies_apply_by_identity_to_the_callers_key():
    import dataclasses
    from meshcore.authz import Policy, make_rule
    from sidecar.mtls import Authorizer

    config = build(TWO + [app("b", "api", 7, {"mesh.allow": "web"})])
    policy = Policy(rules=(make_rule("deny", "client.b", "api"),))
    snapshot = Snapshot(1, dataclasses.replace(config, policies=policy))
    authz = Authorizer("api", "b")
    authz.update(snapshot)
    ident = {key: svc.identity for key, svc in config.services.items()}
    assert authz.service == "api" and authz.allow == ("web.b",)
    assert authz.check(ident["web.b"], "GET", "/").allowed          # b's web, by mesh.allow
    assert not authz.check(ident["web"], "GET", "/").allowed        # a's web: not in b's api mesh.allow
    denied = authz.check_request(ident["client.b"], b"GET", b"/x?y")
    assert not denied.allowed and denied.reason == "rule deny client.b -> api"
    assert authz.caller(f"spiffe://{TD}/ns/mesh-system/sa/gateway") == "gateway"
    assert authz.caller(None) is None


def test_a_node_finds_its_own_service_in_its_project():
    from meshcore.metrics import Registry
    from sidecar.egress import EgressControl

    containers = ONE + [app("b", "web", 4, {"mesh.egress": "example.com:443"})]
    config = build(containers)
    in_b, in_a = EgressControl("web", Registry(), "b"), EgressControl("web", Registry(), "a")
    in_b.update(config)
    in_a.update(config)
    assert in_b.rules is not None and in_a.rules is None


# ---- meshd's admin API and meshctl: names users give ---------------------------------------------

async def test_rules_and_policies_take_a_qualified_name_and_refuse_an_ambiguous_one(tmp_path):
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer
    from meshd.rules_api import RulesBook, add_routes
    from meshd.security_api import PolicyBook, add_policy_routes
    from meshd.store import Store

    services = build(TWO).services
    store = Store(str(tmp_path / "state.db"))
    book, policies = RulesBook(store), PolicyBook(store)

    async def publish():
        return 7

    app = web.Application()
    add_routes(app, book, lambda key: {"v1"} if key in services else None, publish,
               lambda name: resolve_service(services, name))
    add_policy_routes(app, policies, publish, lambda name: resolve_service(services, name))
    async with TestClient(TestServer(app)) as client:
        ambiguous = await client.post("/v1/rules/web/fault", json={"abort": "50:503"})
        assert ambiguous.status == 400
        assert (await ambiguous.json())["error"].endswith("name one of web.a, web.b")
        assert book.rules == {}
        for name, key in (("web.a", "web"), ("web.b", "web.b"), ("db", "db")):
            done = await client.post(f"/v1/rules/{name}/fault", json={"abort": "50:503"})
            assert done.status == 200 and key in book.rules
        shown = await (await client.get("/v1/rules/web.b")).json()
        assert shown["rules"]["service"] == "web.b" and shown["rules"]["fault"]["abort_percent"] == 50
        refused = await client.post("/v1/policies/rules", json={"action": "deny", "source": "client",
                                                                "destination": "web.b"})
        assert refused.status == 400 and "name one of client.a, client.b" in (await refused.json())["error"]
        added = await client.post("/v1/policies/rules", json={"action": "deny", "source": "client.a",
                                                              "destination": "web.b"})
        assert added.status == 200 and [(r.source, r.destination) for r in policies.policy.rules] == [("client", "web.b")]
        removed = await client.post("/v1/policies/remove", json={"source": "client.a", "destination": "web.b"})
        assert removed.status == 200 and policies.policy.rules == ()


def test_meshctl_shows_the_ambiguity_and_exits_1():
    from typer.testing import CliRunner
    from meshctl import traffic
    from meshctl.api import MeshdApiError
    from meshctl.context import Meshctl

    services = build(TWO).services

    class Meshd:
        """Answers POST /v1/rules/<name>/<kind> as meshd does for a name it cannot resolve."""
        base_url = "http://meshd.test:15014"
        token = "t0ken"

        def request(self, method, path, body=None):
            try:
                resolve_service(services, path.split("/")[3])
            except ServiceNameError as exc:
                raise MeshdApiError(self.base_url + path, str(exc), status=400, error=str(exc)) from None
            raise AssertionError(f"{method} {path}: resolved, not expected here")

    result = CliRunner().invoke(traffic.commands, ["fault", "web", "--abort", "50:503"],
                                obj=Meshctl(client=Meshd(), tty=False), env={"COLUMNS": "80", "MESHD_API": ""})
    assert result.exit_code == 1
    assert "'web' is ambiguous: projects a, b each have one; name one of web.a, web.b" in result.output


# ---- a node's data path ------------------------------------------------------------------------

@pytest.mark.parametrize("namespace, own", [("a", "web"), ("b", "web.b"), (None, "web")])
def test_a_node_routes_bare_names_in_its_project_and_reports_its_own_key(namespace, own):
    from sidecar.proxy import (
        Exchange, ProxyState, _Downstream, _Listener, build_inbound_stack, build_outbound_stack, metric_labels,
        route_by_host,
    )

    state = ProxyState("web")
    state.namespace = namespace
    state.apply_snapshot(Snapshot(3, build(TWO)))
    out = _Downstream(state, build_outbound_stack(state), _Listener(None, 0.3))
    ex = Exchange(out)
    for host, expected in ((b"client", "client" if own == "web" else "client.b"), (b"client.b", "client.b"),
                           (b"client.a:80", "client")):
        ex.host = host
        assert route_by_host(out, ex).name == expected
    assert state.local_traffic() is state.traffic.of(state.table.clusters[own])
    inbound = _Downstream(state, build_inbound_stack(state, 80), _Listener(None, 0.3))
    assert metric_labels(inbound, Exchange(inbound))[3] == own   # destination_service, as callers report it


def test_only_allowed_decisions_are_in_the_set_the_data_path_tests_and_a_snapshot_empties_it(monkeypatch):
    import dataclasses
    from meshcore.authz import Policy, make_rule
    from sidecar import mtls
    from sidecar.mtls import Authorizer

    config = build(TWO + [app("b", "api", 7, {"mesh.allow": "web"})])
    ident = {key: svc.identity for key, svc in config.services.items()}
    web, client = ident["web.b"], ident["client.b"]
    authz = Authorizer("api", "b")
    authz.update(Snapshot(1, dataclasses.replace(config, policies=Policy(rules=(make_rule("deny", "client.b", "api"),)))))
    assert authz.check_request(web, b"GET", b"/a?q").allowed
    assert not authz.check_request(client, b"GET", b"/a").allowed
    assert not authz.check_request(client, b"GET", b"/a").allowed   # remembered, and counted again
    assert authz.allowed == {(web, b"GET", b"/a?q")} and authz.denied == 2
    authz.update(Snapshot(2, dataclasses.replace(config, policies=Policy(rules=(make_rule("deny", "web.b", "api"),)))))
    assert authz.allowed == set()                                     # a new snapshot decides anew
    assert not authz.check_request(web, b"GET", b"/a?q").allowed
    monkeypatch.setattr(mtls, "MEMO_MAX", 2)
    authz.update(Snapshot(3, config))
    for path in (b"/1", b"/2", b"/3"):
        assert authz.check_request(web, b"GET", path).allowed
    assert authz.allowed == {(web, b"GET", b"/3")}                    # bounded with the memo


@pytest.mark.parametrize("name, expected", [
    ("web.b", "web.b"),          # resolved
    ("gone", "gone"),            # no service now: kept as written
    ("web", ServiceNameError),   # ambiguous: raised
])
def test_resolve_or_keep(name, expected):
    services = build(TWO).services
    resolve = lambda n: resolve_service(services, n)   # noqa: E731
    if expected is ServiceNameError:
        with pytest.raises(ServiceNameError, match="ambiguous"):
            resolve_or_keep(resolve, name)
    else:
        assert resolve_or_keep(resolve, name) == expected
