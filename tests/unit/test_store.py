"""meshd.store (SQLite key/value state) and meshd.app.config_digest (what moves the snapshot version)."""

from __future__ import annotations

import threading

import pytest

from meshcore.snapshot import Endpoint, GatewayRoute, MeshConfig, ServiceConfig
from meshd.app import config_digest
from meshd.store import Store


@pytest.fixture
def store(tmp_path):
    s = Store(str(tmp_path / "state.db"))
    yield s
    s.close()


@pytest.mark.parametrize("value", [7, 0, "abc", "", 1.5, True, None, [1, "a", None], {"a": {"b": [1, 2]}}])
def test_put_get_round_trip(store, value):
    store.put("k", value)
    assert store.get("k", "DEFAULT") == value


def test_get_default_and_overwrite(store):
    assert store.get("missing") is None
    assert store.get("missing", 42) == 42
    store.put("snapshot_version", 1)
    store.put("snapshot_version", 2)
    assert store.get("snapshot_version") == 2
    store.put("other", "x")
    assert store.get("snapshot_version") == 2 and store.get("other") == "x"


def test_persists_across_reopen(tmp_path):
    path = str(tmp_path / "nested" / "dir" / "state.db")   # directories made on demand
    s = Store(path)
    s.put("snapshot_version", 17)
    s.put("snapshot_digest", "ab" * 32)
    s.close()
    s2 = Store(path)
    try:
        assert s2.get("snapshot_version") == 17
        assert s2.get("snapshot_digest") == "ab" * 32
        s2.put("snapshot_version", 18)
    finally:
        s2.close()
    s3 = Store(path)
    try:
        assert s3.get("snapshot_version") == 18
    finally:
        s3.close()


def test_threads(store):
    def work(i):
        for j in range(50):
            store.put(f"t{i}", j)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [store.get(f"t{i}") for i in range(4)] == [49] * 4


# ---- config_digest --------------------------------------------------------------------------------

ID = "spiffe://mesh.local/ns/shop/sa/"


def config(**over) -> MeshConfig:
    services = over.get("services") or {
        "orders": ServiceConfig("orders", "shop", "http", 8080, ID + "orders", ("orders-api",)),
        "catalog": ServiceConfig("catalog", "shop", "tcp", 9000, ID + "catalog"),
    }
    endpoints = over.get("endpoints") or {
        "orders": (Endpoint("a" * 64, "172.20.0.5", 15006, "v1", ID + "orders"),
                   Endpoint("b" * 64, "172.20.0.6", 15006, "v2", ID + "orders")),
    }
    routes = over.get("routes", (GatewayRoute("orders", "/orders", None, True),))
    return MeshConfig(services=services, endpoints=endpoints, gateway_routes=routes)


def test_digest_stable_for_equal_configs():
    a = config()
    b = config(services=dict(reversed(list(config().services.items()))))   # other dict order, same content
    assert a == b
    assert config_digest(a) == config_digest(b) == config_digest(config())
    assert len(config_digest(a)) == 64 and int(config_digest(a), 16) >= 0


def test_digest_of_empty_config():
    assert config_digest(MeshConfig()) == config_digest(MeshConfig())
    assert config_digest(MeshConfig()) != config_digest(config())


def _changed():
    base = config()
    eps = base.endpoints["orders"]
    return {
        "endpoint address": config(endpoints={"orders": (eps[0], Endpoint("b" * 64, "172.20.0.7", 15006, "v2",
                                                                           ID + "orders"))}),
        "endpoint version": config(endpoints={"orders": (eps[0], Endpoint("b" * 64, "172.20.0.6", 15006, "v3",
                                                                          ID + "orders"))}),
        "endpoint gone": config(endpoints={"orders": eps[:1]}),
        "service port": config(services={**base.services,
                                         "catalog": ServiceConfig("catalog", "shop", "tcp", 9001, ID + "catalog")}),
        "alias": config(services={**base.services,
                                  "orders": ServiceConfig("orders", "shop", "http", 8080, ID + "orders")}),
        "route strip": config(routes=(GatewayRoute("orders", "/orders", None, False),)),
        "no routes": config(routes=()),
    }


@pytest.mark.parametrize("name", list(_changed()))
def test_digest_differs_for_different_configs(name):
    other = _changed()[name]
    assert other != config()
    assert config_digest(other) != config_digest(config())
