"""The shop's live order feed (demo/shop.py, orders role): a WebSocket of order status events, on
loopback with no mesh (the order's downstream calls fail here, which is an event too)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("grpc")   # shop.py imports grpc for its catalog role

DEMO = Path(__file__).resolve().parents[2] / "demo"
sys.path.insert(0, str(DEMO))
import shop  # noqa: E402  (demo/ is a folder of scripts, not a package)


@pytest.fixture
async def orders(monkeypatch):
    from aiohttp import ClientTimeout
    from aiohttp.test_utils import TestClient, TestServer

    monkeypatch.setattr(shop, "ROLE", "orders")
    monkeypatch.setattr(shop, "TIMEOUT", ClientTimeout(total=2))
    client = TestClient(TestServer(shop.make_app("orders"), host="127.0.0.1"))
    await client.start_server()
    yield client
    await client.close()


@pytest.mark.parametrize("path", ["/api/orders/live", "/orders/live", "/live"])
async def test_live_feed_tells_every_subscriber_of_an_order(orders, path):
    first, second = await orders.ws_connect(path), await orders.ws_connect(path)
    for ws in (first, second):
        assert (await ws.receive_json(timeout=5))["event"] == "subscribed"
    # No inventory service on loopback: the order fails at its first downstream call.
    resp = await orders.get("/api/orders/42")
    assert resp.status == 502 and (await resp.json())["failed"] == "inventory"
    for ws in (first, second):
        placed, failed = await ws.receive_json(timeout=5), await ws.receive_json(timeout=5)
        assert (placed["order"], placed["status"]) == ("42", "placed")
        assert (failed["order"], failed["status"], failed["failed"]) == ("42", "failed", "inventory")
    await first.close()
    resp = await orders.get("/api/orders/43")       # a closed subscriber is dropped, the other still told
    assert resp.status == 502
    assert (await second.receive_json(timeout=5))["order"] == "43"
    await second.close()


async def test_an_order_id_named_live_is_the_feed_not_an_order(orders):
    resp = await orders.get("/api/orders/live")     # no Upgrade: not a WebSocket request
    assert resp.status == 400
