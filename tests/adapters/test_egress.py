"""Egress control on loopback: registry-only blocks HTTP, CONNECT and raw TCP passthrough (502 `EB`
or a reset, counted), what mesh.egress lists and the mesh's own services still pass."""

from __future__ import annotations

import asyncio
import json
from contextlib import AsyncExitStack
from dataclasses import replace

from aiohttp import web

from meshcore.egress import EGRESS_REGISTRY_ONLY
from meshd.metrics_hub import TelemetryHub, Target
from meshcore.snapshot import Snapshot
from sidecar.egress import BLACKHOLE, EGRESS_BLOCKED_METRIC
from sidecar.telemetry import render_metrics
from .loops import serve_on_loopback
from .test_proxy import SVC_PORT, Mesh, RawServer, echo_bytes, raw_call, sample, service


def set_egress(mesh: Mesh, entries: tuple[str, ...] | None, mode: str = EGRESS_REGISTRY_ONLY) -> None:
    """Push a snapshot to the outbound (frontend) with the egress `mode` and frontend's mesh.egress."""
    config = mesh.snapshot.config
    services = {**config.services, "frontend": replace(service("frontend", 9000), egress=entries)}
    mesh.out_state.apply_snapshot(Snapshot(version=2, config=replace(config, services=services, egress_mode=mode)))


def blocked(mesh: Mesh, destination: str, protocol: str) -> float | None:
    return sample(mesh.out_state, EGRESS_BLOCKED_METRIC + "_total", source_workload="frontend",
                  destination=destination, protocol=protocol)


async def _transparent_http():
    async with AsyncExitStack() as stack:
        mesh = await Mesh(stack).start(mode="transparent", original_dst=lambda t: ("127.0.0.1", app.port))
        app = mesh.app
        set_egress(mesh, None)
        request = b"GET /echo HTTP/1.1\r\nHost: api.example.test\r\n\r\n"
        (resp,), _ = await raw_call(mesh.out_port, request)
        assert resp["status"] == 502 and resp["headers"]["x-mesh-flags"] == "EB"
        assert b"api.example.test:%d" % app.port in resp["body"]
        assert app.peers == set()
        assert blocked(mesh, f"api.example.test:{app.port}", "http") == 1
        assert mesh.out_state.telemetry.request_count(destination_service=BLACKHOLE, response_flags="EB",
                                                      response_code="502") == 1
        # The mesh's own services are not egress: still reachable.
        (resp,), _ = await raw_call(mesh.out_port, b"GET /echo HTTP/1.1\r\nHost: payments:%d\r\n\r\n" % SVC_PORT)
        assert resp["status"] == 200
        # The Host's name, or the original destination's address, in mesh.egress lets it out.
        for entries in ((f"api.example.test:{app.port}",), ("*.example.test:*",), ("127.0.0.0/8:*",)):
            set_egress(mesh, entries)
            (resp,), _ = await raw_call(mesh.out_port, request)
            assert resp["status"] == 200, entries
            assert json.loads(resp["body"])["headers"]["host"] == "api.example.test"
        set_egress(mesh, ("api.example.test:1",))   # another port
        (resp,), _ = await raw_call(mesh.out_port, request)
        assert resp["status"] == 502
        set_egress(mesh, None, mode="allow-any")
        (resp,), _ = await raw_call(mesh.out_port, request)
        assert resp["status"] == 200


def test_registry_only_blocks_http_to_unlisted_destinations(run):
    run(_transparent_http)


async def _transparent_tcp():
    async with AsyncExitStack() as stack:
        echo = await RawServer(echo_bytes).start()
        stack.push_async_callback(echo.stop)
        mesh = await Mesh(stack).start(mode="transparent", original_dst=lambda t: ("127.0.0.1", echo.port),
                                       sniff_timeout=0.05)
        set_egress(mesh, ("db.example.test:*",))   # a name: never matches a raw connection's address
        for first in (b"\x00\x01binary", b""):      # client-first (not HTTP), then server-first (silence)
            reader, writer = await asyncio.open_connection("127.0.0.1", mesh.out_port)
            if first:
                writer.write(first)
            try:
                assert await reader.read(100) == b""
            except ConnectionResetError:
                pass   # the reset: as an unreachable destination
            writer.close()
        assert echo.connections == 0
        assert blocked(mesh, f"127.0.0.1:{echo.port}", "tcp") == 2
        set_egress(mesh, (f"127.0.0.1:{echo.port}",))
        reader, writer = await asyncio.open_connection("127.0.0.1", mesh.out_port)
        writer.write(b"\x00\x01binary")
        assert await reader.readexactly(8) == b"\x00\x01binary"
        writer.close()
        assert echo.connections == 1


def test_registry_only_resets_raw_tcp_passthrough(run):
    run(_transparent_tcp)


async def _explicit():
    async with AsyncExitStack() as stack:
        mesh = await Mesh(stack).start(mode="explicit")
        echo = await RawServer(echo_bytes).start()
        stack.push_async_callback(echo.stop)
        set_egress(mesh, (f"localhost:{mesh.app.port}",))
        get = b"GET http://127.0.0.1:%d/echo HTTP/1.1\r\nHost: localhost:%d\r\n\r\n" % (mesh.app.port, mesh.app.port)
        (resp,), _ = await raw_call(mesh.out_port, get)
        # The proxy dials the authority (127.0.0.1), so a permitted Host name does not let it out.
        assert resp["status"] == 502 and resp["headers"]["x-mesh-flags"] == "EB"
        (resp,), _ = await raw_call(mesh.out_port, get.replace(b"127.0.0.1", b"localhost"))
        assert resp["status"] == 200
        connect = b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (echo.port, echo.port)
        (resp,), closed = await raw_call(mesh.out_port, connect)
        assert resp["status"] == 502 and resp["headers"]["x-mesh-flags"] == "EB" and closed
        assert echo.connections == 0 and blocked(mesh, f"127.0.0.1:{echo.port}", "connect") == 1
        set_egress(mesh, (f"127.0.0.1:{echo.port}",))
        reader, writer = await asyncio.open_connection("127.0.0.1", mesh.out_port)
        writer.write(connect + b"tunnelled")
        assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 200 Connection Established\r\n\r\n"
        assert await reader.readexactly(9) == b"tunnelled"
        writer.close()


def test_registry_only_in_the_explicit_proxy(run):
    run(_explicit)


async def _events():
    async with AsyncExitStack() as stack:
        mesh = await Mesh(stack).start(mode="transparent", original_dst=lambda t: ("127.0.0.1", 9))
        set_egress(mesh, None)
        async def scrape(_req):
            return web.Response(body=render_metrics(mesh.out_state.telemetry))

        metrics = web.Application()
        metrics.router.add_get("/metrics", scrape)
        port = await serve_on_loopback(metrics, stack)
        target = Target(f"127.0.0.1:{port}", "frontend-1", "sidecar", "frontend", "v1", "shop")
        hub = TelemetryHub(None, targets=lambda: [target], adaptive=None)
        stack.push_async_callback(hub.stop)
        await hub.scrape_once()                     # the baseline
        for _ in range(3):
            (resp,), _ = await raw_call(mesh.out_port, b"GET / HTTP/1.1\r\nHost: api.example.test\r\n\r\n")
            assert resp["status"] == 502
        await hub.scrape_once()
        events = [e for e in hub.events.since() if e["kind"] == "egress_blocked"]
        assert len(events) == 1, events
        assert events[0]["service"] == "frontend" and "3 calls to api.example.test:9 blocked" in events[0]["message"]


def test_blocked_calls_become_meshd_events(run):
    run(_events)
