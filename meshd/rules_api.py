"""Live traffic rules (split, route, fault, mirror): validated, persisted, pushed in the snapshot."""

from __future__ import annotations

import dataclasses
from typing import Awaitable, Callable

from aiohttp import web

from meshcore.routing_rules import (
    ServiceRules, decode_rules, encode_rules, validate_fault, validate_mirror, validate_route,
    validate_split,
)

from meshcore.snapshot import ServiceNameError, resolve_or_keep

from .store import Store

STORE_KEY = "rules"


class RulesBook:
    """Every service's live rules, kept in meshd's store (they survive a meshd restart)."""

    def __init__(self, store: Store):
        self.store = store
        self.rules: dict[str, ServiceRules] = {}
        for service, raw in (store.get(STORE_KEY, {}) or {}).items():
            try:
                self.rules[service] = decode_rules(raw)
            except ValueError:
                continue  # a record from an incompatible version: dropped rather than pushed broken

    def get(self, service: str) -> ServiceRules:
        """The rules of `service` (empty when none were set)."""
        return self.rules.get(service) or ServiceRules(service=service)

    def put(self, rules: ServiceRules) -> None:
        """Replace a service's rules and persist all of them."""
        if rules == ServiceRules(service=rules.service):
            self.rules.pop(rules.service, None)
        else:
            self.rules[rules.service] = rules
        self.store.put(STORE_KEY, {s: encode_rules(r) for s, r in sorted(self.rules.items())})


def apply_change(current: ServiceRules, kind: str, body: dict, versions: set[str]) -> ServiceRules:
    """The rules after one change from meshctl (pure); raises ValueError with a message for the user."""
    service = current.service
    if kind == "split":
        weights = body.get("weights")
        if not isinstance(weights, dict) or not weights:
            raise ValueError("split: give weights like v1=90 v2=10")
        split = validate_split(service, weights, versions)
        # A split that sends everything to one version is still a rule; "clear" removes it.
        return dataclasses.replace(current, split=split)
    if kind == "split-clear":
        return dataclasses.replace(current, split=None)
    if kind == "route":
        to = body.get("to")
        headers = body.get("headers") or {}
        if not isinstance(headers, dict):
            raise ValueError("route: headers must be NAME=VALUE pairs")
        rule = validate_route(service, to, versions, tuple(headers.items()), body.get("path_prefix"))
        return dataclasses.replace(current, routes=current.routes + (rule,))
    if kind == "route-clear":
        return dataclasses.replace(current, routes=())
    if kind == "fault":
        return dataclasses.replace(current, fault=validate_fault(body.get("abort"), body.get("delay")))
    if kind == "fault-clear":
        return dataclasses.replace(current, fault=None)
    if kind == "mirror":
        mirror = validate_mirror(service, body.get("to"), versions, body.get("percent", 100))
        return dataclasses.replace(current, mirror=mirror)
    if kind == "mirror-clear":
        return dataclasses.replace(current, mirror=None)
    raise ValueError(f"unknown change {kind!r}")


KINDS = ("split", "split-clear", "route", "route-clear", "fault", "fault-clear", "mirror", "mirror-clear")


def add_routes(app: web.Application, book: RulesBook, versions_of: Callable[[str], set[str] | None],
               publish: Callable[[], Awaitable[int]], resolve: Callable[[str], str] = str) -> None:
    """GET /v1/rules[/{service}] and POST /v1/rules/{service}/{kind} on meshd's admin API.

    `resolve(name)` gives the snapshot key a user's name means (`web`, `web.shop`) or raises
    ServiceNameError; rules are kept by key. `versions_of(key)` gives the versions meshd knows of
    (None: no such service); `publish()` rebuilds and pushes, returning the snapshot version that
    carries the change.
    """
    async def list_all(_req: web.Request) -> web.Response:
        return web.json_response({"rules": {s: encode_rules(r) for s, r in sorted(book.rules.items())}})

    async def show(req: web.Request) -> web.Response:
        service = req.match_info["service"]
        try:
            service = resolve_or_keep(resolve, service)
        except ServiceNameError as exc:   # ambiguous
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"rules": encode_rules(book.get(service))})

    async def change(req: web.Request) -> web.Response:
        service, kind = req.match_info["service"], req.match_info["kind"]
        if kind not in KINDS:
            return web.json_response({"error": f"unknown change {kind!r}; one of {', '.join(KINDS)}"}, status=404)
        try:
            service = resolve(service)
        except ServiceNameError as exc:
            return web.json_response({"error": str(exc)}, status=400 if exc.choices else 404)
        versions = versions_of(service)
        if versions is None:
            return web.json_response({"error": f"no mesh service named {service!r}"}, status=404)
        try:
            body = await req.json() if req.can_read_body else {}
        except ValueError:
            return web.json_response({"error": "the request body is not JSON"}, status=400)
        if not isinstance(body, dict):
            return web.json_response({"error": "the request body must be a JSON object"}, status=400)
        try:
            rules = apply_change(book.get(service), kind, body, versions)
        except ValueError as exc:
            # Refused before anything is stored or pushed.
            return web.json_response({"error": str(exc)}, status=400)
        book.put(rules)
        version = await publish()
        return web.json_response({"rules": encode_rules(rules), "version": version})

    app.router.add_get("/v1/rules", list_all)
    app.router.add_get("/v1/rules/{service}", show)
    app.router.add_post("/v1/rules/{service}/{kind}", change)
