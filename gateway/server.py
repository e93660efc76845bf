"""The gateway's external HTTP listener: the sidecar engine with the gateway's route and JWT layers.

Only the route differs from the sidecar's outbound chain: the request is matched against the
snapshot's gateway routes (`meshcore.snapshot.match_gateway_route`, through
`sidecar.routing.route_gateway`) instead of by Host, and a route with `auth=jwt` is checked by the
JWT layer after it; the traffic layers, balance, connect-retry and the pool are the outbound layers
themselves (`sidecar.proxy.build_outbound_stack`).
"""

from __future__ import annotations

import asyncio
import json

from sidecar.proxy import (
    HELD, NEXT, OUTBOUND_REQUEST_HEADERS, H_DROP, H_XFF, Exchange, Layer, ProxyState, Reply, Route, Stack,
    build_outbound_stack, serve_http,
)
from sidecar.datapath.http1 import HeaderLines
from sidecar.routing import Cluster, route_gateway

GATEWAY_SOURCE = "gateway"          # x-mesh-source of requests from outside, and source_workload
FLAG_NO_ROUTE = "NR"
FLAG_UNAUTHORIZED = "UAEX"          # Envoy's flag of a request refused by an authentication filter
_CLAIM_PREFIX = b"x-jwt-claim-"

# The outbound header actions, plus: x-forwarded-for noted (the client is appended to it),
# x-forwarded-proto and x-forwarded-host dropped (the gateway sets them).
GATEWAY_REQUEST_HEADERS = {**OUTBOUND_REQUEST_HEADERS, b"x-forwarded-for": H_XFF,
                           b"x-forwarded-proto": H_DROP, b"x-forwarded-host": H_DROP}


def route_by_gateway(down, ex: Exchange) -> Cluster | Reply:
    """Route layer: the gateway route matching Host and path; rewrites the path, sets x-forwarded-*."""
    host = ex.host.decode("latin-1") if ex.host is not None else ""
    path = ex.target.decode("latin-1")
    found = route_gateway(down.state.table, host, path)
    if found is None:
        body = json.dumps({"error": "no route", "host": host, "path": path}).encode() + b"\n"
        return Reply(404, FLAG_NO_ROUTE, body, b"application/json")
    cluster, route, upstream_path = found
    ex.route = route   # the JWT layer reads its auth settings
    max_body = down.listener.max_body
    if max_body and ex.body and declared_length(ex.lines) > max_body:   # limits: MESH_GATEWAY_MAX_BODY
        body = json.dumps({"error": "request body too large", "limit": max_body}).encode() + b"\n"
        ex.keep_alive = False   # answered and closed, not read to its end
        return Reply(413, "-", body, b"application/json")
    fields = HeaderLines(ex.lines)
    if fields.any_name(_is_claim):
        ex.lines = fields.without(_is_claim)   # a client never sets claims headers
    ex.target = upstream_path.encode("latin-1")
    client = down.peer_ip
    xff = ex.xff + b", " + client if ex.xff else client
    proto = b"https" if down.transport.get_extra_info("ssl_object") is not None else b"http"
    ex.add_fields(((b"x-forwarded-for", xff), (b"x-forwarded-proto", proto)))
    if ex.host:
        ex.add_field(b"x-forwarded-host", ex.host)
    return cluster


def _is_claim(name: bytes) -> bool:
    return name.startswith(_CLAIM_PREFIX)


def declared_length(lines: list) -> int:
    """The request's Content-Length (0 when it has none: chunked bodies are counted as they come)."""
    value = HeaderLines(lines).get(b"content-length")
    value = value.strip() if value is not None else b""
    return int(value) if value.isdigit() else 0


class CheckJwt(Layer):
    """JWT (gateway): a route with `auth=jwt` needs a valid bearer token from `verifier`
    (gateway.jwt_auth.JwtVerifier); its claims go upstream as headers, Authorization does not; else 401 UAEX."""

    def __init__(self, verifier):
        Layer.__init__(self, "jwt")
        self.verifier = verifier

    def on_request(self, down, ex: Exchange) -> int:
        route = ex.route
        if route is None or route.auth != "jwt":
            return NEXT
        try:
            checked = _check_jwt(ex, route, self.verifier)
        except Exception:  # noqa: BLE001 - a bug or an odd key fails this request only (JwtError is a 401)
            return self.failed(down, ex)
        if checked.__class__ is Reply:
            down._answer(ex, checked)
            return HELD
        ex.add_fields(checked)
        return NEXT


def _check_jwt(ex: Exchange, route, verifier) -> tuple | Reply:
    """The route wants a JWT: claims headers for a valid one (Authorization removed), else 401."""
    from gateway.jwt_auth import JwtError, claim_headers, www_authenticate

    token = None
    fields = HeaderLines(ex.lines)
    for name, value in fields:
        if name.lower() == b"authorization":
            scheme, _, credentials = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and credentials.strip():
                token = credentials.strip().decode("latin-1")
    try:
        if verifier is None:
            raise JwtError("no signing keys are configured")
        claims = verifier.verify(token, route.jwt_issuer, route.jwt_audience)
    except JwtError as exc:
        body = json.dumps({"error": "unauthorized", "reason": str(exc)}).encode() + b"\n"
        return Reply(401, FLAG_UNAUTHORIZED, body, b"application/json", headers=(www_authenticate(exc),))
    ex.lines = fields.without(b"authorization".__eq__)
    return claim_headers(claims)


def build_gateway_stack(state: ProxyState, jwt=None) -> Stack:
    """The outbound chain with the gateway's route and JWT layers and header actions (`jwt`: the
    JwtVerifier of routes with auth=jwt; none: such routes answer 401)."""
    return build_outbound_stack(state, route=Route(route_by_gateway, "route (gateway routes)"),
                                after_route=(CheckJwt(jwt),), source=GATEWAY_SOURCE, direction="gateway",
                                request_headers=GATEWAY_REQUEST_HEADERS)


async def start_gateway(state: ProxyState, host: str, port: int, ssl_context=None, jwt=None) -> asyncio.Server:
    """The external HTTP entry (MESH_GATEWAY_PORT, 8080), or HTTPS with `ssl_context` (8443)."""
    return await serve_http(state, host, port, build_gateway_stack(state, jwt), ssl_context=ssl_context)
