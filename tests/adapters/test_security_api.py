"""meshd's admin API credential and the policy endpoints (aiohttp test server, a Store in tmp)."""

from __future__ import annotations

import os
import stat

import aiohttp
from aiohttp import web

from meshd.security_api import (
    PolicyBook, add_policy_routes, admin_auth_middleware, load_or_create_admin_token,
)
from meshd.store import Store
from meshctl.api import load_admin_token


async def test_admin_token_required_and_policy_routes(tmp_path, monkeypatch):
    token = load_or_create_admin_token(str(tmp_path))
    path = tmp_path / "admin.token"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and len(token) >= 32
    assert load_or_create_admin_token(str(tmp_path)) == token          # kept across restarts
    monkeypatch.delenv("MESHD_ADMIN_TOKEN", raising=False)
    assert load_admin_token(str(path)) == token                        # what meshctl reads
    book = PolicyBook(Store(str(tmp_path / "state.db")))
    versions = iter(range(10, 20))

    async def republish():
        return next(versions)

    app = web.Application(middlewares=[admin_auth_middleware(token)])
    add_policy_routes(app, book, republish)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with aiohttp.ClientSession() as s:
            for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": token}):
                async with s.get(f"{base}/v1/policies", headers=headers) as r:
                    assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
            auth = {"Authorization": f"Bearer {token}"}
            async with s.post(f"{base}/v1/policies/rules", json={"action": "deny", "source": "orders",
                                                                 "destination": "payments"}, headers=auth) as r:
                body = await r.json()
                assert r.status == 200 and body["version"] == 10 and body["rules"][0]["action"] == "deny"
            async with s.post(f"{base}/v1/policies/rules", json={"action": "deny", "source": "Bad",
                                                                 "destination": "payments"}, headers=auth) as r:
                assert r.status == 400 and "source" in (await r.json())["error"]
            async with s.put(f"{base}/v1/policies/default", json={"default": "deny"}, headers=auth) as r:
                assert (await r.json())["default"] == "deny"
            async with s.post(f"{base}/v1/policies/remove", json={"source": "orders", "destination": "payments"},
                              headers=auth) as r:
                assert (await r.json())["removed"] == 1
        # persisted: a new book over the same store sees the default
        assert PolicyBook(Store(str(tmp_path / "state.db"))).policy.default == "deny"
    finally:
        await runner.cleanup()
