"""Table tests of meshd.plan: which sidecars to create, adopt and remove; what each sidecar is told."""

from __future__ import annotations

import dataclasses

import pytest

from meshcore.labels import COMPOSE_PROJECT, COMPOSE_SERVICE, SIDECAR_FOR_LABEL, ContainerInfo
from meshcore.snapshot import build_workloads
from meshd.plan import build_sidecar_env, control_host_for, plan_sidecars

IMG = "sha256:" + "a" * 64
OLD_IMG = "sha256:" + "0" * 64
T0 = "2024-05-01T10:00:00.100000000Z"   # Docker's StartedAt form (RFC 3339, nanoseconds, UTC)
T1 = "2024-05-01T10:00:01.200000000Z"
T2 = "2024-05-01T10:00:02.300000000Z"
T3 = "2024-05-01T10:05:00.400000000Z"


def app(name: str, labels: dict[str, str] | None = None, *, running: bool = True, started: str = T0,
        networks: dict[str, str] | None = None) -> ContainerInfo:
    base = {"mesh.enable": "true", COMPOSE_SERVICE: name, COMPOSE_PROJECT: "shop", "mesh.port": "8080"}
    base.update(labels or {})
    return ContainerInfo(id=f"app-{name}", name=name, labels=base, exposed_ports=(8080,),
                         networks=networks if networks is not None else {"shop_default": "172.20.0.5"},
                         running=running, started_at=started)


def sc(name: str, for_app: str | None, *, running: bool = True, started: str = T1, image: str = IMG) -> ContainerInfo:
    labels = {"mesh.owner": "meshd", "mesh.role": "sidecar"}
    if for_app is not None:
        labels[SIDECAR_FOR_LABEL] = f"app-{for_app}"
    return ContainerInfo(id=f"sc-{name}", name=name, labels=labels, running=running, started_at=started,
                         image=image, network_mode=f"container:app-{for_app}")


def plan(apps, sidecars, image_id=IMG):
    p = plan_sidecars(build_workloads(apps), sidecars, image_id)
    return ([wl.container.name for wl in p.create], sorted(c.name for c in p.remove),
            sorted(c.name for c in p.keep))


# (apps, sidecars, image id) -> (create app names, remove sidecar names, keep sidecar names)
CASES = {
    "one sidecar per running meshed app": (
        [app("orders"), app("catalog")], [], IMG,
        (["catalog", "orders"], [], [])),
    "stopped app gets none": (
        [app("orders", running=False), app("catalog")], [], IMG,
        (["catalog"], [], [])),
    "label error gets none": (
        [app("orders", {"mesh.port": "abc"}), app("catalog")], [], IMG,
        (["catalog"], [], [])),
    "not meshed gets none": (
        [app("db", {"mesh.enable": "false"})], [], IMG,
        ([], [], [])),
    "adopt running current sidecar": (
        [app("orders")], [sc("orders-mesh", "orders")], IMG,
        ([], [], ["orders-mesh"])),
    "adopt when image id unknown": (
        [app("orders")], [sc("orders-mesh", "orders", image=OLD_IMG)], None,
        ([], [], ["orders-mesh"])),
    "sidecar of an older meshd, its token in its environment: replaced": (
        [app("orders")], [dataclasses.replace(sc("orders-mesh", "orders"), token_in_env=True)], IMG,
        (["orders"], ["orders-mesh"], [])),
    "app gone": (
        [app("catalog")], [sc("orders-mesh", "orders"), sc("catalog-mesh", "catalog")], IMG,
        ([], ["orders-mesh"], ["catalog-mesh"])),
    "app stopped": (
        [app("orders", running=False)], [sc("orders-mesh", "orders")], IMG,
        ([], ["orders-mesh"], [])),
    "app has label errors": (
        [app("orders", {"mesh.protocol": "udp"})], [sc("orders-mesh", "orders")], IMG,
        ([], ["orders-mesh"], [])),
    "sidecar without owner app label": (
        [app("orders")], [sc("stray-mesh", None), sc("orders-mesh", "orders")], IMG,
        ([], ["stray-mesh"], ["orders-mesh"])),
    "duplicates: keep the newest": (
        [app("orders")],
        [sc("orders-mesh-a", "orders", started=T1), sc("orders-mesh-c", "orders", started=T3),
         sc("orders-mesh-b", "orders", started=T2)], IMG,
        ([], ["orders-mesh-a", "orders-mesh-b"], ["orders-mesh-c"])),
    "stopped sidecar replaced": (
        [app("orders")], [sc("orders-mesh", "orders", running=False)], IMG,
        (["orders"], ["orders-mesh"], [])),
    "stopped duplicate removed, running one kept": (
        [app("orders")], [sc("orders-mesh-old", "orders", running=False, started=T3),
                          sc("orders-mesh", "orders", started=T1)], IMG,
        ([], ["orders-mesh-old"], ["orders-mesh"])),
    "app restarted after its sidecar started": (
        [app("orders", started=T2)], [sc("orders-mesh", "orders", started=T1)], IMG,
        (["orders"], ["orders-mesh"], [])),
    "sidecar started after app restart is current": (
        [app("orders", started=T2)], [sc("orders-mesh", "orders", started=T3)], IMG,
        ([], [], ["orders-mesh"])),
    "sidecar runs an old image": (
        [app("orders")], [sc("orders-mesh", "orders", image=OLD_IMG)], IMG,
        (["orders"], ["orders-mesh"], [])),
    "old-image duplicate next to a current one": (
        [app("orders")], [sc("orders-mesh-old", "orders", image=OLD_IMG, started=T3),
                          sc("orders-mesh", "orders", started=T1)], IMG,
        ([], ["orders-mesh-old"], ["orders-mesh"])),
}


@pytest.mark.parametrize("apps, sidecars, image_id, expected", CASES.values(), ids=CASES.keys())
def test_plan_sidecars(apps, sidecars, image_id, expected):
    assert plan(apps, sidecars, image_id) == expected


@pytest.mark.parametrize("apps, sidecars, image_id, expected", CASES.values(), ids=CASES.keys())
def test_plan_accounts_for_every_sidecar_once(apps, sidecars, image_id, expected):
    p = plan_sidecars(build_workloads(apps), sidecars, image_id)
    handled = [c.id for c in p.remove] + [c.id for c in p.keep]
    assert sorted(handled) == sorted(c.id for c in sidecars)
    # never both keep and create for one app
    kept_apps = {c.labels[SIDECAR_FOR_LABEL] for c in p.keep}
    assert kept_apps.isdisjoint(wl.container.id for wl in p.create)


def test_plan_is_idempotent_after_applying():
    """Once the plan is carried out (fresh current sidecars started later), the next plan changes nothing."""
    apps = [app("orders"), app("catalog", started=T2)]
    first = plan_sidecars(build_workloads(apps), [sc("catalog-mesh", "catalog", started=T1)], IMG)
    started = [sc(f"{wl.container.name}-mesh", wl.container.name, started=T3) for wl in first.create]
    second = plan_sidecars(build_workloads(apps), started, IMG)
    assert (second.create, second.remove) == ((), ())
    assert sorted(c.name for c in second.keep) == ["catalog-mesh", "orders-mesh"]


def test_build_sidecar_env():
    orders = app("orders", {"mesh.port": "9090", "mesh.version": "v2", "mesh.protocol": "tcp",
                            "mesh.capture": "explicit"})
    [wl] = build_workloads([orders])
    env = build_sidecar_env(wl, "orders-mesh", "172.20.0.1", "example.org")
    assert env == {
        "MESH_CONTROL_URL": "wss://172.20.0.1:15012/v1/stream",
        "MESH_NODE": "orders-mesh",
        "MESH_CONTAINER": "app-orders",
        "MESH_SERVICE": "orders",
        "MESH_NAMESPACE": "shop",
        "MESH_VERSION": "v2",
        "MESH_APP_PORT": "9090",
        "MESH_PROTOCOL": "tcp",
        "MESH_CAPTURE": "explicit",
        "MESH_IDENTITY": "spiffe://example.org/ns/shop/sa/orders",
    }
    assert all(isinstance(v, str) for v in env.values())


def test_build_sidecar_env_defaults():
    [wl] = build_workloads([app("catalog", {"mesh.service": "products"})])
    env = build_sidecar_env(wl, "catalog-mesh", "10.9.0.1", "mesh.local")
    assert (env["MESH_SERVICE"], env["MESH_VERSION"], env["MESH_PROTOCOL"], env["MESH_CAPTURE"]) == \
        ("products", "v1", "http", "transparent")
    assert env["MESH_IDENTITY"] == "spiffe://mesh.local/ns/shop/sa/products"


@pytest.mark.parametrize("networks, gateways, expected", [
    ({"shop_default": "172.20.0.5"}, {"shop_default": "172.20.0.1"}, "172.20.0.1"),
    # a network without a known (bridge) gateway is skipped
    ({"host_overlay": "10.0.9.5", "shop_default": "172.20.0.5"}, {"shop_default": "172.20.0.1"}, "172.20.0.1"),
    # several bridges: the first by network name, whatever the dict order
    ({"zeta": "172.30.0.5", "alpha": "172.31.0.5"}, {"zeta": "172.30.0.1", "alpha": "172.31.0.1"}, "172.31.0.1"),
    ({"macvlan_net": "192.168.1.50"}, {"shop_default": "172.20.0.1"}, None),
    ({}, {"shop_default": "172.20.0.1"}, None),
])
def test_control_host_for(networks, gateways, expected):
    assert control_host_for(app("orders", networks=networks), gateways) == expected


@pytest.mark.parametrize("event, expected", [
    ({"Action": "kill", "Actor": {"ID": "a", "Attributes": {"signal": "15"}}}, True),
    ({"Action": "kill", "Actor": {"ID": "a", "Attributes": {"signal": "9"}}}, True),
    ({"Action": "kill", "Actor": {"ID": "a", "Attributes": {"signal": "1"}}}, False),   # SIGHUP: a reload
    ({"Action": "die", "Actor": {"ID": "a", "Attributes": {}}}, False),
    ({"Action": "kill"}, False),
])
def test_stop_signals_start_draining(event, expected):
    from meshd.app import is_stop_signal
    assert is_stop_signal(event) is expected


def test_restart_ends_draining():
    import asyncio
    from meshd.app import Meshd

    m = Meshd.__new__(Meshd)  # only the event bookkeeping, no Docker
    m.draining = {}
    m._dirty = asyncio.Event()
    m.note_event({"Action": "kill", "id": "c1", "Actor": {"ID": "c1", "Attributes": {"signal": "15"}}})
    assert "c1" in m.draining and m._dirty.is_set()
    m.note_event({"Action": "start", "id": "c1", "Actor": {"ID": "c1", "Attributes": {}}})
    assert "c1" not in m.draining


# ---- a restarted meshd holds its first snapshot until running sidecars have answered over mDNS ----

@pytest.mark.parametrize("expected, announced, elapsed, hold", [
    (set(), set(), 0.0, None),                      # first start, no sidecars yet: publish at once
    ({"a", "b"}, {"a", "b"}, 0.5, None),            # every running sidecar answered: publish
    ({"a", "b"}, {"a", "b", "c"}, 0.5, None),       # more answers than expected (a sidecar starting)
    ({"a", "b"}, {"a"}, 0.5, 4.5),                  # b not yet: hold the rest of the warm-up
    ({"a"}, set(), 4.9, pytest.approx(0.1)),
    ({"a"}, set(), 5.0, None),                      # warm-up over: publish what is known (b is gone)
    ({"a"}, set(), 60.0, None),
])
def test_hold_for_discovery(expected, announced, elapsed, hold):
    from meshd.app import DISCOVERY_WARMUP_S, hold_for_discovery
    assert DISCOVERY_WARMUP_S == 5.0
    assert hold_for_discovery(expected, announced, elapsed) == hold
