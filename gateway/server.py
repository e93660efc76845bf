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
    cluster, _route, upstream_path = found
    ex.target = upstream_path.encode("latin-1")
    client = down.peer_ip
    xff = ex.xff + b", " + client if ex.xff else client
    extra = b"x-forwarded-for: %b\r\nx-forwarded-proto: http\r\n" % xff
    if ex.host:
        extra += b"x-forwarded-host: %b\r\n" % ex.host
    ex.extra = extra
    return cluster


def build_gateway_stack(state: ProxyState) -> Stack:
    """The outbound stack with the gateway's route layer and header actions."""
    return build_outbound_stack(state, route=route_by_gateway, source=GATEWAY_SOURCE, direction="gateway",
                                request_headers=GATEWAY_REQUEST_HEADERS)


async def start_gateway(state: ProxyState, host: str, port: int) -> asyncio.Server:
    """The external HTTP entry (MESH_GATEWAY_PORT, 8080)."""
    return await serve_http(state, host, port, build_gateway_stack(state))
