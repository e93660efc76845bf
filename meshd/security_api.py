"""Admin API of zero trust: the admin credential, authorization policies, certificates and rotations.

- Every admin request needs `Authorization: Bearer <token>`; the token is random, written by meshd to
  `<state dir>/admin.token` (mode 0600) and read by meshctl (MESHD_ADMIN_TOKEN, --token-file, or the
  file). A request without it gets 401. The admin API listens on 127.0.0.1 only.
- `GET /v1/policies`, `POST /v1/policies/rules` {action, source, destination, path?, method?},
  `POST /v1/policies/remove` {source, destination, path?, method?, action?}, `PUT /v1/policies/default`
  {default}: persisted in the store, pushed in the snapshot (`policies`); answers carry the snapshot
  `version` that holds the change.
- `GET /v1/certs`, `POST /v1/certs/rotate` {root: bool} (202), `GET /v1/certs/rotation`.
"""

from __future__ import annotations

import dataclasses
import hmac
import os
import secrets
from typing import Awaitable, Callable

from aiohttp import web

from certs.store import write_file_atomic
from meshcore.authz import (
    ANY, DEFAULT_POLICY, GATEWAY_SOURCE, Policy, PolicyError, Rule, add_rule, decode_policy, encode_policy,
    make_rule, remove_rules,
)
from meshcore.snapshot import ServiceNameError, resolve_or_keep

from .store import Store
from .dashboard import PUBLIC_PATHS

TOKEN_FILE = "admin.token"
STORE_KEY = "authz_policy"


def load_or_create_admin_token(state_dir: str) -> str:
    """The admin token in `<state_dir>/admin.token` (created 0600 with 256 random bits if missing)."""
    path = os.path.join(state_dir, TOKEN_FILE)
    try:
        with open(path, encoding="ascii") as f:
            token = f.read().strip()
        if len(token) >= 32:
            os.chmod(path, 0o600)
            return token
    except (OSError, UnicodeDecodeError):
        pass
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    token = secrets.token_urlsafe(32)
    write_file_atomic(path, token.encode("ascii") + b"\n", 0o600)
    return token


def admin_auth_middleware(token: str):
    """401 for any request without the admin bearer token (constant-time comparison)."""
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def check(request: web.Request, handler):
        if request.method == "GET" and request.path in PUBLIC_PATHS:
            return await handler(request)  # the dashboard's static files; its data calls carry the token
        got = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(got, expected):
            return web.json_response({"error": "unauthorized: meshctl needs meshd's admin token "
                                               "(MESHD_ADMIN_TOKEN or --token-file <state dir>/admin.token)"},
                                     status=401, headers={"WWW-Authenticate": 'Bearer realm="meshd"'})
        return await handler(request)

    return check


class PolicyBook:
    """The mesh's authorization policy, kept in meshd's store."""

    def __init__(self, store: Store):
        self.store = store
        try:
            self.policy = decode_policy(store.get(STORE_KEY)) if store.get(STORE_KEY) else DEFAULT_POLICY
        except PolicyError:
            self.policy = DEFAULT_POLICY

    def put(self, policy: Policy) -> None:
        self.policy = policy
        self.store.put(STORE_KEY, encode_policy(policy))


async def _body(request: web.Request) -> dict:
    try:
        body = await request.json()
    except ValueError:
        raise web.HTTPBadRequest(text='{"error": "body must be a JSON object"}', content_type="application/json")
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text='{"error": "body must be a JSON object"}', content_type="application/json")
    return body


def _error(message: str, status: int = 400) -> web.Response:
    return web.json_response({"error": message}, status=status)


def resolve_rule_names(rule: Rule, resolve: Callable[[str], str]) -> Rule:
    """`rule` with its source and destination as the snapshot keys they mean (`web.shop` -> `web` when
    shop holds the name bare); a name of no service now is kept as written, an ambiguous one raises
    ServiceNameError naming the choices."""
    def key(name: str) -> str:
        if name in (ANY, GATEWAY_SOURCE):
            return name
        return resolve_or_keep(resolve, name)
    return dataclasses.replace(rule, source=key(rule.source), destination=key(rule.destination))


def add_policy_routes(app: web.Application, book: PolicyBook, republish: Callable[[], Awaitable[int]],
                      resolve: Callable[[str], str] = str) -> None:
    async def get_policies(_req):
        return web.json_response(encode_policy(book.policy))

    async def add(req):
        body = await _body(req)
        try:
            rule = resolve_rule_names(make_rule(body.get("action"), body.get("source"), body.get("destination"),
                                                body.get("path"), body.get("method")), resolve)
        except (PolicyError, ServiceNameError) as exc:
            return _error(str(exc))
        book.put(add_rule(book.policy, rule))
        version = await republish()
        return web.json_response({**encode_policy(book.policy), "version": version})

    async def remove(req):
        body = await _body(req)
        try:
            probe = resolve_rule_names(make_rule(body.get("action") or "allow", body.get("source"),
                                                 body.get("destination"), body.get("path"), body.get("method")),
                                       resolve)
        except (PolicyError, ServiceNameError) as exc:
            return _error(str(exc))
        policy, n = remove_rules(book.policy, probe.source, probe.destination, probe.path, probe.method,
                                 body.get("action"))
        if n == 0:
            return _error("no such rule", 404)
        book.put(policy)
        version = await republish()
        return web.json_response({**encode_policy(book.policy), "removed": n, "version": version})

    async def set_default(req):
        body = await _body(req)
        default = body.get("default")
        if default not in ("allow", "deny"):
            return _error(f"default: {default!r} is not allow or deny")
        book.put(Policy(default=default, rules=book.policy.rules))
        version = await republish()
        return web.json_response({**encode_policy(book.policy), "version": version})

    app.router.add_get("/v1/policies", get_policies)
    app.router.add_post("/v1/policies/rules", add)
    app.router.add_post("/v1/policies/remove", remove)
    app.router.add_put("/v1/policies/default", set_default)


def add_cert_routes(app: web.Application, pki, hub) -> None:
    async def certs(_req):
        connected = {n.node: n.connected for n in hub.nodes.values()}
        return web.json_response(pki.describe(connected))

    async def rotate(req):
        body = await _body(req)
        root = body.get("root", False)
        if not isinstance(root, bool):
            return _error("root: expected true or false")
        try:
            rot = pki.start_rotation(hub, root)
        except RuntimeError as exc:
            return _error(str(exc), 409)
        return web.json_response(rot.to_dict(), status=202)

    async def rotation(_req):
        if pki.rotation is None:
            return _error("no rotation yet", 404)
        return web.json_response(pki.rotation.to_dict())

    app.router.add_get("/v1/certs", certs)
    app.router.add_post("/v1/certs/rotate", rotate)
    app.router.add_get("/v1/certs/rotation", rotation)
