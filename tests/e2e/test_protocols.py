"""Protocols beyond plain HTTP/1.1 requests, end to end on real containers: a WebSocket (HTTP/1.1
Upgrade) on the default mesh.protocol, between two meshed containers over mTLS and from outside
through the gateway, each a conversation of 1,000 messages, while the app's port stays closed to a
direct connection; the upgrade is counted (response_code 101, tunnel bytes) and an established
WebSocket outlives a snapshot change; the shop's live order feed (a WebSocket) through the gateway.
gRPC: the demo's split per call on one channel, and errors as gRPC statuses (more in test_grpc.py)."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time

import aiohttp
import pytest

from .conftest import ADMIN, GATEWAY, PROJECT, compose, get_json, http, metric_sum, metrics, run, wait_for
from .lifecycle import ipv4, project, service_containers, wait_mesh_ok

pytestmark = pytest.mark.e2e


def meshctl(*args: str, check: bool = True):
    return run(["meshctl", *args], env={**os.environ, "COLUMNS": "250"}, check=check)

WP = "lcws"
CONVERSATION = 1000     # messages in one WebSocket conversation (the protocol issue's figure)
WS_CLIENT = """
import asyncio, sys
import aiohttp

async def main(url, n):
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(url) as ws:
            hosts = set()
            for i in range(n):
                await ws.send_str(f"m{i}")
                answer = await ws.receive_str(timeout=10)
                host, _, echoed = answer.partition(":")
                assert echoed == f"m{i}", answer
                hosts.add(host)
    print(len(hosts), n)

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


@pytest.fixture(scope="module")
def ws_project(mesh):
    project(WP, "down", file="websocket.yml", check=False)
    project(WP, "up", "-d", file="websocket.yml")
    try:
        wait_mesh_ok(what="the websocket project meshed")
        yield WP
    finally:
        project(WP, "down", file="websocket.yml", check=False)


def _sidecar_metrics(service: str) -> str:
    return "".join(metrics(ipv4(c)) for c in service_containers(WP, service))


def test_websocket_between_meshed_containers(ws_project):
    client = service_containers(WP, "wscli")[0]["Id"]
    started = time.monotonic()
    proc = run(["docker", "exec", client, "python3", "-c", WS_CLIENT, "ws://wsapp:8080/ws", str(CONVERSATION)],
               timeout=120)
    took = time.monotonic() - started
    # every echo over one tunnel, through the client's and the server's sidecars
    assert proc.stdout.split() == ["1", str(CONVERSATION)], proc.stdout + proc.stderr
    print(f"\nWebSocket through a sidecar pair: {CONVERSATION} echoes in {took:.2f} s (docker exec included)")

    def counted() -> bool:
        server, caller = _sidecar_metrics("wsapp"), _sidecar_metrics("wscli")
        return (metric_sum(server, "istio_requests_total", reporter="destination", source_workload="wscli",
                           response_code="101") >= 1
                and metric_sum(caller, "istio_requests_total", reporter="source", destination_service="wsapp",
                               response_code="101") >= 1
                and metric_sum(server, "istio_tcp_received_bytes_total", source_workload="wscli") > CONVERSATION * 2
                and metric_sum(caller, "istio_tcp_sent_bytes_total", destination_service="wsapp") > CONVERSATION * 2)

    wait_for(counted, 20, what="the upgrade counted (101) and its bytes by both sidecars")
    # The hop between the sidecars is mutual TLS: the server's inbound counted a verified caller.
    assert get_json(f"{ADMIN}/v1/status")["mtls"].get("wsapp") == "strict"


async def _conversation(url: str, n: int) -> set[str]:
    """n echoes on one WebSocket, each checked; the hosts that answered."""
    hosts = set()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        async with session.ws_connect(url) as ws:
            for i in range(n):
                await ws.send_str(f"m{i}")
                host, _, echoed = (await ws.receive_str(timeout=10)).partition(":")
                assert echoed == f"m{i}", (i, echoed)
                hosts.add(host)
    return hosts


DIRECT_PROBE = """
import socket, sys
try:
    conn = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
except OSError as exc:
    print("REFUSED", type(exc).__name__); sys.exit()
conn.settimeout(5)
conn.sendall(b"GET /ws HTTP/1.1\\r\\nHost: wsapp\\r\\nConnection: Upgrade\\r\\nUpgrade: websocket\\r\\n"
             b"Sec-WebSocket-Version: 13\\r\\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\\r\\n\\r\\n")
try:
    data = conn.recv(200)
except OSError as exc:
    print("DROPPED", type(exc).__name__); sys.exit()
print("ANSWERED", repr(data[:60]) if data else "nothing (closed)")
"""


def test_websocket_conversation_through_the_gateway_and_the_app_port_stays_closed(ws_project):
    started = time.monotonic()
    hosts = asyncio.run(_conversation(f"{GATEWAY}/wsapp/ws", CONVERSATION))
    took = time.monotonic() - started
    app = service_containers(WP, "wsapp")[0]
    assert hosts == {app["Config"]["Hostname"]}
    # A container that is no mesh member tries the same upgrade on the app's own port, directly: the
    # sidecar's inbound takes mutual TLS only, so no HTTP answer (least of all 101) comes back.
    probe = run(["docker", "run", "--rm", "--network", f"{WP}_default", "mesh-demo:latest", "python3", "-c",
                 DIRECT_PROBE, ipv4(app), "8080"], timeout=60).stdout.strip()
    print(f"\nWebSocket through the gateway: {CONVERSATION} echoes in {took:.2f} s; "
          f"a direct upgrade to {ipv4(app)}:8080 from an unmeshed container: {probe}")
    assert "HTTP/" not in probe, probe


async def _through_gateway_across_a_snapshot_change() -> list[str]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        async with session.ws_connect(f"{GATEWAY}/wsapp/ws") as ws:
            await ws.send_str("before")
            first = await ws.receive_str(timeout=10)
            version = get_json(f"{ADMIN}/v1/status")["meshd"]["snapshot_version"]
            # A second replica: a new snapshot for every node, the gateway's included.
            await asyncio.to_thread(project, WP, "up", "-d", "--scale", "wsapp=2", "--no-recreate",
                                    file="websocket.yml")
            await asyncio.to_thread(wait_for, lambda: get_json(f"{ADMIN}/v1/status")["meshd"]["snapshot_version"]
                                    > version, 60, 0.5, "a new snapshot")
            await ws.send_str("after")
            second = await ws.receive_str(timeout=10)
            return [first, second]


def test_websocket_through_the_gateway_outlives_a_snapshot_change(ws_project):
    first, second = asyncio.run(_through_gateway_across_a_snapshot_change())
    assert first.endswith(":before") and second.endswith(":after"), (first, second)
    assert first.split(":")[0] == second.split(":")[0]   # the same tunnel, to the same replica
    project(WP, "up", "-d", "--scale", "wsapp=1", file="websocket.yml")


# ---- the shop's live order feed: a WebSocket through the gateway -------------------------------------

async def _order_with_live_feed(order_id: str) -> tuple[int, dict, list[dict]]:
    """Subscribe to the shop's live feed through the gateway, place an order, collect its events."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        async with session.ws_connect(f"{GATEWAY}/api/orders/live") as ws:
            hello = await ws.receive_json(timeout=10)   # registered: every later order is told
            status, _, body = await asyncio.to_thread(http, "GET", f"{GATEWAY}/api/orders/{order_id}", None, None, 10)
            events: list[dict] = []
            while not events or events[-1]["status"] not in ("completed", "failed"):
                event = await ws.receive_json(timeout=10)
                if event.get("order") == order_id:
                    events.append(event)
            return status, hello, events


def test_the_shop_pushes_order_status_over_a_websocket_through_the_gateway(mesh):
    order_id = str(700_000 + secrets.randbelow(100_000))
    status, hello, events = asyncio.run(_order_with_live_feed(order_id))
    print(f"\nlive order feed through the gateway: {hello}; order {order_id}: {[e['status'] for e in events]}")
    assert hello["event"] == "subscribed" and hello["service"] == "orders", hello
    assert status == 200
    assert [e["status"] for e in events] == ["placed", "paid", "completed"], events


# ---- gRPC: the demo's second story on a gRPC service --------------------------------------------------

def _tally(calls: int) -> dict:
    status, _, body = http("GET", f"{GATEWAY}/api/catalog/recommendations/tally?calls={calls}", timeout=120)
    assert status == 200, body[:300]
    return json.loads(body)


def test_grpc_split_applies_per_call_on_one_channel(mesh):
    # Both versions answer calls made on the catalog's one gRPC channel (one HTTP/2 connection):
    # the mesh balances each call, not the connection.
    def both_versions() -> dict | None:
        tally = _tally(200)
        return tally if len(tally["answered_by_version"]) == 2 else None

    first = wait_for(both_versions, 60, interval=1.0, what="both recommendations versions answering on one channel")
    assert not first["failed"], first
    meshctl("split", "recommendations", "v1=90", "v2=10")
    try:
        tally = _tally(1000)
        assert not tally["failed"], tally
        v2 = tally["answered_by_version"].get("v2", 0)
        print(f"split 90/10 over 1000 calls on one channel: {tally['answered_by_version']}")
        assert 70 <= v2 <= 130, tally   # 10% +/- 3%
        # Counted per call by the callee's sidecars, with the caller's identity (mTLS) and version.
        def counted() -> float:
            return sum(metric_sum(metrics(ipv4(c)), "istio_requests_total", reporter="destination",
                                  source_workload="catalog", destination_service="recommendations",
                                  response_code="200")
                       for c in service_containers(PROJECT, "recommendations-v1")
                       + service_containers(PROJECT, "recommendations-v2"))
        assert counted() >= 1200
    finally:
        meshctl("split", "recommendations", "--clear", check=False)


def test_grpc_errors_from_the_mesh_are_grpc_statuses(mesh):
    # No healthy instance of the service: the caller's sidecar answers the call itself, and the gRPC
    # client reads UNAVAILABLE (not an HTTP 503 it cannot parse).
    compose("stop", "recommendations-v1", "recommendations-v2")
    try:
        def unavailable() -> dict | None:
            tally = _tally(5)
            return tally if tally["failed"].get("UNAVAILABLE") == 5 else None
        wait_for(unavailable, 60, interval=1.0, what="calls to a stopped gRPC service failing UNAVAILABLE")
    finally:
        compose("start", "recommendations-v1", "recommendations-v2")
        wait_for(lambda: not _tally(20)["failed"], 90, interval=1.0, what="recommendations back")
