"""Protocols beyond plain HTTP/1.1 requests, end to end on real containers: a WebSocket (HTTP/1.1
Upgrade) on the default mesh.protocol, between two meshed containers over mTLS and from outside
through the gateway; the upgrade is counted (response_code 101, tunnel bytes) and an established
WebSocket outlives a snapshot change."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from .conftest import ADMIN, GATEWAY, get_json, metric_sum, metrics, run, wait_for
from .lifecycle import ipv4, project, service_containers, wait_mesh_ok

pytestmark = pytest.mark.e2e

WP = "lcws"
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
    proc = run(["docker", "exec", client, "python3", "-c", WS_CLIENT, "ws://wsapp:8080/ws", "50"], timeout=60)
    assert proc.stdout.split() == ["1", "50"], proc.stdout + proc.stderr   # 50 echoes over one tunnel

    def counted() -> bool:
        server, caller = _sidecar_metrics("wsapp"), _sidecar_metrics("wscli")
        return (metric_sum(server, "istio_requests_total", reporter="destination", source_workload="wscli",
                           response_code="101") >= 1
                and metric_sum(caller, "istio_requests_total", reporter="source", destination_service="wsapp",
                               response_code="101") >= 1
                and metric_sum(server, "istio_tcp_received_bytes_total", source_workload="wscli") > 50 * 2
                and metric_sum(caller, "istio_tcp_sent_bytes_total", destination_service="wsapp") > 50 * 2)

    wait_for(counted, 20, what="the upgrade counted (101) and its bytes by both sidecars")
    # The hop between the sidecars is mutual TLS: the server's inbound counted a verified caller.
    assert get_json(f"{ADMIN}/v1/status")["mtls"].get("wsapp") == "strict"


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
