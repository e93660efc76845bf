"""meshd's live rules: the pure change function, the persisted book, and the admin endpoints."""

from __future__ import annotations

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from meshcore.routing_rules import ServiceRules
from meshd.rules_api import RulesBook, add_routes, apply_change
from meshd.store import Store

VERSIONS = {"v1", "v2"}


@pytest.mark.parametrize("kind, body, check", [
    ("split", {"weights": {"v1": 90, "v2": 10}}, lambda r: r.split.weights == (("v1", 90), ("v2", 10))),
    ("route", {"to": "v2", "headers": {"x-user-group": "beta"}},
     lambda r: r.routes[0].to_version == "v2" and r.routes[0].match_headers == (("x-user-group", "beta"),)),
    ("fault", {"abort": "50:503"}, lambda r: r.fault.abort_percent == 50 and r.fault.abort_status == 503),
    ("fault", {"delay": "100:1s"}, lambda r: r.fault.delay_s == 1.0),
    ("mirror", {"to": "v2", "percent": 100}, lambda r: r.mirror.to_version == "v2"),
])
def test_apply_change_accepts(kind, body, check):
    assert check(apply_change(ServiceRules(service="catalog"), kind, body, VERSIONS))


@pytest.mark.parametrize("kind, body, words", [
    ("split", {"weights": {"v1": 90, "v2": 20}}, "100"),
    ("split", {"weights": {"v1": 90, "v3": 10}}, "v3"),
    ("split", {}, "weights"),
    ("route", {"to": "v9"}, "v9"),
    ("route", {"to": "v2", "headers": "x"}, "NAME=VALUE"),
    ("fault", {}, "abort"),
    ("fault", {"abort": "150:503"}, "150"),
    ("mirror", {"to": "v7"}, "v7"),
    ("bogus", {}, "bogus"),
])
def test_apply_change_refuses_with_a_clear_message(kind, body, words):
    with pytest.raises(ValueError) as exc:
        apply_change(ServiceRules(service="catalog"), kind, body, VERSIONS)
    assert words in str(exc.value)


def test_routes_append_in_order_and_clear():
    rules = ServiceRules(service="catalog")
    rules = apply_change(rules, "route", {"to": "v2", "headers": {"x-a": "1"}}, VERSIONS)
    rules = apply_change(rules, "route", {"to": "v1", "path_prefix": "/old"}, VERSIONS)
    assert [r.to_version for r in rules.routes] == ["v2", "v1"]
    assert apply_change(rules, "route-clear", {}, VERSIONS).routes == ()


def test_book_persists_across_reopen(tmp_path):
    store = Store(str(tmp_path / "state.db"))
    book = RulesBook(store)
    book.put(apply_change(book.get("catalog"), "split", {"weights": {"v1": 90, "v2": 10}}, VERSIONS))
    store.close()
    again = RulesBook(Store(str(tmp_path / "state.db")))
    assert again.get("catalog").split.weights == (("v1", 90), ("v2", 10))
    again.put(apply_change(again.get("catalog"), "split-clear", {}, VERSIONS))
    assert "catalog" not in again.rules


async def test_admin_endpoints_refuse_bad_changes_and_push_nothing(tmp_path):
    book = RulesBook(Store(str(tmp_path / "state.db")))
    published = []

    async def publish():
        published.append(len(published) + 1)
        return published[-1]

    app = web.Application()
    add_routes(app, book, lambda s: VERSIONS if s == "catalog" else None, publish)
    async with TestClient(TestServer(app)) as client:
        await _exercise(client, book, published)


async def _exercise(client, book, published):
    bad = await client.post("/v1/rules/catalog/split", json={"weights": {"v1": 90, "v2": 20}})
    assert bad.status == 400 and "100" in (await bad.json())["error"]
    unknown = await client.post("/v1/rules/nosuch/split", json={"weights": {"v1": 100}})
    assert unknown.status == 404 and "nosuch" in (await unknown.json())["error"]
    assert published == [] and book.rules == {}
    good = await client.post("/v1/rules/catalog/split", json={"weights": {"v1": 90, "v2": 10}})
    assert good.status == 200 and (await good.json())["version"] == 1
    shown = await (await client.get("/v1/rules/catalog")).json()
    assert shown["rules"]["split"]["weights"] == [["v1", 90], ["v2", 10]]
