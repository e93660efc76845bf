"""Table tests of meshcore.egress: the mesh.egress grammar, the decision, and their path through
labels, snapshot and meshd's setting."""

from __future__ import annotations

import pytest

from meshcore.egress import (
    EGRESS_ALLOW_ANY, EGRESS_REGISTRY_ONLY, MAX_EGRESS_ENTRIES, EgressError, decode_egress_list,
    decode_egress_mode, egress_allowed,
)
from meshcore.labels import COMPOSE_PROJECT, COMPOSE_SERVICE, ContainerInfo, LabelDecodeError, decode_labels
from meshcore.snapshot import (
    MeshConfig, ServiceConfig, Snapshot, SnapshotError, build_config, build_workloads, decode_snapshot,
    encode_snapshot,
)
from meshd.app import egress_mode_from_env

ALLOW = decode_egress_list("api.example.com:443, *.internal.test:80, 10.0.0.0/8:5432, 192.0.2.7:*,"
                           "[2001:db8::/32]:443, localhost:8080")


@pytest.mark.parametrize("mode, allow, host, port, expected", [
    # allow-any: today's passthrough, whatever the list says
    (EGRESS_ALLOW_ANY, None, "evil.example", 443, True),
    (EGRESS_ALLOW_ANY, ALLOW, "203.0.113.9", 22, True),
    # registry-only without a list: nothing outside the mesh
    (EGRESS_REGISTRY_ONLY, None, "api.example.com", 443, False),
    (EGRESS_REGISTRY_ONLY, (), "10.1.2.3", 5432, False),
    # exact names, case and a trailing dot ignored; the port must match
    (EGRESS_REGISTRY_ONLY, ALLOW, "api.example.com", 443, True),
    (EGRESS_REGISTRY_ONLY, ALLOW, "API.Example.COM.", 443, True),
    (EGRESS_REGISTRY_ONLY, ALLOW, "api.example.com", 80, False),
    (EGRESS_REGISTRY_ONLY, ALLOW, "example.com", 443, False),
    (EGRESS_REGISTRY_ONLY, ALLOW, "x.api.example.com", 443, False),
    (EGRESS_REGISTRY_ONLY, ALLOW, "api.example.com.evil.test", 443, False),
    # wildcards: names below the domain, not the domain itself, nor a look-alike suffix
    (EGRESS_REGISTRY_ONLY, ALLOW, "db.internal.test", 80, True),
    (EGRESS_REGISTRY_ONLY, ALLOW, "a.b.internal.test", 80, True),
    (EGRESS_REGISTRY_ONLY, ALLOW, "internal.test", 80, False),
    (EGRESS_REGISTRY_ONLY, ALLOW, "notinternal.test", 80, False),
    (EGRESS_REGISTRY_ONLY, ALLOW, "db.internal.test", 443, False),
    # networks and addresses; any port with *
    (EGRESS_REGISTRY_ONLY, ALLOW, "10.200.0.1", 5432, True),
    (EGRESS_REGISTRY_ONLY, ALLOW, "11.0.0.1", 5432, False),
    (EGRESS_REGISTRY_ONLY, ALLOW, "10.200.0.1", 5433, False),
    (EGRESS_REGISTRY_ONLY, ALLOW, "192.0.2.7", 1, True),
    (EGRESS_REGISTRY_ONLY, ALLOW, "192.0.2.8", 1, False),
    (EGRESS_REGISTRY_ONLY, ALLOW, "2001:db8::5", 443, True),
    (EGRESS_REGISTRY_ONLY, ALLOW, "[2001:db8::5]", 443, True),
    (EGRESS_REGISTRY_ONLY, ALLOW, "2001:db9::5", 443, False),
    # names never match address rules, nor addresses name rules
    (EGRESS_REGISTRY_ONLY, decode_egress_list("10.0.0.1:80"), "10.0.0.1.nip.io", 80, False),
    (EGRESS_REGISTRY_ONLY, ALLOW, "127.0.0.1", 8080, False),
    (EGRESS_REGISTRY_ONLY, ALLOW, "localhost", 8080, True),
])
def test_egress_allowed(mode, allow, host, port, expected):
    assert egress_allowed(mode, allow, host, port) is expected


@pytest.mark.parametrize("raw, canonical", [
    ("api.example.com:443", ("api.example.com:443",)),
    (" API.example.com.:443 ,", ("api.example.com:443",)),
    ("*.Internal.test:80", ("*.internal.test:80",)),
    ("10.0.0.0/8:5432,10.0.0.0/8:5432", ("10.0.0.0/8:5432",)),      # duplicates dropped
    ("10.1.2.3:*", ("10.1.2.3:*",)),
    ("10.1.2.3/32:1", ("10.1.2.3:1",)),
    ("[2001:DB8::1]:443,[2001:db8::/32]:*", ("[2001:db8::1]:443", "[2001:db8::/32]:*")),
])
def test_canonical_entries(raw, canonical):
    assert tuple(str(rule) for rule in decode_egress_list(raw)) == canonical
    assert tuple(str(rule) for rule in decode_egress_list(",".join(canonical))) == canonical  # a fixed point


@pytest.mark.parametrize("raw, fragment", [
    ("", "empty"),
    (" , ", "empty"),
    ("api.example.com", "'api.example.com': expected host:port"),
    ("api.example.com:", "port '' is not 1-65535"),
    ("api.example.com:0", "port '0'"),
    ("api.example.com:65536", "port '65536'"),
    ("api.example.com:https", "port 'https'"),
    (":443", "':443': expected host:port"),
    ("ok.test:80,bad_name.test:80", "'bad_name.test:80'"),
    ("*.:80", "is not a host name"),
    ("a.*.test:80", "is not a host name"),
    ("*:80", "is not a host name"),
    ("-a.test:80", "is not a host name"),
    ("10.0.0.1/8:5432", "host bits set"),
    ("10.0.0.0/33:1", "'10.0.0.0/33:1'"),
    ("1.2.3:80", "'1.2.3:80'"),
    ("2001:db8::1:443", "'2001:db8::1:443'"),
    ("[2001:db8::1]443", "[address]:port"),
    ("[10.0.0.1]:80", "IPv6 addresses are written in brackets"),
    (",".join(f"h{i}.test:80" for i in range(MAX_EGRESS_ENTRIES + 1)), f"at most {MAX_EGRESS_ENTRIES}"),
])
def test_bad_entries_are_named(raw, fragment):
    with pytest.raises(EgressError) as excinfo:
        decode_egress_list(raw)
    assert fragment in str(excinfo.value)


@pytest.mark.parametrize("raw, expected", [
    ("allow-any", EGRESS_ALLOW_ANY), ("REGISTRY-ONLY", EGRESS_REGISTRY_ONLY), (" registry-only ", EGRESS_REGISTRY_ONLY),
])
def test_modes(raw, expected):
    assert decode_egress_mode(raw) == expected


@pytest.mark.parametrize("raw", ["", "deny", "registry_only", None, 1])
def test_bad_modes(raw):
    with pytest.raises(EgressError):
        decode_egress_mode(raw)


@pytest.mark.parametrize("env, expected", [
    ({}, EGRESS_ALLOW_ANY), ({"MESH_EGRESS": ""}, EGRESS_ALLOW_ANY),
    ({"MESH_EGRESS": "registry-only"}, EGRESS_REGISTRY_ONLY),
])
def test_meshd_setting(env, expected):
    assert egress_mode_from_env(env) == expected


def test_meshd_setting_names_the_variable():
    with pytest.raises(EgressError, match="MESH_EGRESS: 'closed'"):
        egress_mode_from_env({"MESH_EGRESS": "closed"})


# ---- the label, the config, the snapshot ------------------------------------------------------------

def ctr(name: str, labels: dict[str, str], created: str = "1") -> ContainerInfo:
    return ContainerInfo(id=f"id-{name}", name=f"/{name}", exposed_ports=(8080,), created=created,
                         labels={COMPOSE_SERVICE: "orders", COMPOSE_PROJECT: "shop", "mesh.enable": "true", **labels})


def test_label_decodes_to_canonical_entries():
    spec = decode_labels(ctr("orders-1", {"mesh.egress": "API.example.com:443, 10.0.0.0/8:*"}))
    assert spec.egress == ("api.example.com:443", "10.0.0.0/8:*")
    assert decode_labels(ctr("orders-1", {})).egress is None


def test_bad_label_names_label_and_item():
    with pytest.raises(LabelDecodeError) as excinfo:
        decode_labels(ctr("orders-1", {"mesh.egress": "api.example.com:443,db:port"}))
    assert excinfo.value.label == "mesh.egress"
    assert "'db:port'" in excinfo.value.message


def test_config_carries_mode_and_lists_and_names_conflicts():
    a = ctr("orders-1", {"mesh.egress": "api.example.com:443"}, created="1")
    b = ctr("orders-2", {"mesh.egress": "api.example.com:80"}, created="2")
    config, errors = build_config(build_workloads([a, b]), [], "mesh.local", egress_mode=EGRESS_REGISTRY_ONLY)
    assert config.egress_mode == EGRESS_REGISTRY_ONLY
    assert config.services["orders"].egress == ("api.example.com:443",)
    assert [(e.container, e.label) for e in errors] == [("orders-2", "mesh.egress")]


def test_snapshot_round_trip_and_default():
    svc = ServiceConfig(name="orders", namespace="shop", protocol="http", port=8080, identity="x",
                        egress=("api.example.com:443", "[2001:db8::/32]:*"))
    snap = Snapshot(version=3, config=MeshConfig(services={"orders": svc}, egress_mode=EGRESS_REGISTRY_ONLY))
    assert decode_snapshot(encode_snapshot(snap)) == snap
    wire = encode_snapshot(snap)
    del wire["egress_mode"], wire["services"]["orders"]["egress"]   # a meshd from before egress control
    old = decode_snapshot(wire).config
    assert old.egress_mode == EGRESS_ALLOW_ANY and old.services["orders"].egress is None


@pytest.mark.parametrize("key, value, fragment", [
    ("egress_mode", "deny", "snapshot.egress_mode"),
    ("egress_mode", 3, "snapshot.egress_mode"),
    ("egress", "api.example.com:443", "services.orders.egress: expected a list"),
    ("egress", ["api.example.com:x"], "services.orders.egress: 'api.example.com:x'"),
])
def test_snapshot_errors_name_the_field(key, value, fragment):
    svc = ServiceConfig(name="orders", namespace="shop", protocol="http", port=8080, identity="x")
    wire = encode_snapshot(Snapshot(version=1, config=MeshConfig(services={"orders": svc})))
    if key == "egress_mode":
        wire[key] = value
    else:
        wire["services"]["orders"][key] = value
    with pytest.raises(SnapshotError, match=fragment.replace(".", r"\.")):
        decode_snapshot(wire)


def test_blocked_counter_is_read_from_a_scrape_and_its_growth_is_the_delta():
    from meshcore.promtext import parse_scrape, scrape_delta

    line = 'mesh_sidecar_egress_blocked_total{source_workload="orders",destination="%s",protocol="%s"} %d\n'
    first = parse_scrape(line % ("api.example.com:443", "http", 2) + line % ("api.example.com:443", "tcp", 1))
    assert first.egress_blocked == {("orders", "api.example.com:443"): 3}   # protocols summed
    second = parse_scrape(line % ("api.example.com:443", "http", 5) + line % ("10.0.0.1:22", "tcp", 1))
    assert scrape_delta(first, second).egress_blocked == {("orders", "api.example.com:443"): 2,
                                                          ("orders", "10.0.0.1:22"): 1}
    assert scrape_delta(second, second).empty()


# ---- meshctl analyze ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mode, lists, expected", [
    (EGRESS_ALLOW_ANY, {"a": None, "b": ("x.test:443",)},
     ["b: mesh.egress has no effect while egress is allow-any (meshd's MESH_EGRESS=registry-only enforces it)"]),
    (EGRESS_REGISTRY_ONLY, {"a": None, "b": ("x.test:443",)},
     ["a: no mesh.egress: it reaches only mesh services (registry-only)"]),
    (EGRESS_REGISTRY_ONLY, {"b": ("x.test:443", "0.0.0.0/0:*", "[::/0]:443")},
     ["b: mesh.egress 0.0.0.0/0:*, [::/0]:443 lets every address out: for raw TCP and addressed calls this "
      "service is as under allow-any"]),
    (EGRESS_REGISTRY_ONLY, {"b": ("10.0.0.0/8:*",)}, []),
    (EGRESS_ALLOW_ANY, {"a": None}, []),
])
def test_egress_findings(mode, lists, expected):
    from meshcore.egress import egress_findings
    assert egress_findings(mode, lists) == expected


COMPOSE = """
services:
  orders:
    image: shop/orders
    expose: ["8080"]
    labels: ["mesh.enable=true", "mesh.egress=api.example.com:443, 10.0.0.0/8:5432"]
  users:
    image: shop/users
    expose: ["8080"]
    labels: ["mesh.enable=true"]
"""


@pytest.mark.parametrize("args, env, lines", [
    ((), {}, ["  egress: allow-any", "    orders may call api.example.com:443, 10.0.0.0/8:5432",
              "note: orders: mesh.egress has no effect while egress is allow-any"]),
    (("--egress", "registry-only"), {}, ["  egress: registry-only",
                                         "note: users: no mesh.egress: it reaches only mesh services"]),
    ((), {"MESH_EGRESS": "registry-only"}, ["  egress: registry-only"]),
])
def test_analyze_reports_egress(tmp_path, args, env, lines):
    from typer.testing import CliRunner
    from meshctl.cli import app

    path = tmp_path / "compose.yaml"
    path.write_text(COMPOSE)
    result = CliRunner().invoke(app, ["analyze", str(path), *args], env={"COLUMNS": "200", **env})
    assert result.exit_code == 0, result.output
    for line in lines:
        assert line in result.output, result.output


def test_analyze_names_a_bad_egress_item_and_mode(tmp_path):
    from typer.testing import CliRunner
    from meshctl.cli import app

    path = tmp_path / "compose.yaml"
    path.write_text(COMPOSE.replace("10.0.0.0/8:5432", "10.0.0.1/8:5432"))
    result = CliRunner().invoke(app, ["analyze", str(path)], env={"COLUMNS": "200"})
    assert result.exit_code == 1
    assert "service orders: label mesh.egress: '10.0.0.1/8:5432'" in result.output
    result = CliRunner().invoke(app, ["analyze", str(path), "--egress", "deny"], env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "--egress" in result.output
