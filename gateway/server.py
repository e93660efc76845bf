"""The gateway's external HTTP listener: the sidecar engine with a gateway route layer.

Only the route layer differs from the sidecar's outbound stack: the request is matched against the
snapshot's gateway routes (`meshcore.snapshot.match_gateway_route`, through
`sidecar.routing.route_gateway`) instead of by Host; balance, connect-retry and the pool are the
outbound layers themselves (`sidecar.proxy.build_outbound_stack`).
"""

from __future__ import annotations

import asyncio
import json

from sidecar.proxy import (
    OUTBOUND_REQUEST_HEADERS, H_DROP, H_XFF, Exchange, ProxyState, Reply, Stack, build_outbound_stack, serve_http,
)
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
    max_body = down.listener.max_body
    if max_body and ex.body and declared_length(ex.lines) > max_body:   # limits: MESH_GATEWAY_MAX_BODY
        body = json.dumps({"error": "request body too large", "limit": max_body}).encode() + b"\n"
        ex.keep_alive = False   # answered and closed, not read to its end
        return Reply(413, "-", body, b"application/json")
    claims = b""
    if any(ex.lines[i][:len(_CLAIM_PREFIX)].lower() == _CLAIM_PREFIX for i in range(0, len(ex.lines), 4)):
        ex.lines = _without(ex.lines, lambda name: name[:len(_CLAIM_PREFIX)].lower() == _CLAIM_PREFIX)
    if route.auth == "jwt":
        denied = _check_jwt(down, ex, route)
        if denied.__class__ is Reply:
            return denied
        claims = denied
    ex.target = upstream_path.encode("latin-1")
    client = down.peer_ip
    xff = ex.xff + b", " + client if ex.xff else client
    proto = b"https" if down.transport.get_extra_info("ssl_object") is not None else b"http"
    extra = b"x-forwarded-for: %b\r\nx-forwarded-proto: %b\r\n" % (xff, proto)
    if ex.host:
        extra += b"x-forwarded-host: %b\r\n" % ex.host
    ex.extra = extra + claims
    return cluster


def declared_length(lines: list) -> int:
    """The request's Content-Length (0 when it has none: chunked bodies are counted as they come)."""
    for i in range(0, len(lines), 4):
        if lines[i].lower() == b"content-length":
            value = lines[i + 2].strip()
            return int(value) if value.isdigit() else 0
    return 0


def _without(lines: list, drop) -> list:
    out: list = []
    for i in range(0, len(lines), 4):
        if not drop(lines[i]):
            out += lines[i:i + 4]
    return out


def _check_jwt(down, ex: Exchange, route) -> bytes | Reply:
    """The route wants a JWT: claims headers for a valid one (Authorization removed), else 401."""
    from gateway.jwt_auth import JwtError, claim_headers, www_authenticate

    token = None
    for i in range(0, len(ex.lines), 4):
        if ex.lines[i].lower() == b"authorization":
            scheme, _, value = ex.lines[i + 2].strip().partition(b" ")
            if scheme.lower() == b"bearer" and value.strip():
                token = value.strip().decode("latin-1")
    verifier = getattr(down.state, "jwt", None)
    try:
        if verifier is None:
            raise JwtError("no signing keys are configured")
        claims = verifier.verify(token, route.jwt_issuer, route.jwt_audience)
    except JwtError as exc:
        body = json.dumps({"error": "unauthorized", "reason": str(exc)}).encode() + b"\n"
        return Reply(401, FLAG_UNAUTHORIZED, body, b"application/json", headers=www_authenticate(exc))
    ex.lines = _without(ex.lines, lambda name: name.lower() == b"authorization")
    return claim_headers(claims)


def build_gateway_stack(state: ProxyState) -> Stack:
    """The outbound stack with the gateway's route layer and header actions."""
    return build_outbound_stack(state, route=route_by_gateway, source=GATEWAY_SOURCE, direction="gateway",
                                request_headers=GATEWAY_REQUEST_HEADERS)


async def start_gateway(state: ProxyState, host: str, port: int, ssl_context=None) -> asyncio.Server:
    """The external HTTP entry (MESH_GATEWAY_PORT, 8080), or HTTPS with `ssl_context` (8443)."""
    return await serve_http(state, host, port, build_gateway_stack(state), ssl_context=ssl_context)
