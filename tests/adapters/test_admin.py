"""The node admin port (sidecar/admin.py) on loopback: routes, status codes, content types, and the
HTTP/1.1 edges (keep-alive, pipelining, HEAD, 400/404/405/413/431), on asyncio and uvloop."""

from __future__ import annotations

import asyncio
import contextlib
import json
from types import SimpleNamespace

import aiohttp

from meshcore.snapshot import MeshConfig, Snapshot, encode_snapshot
from sidecar.admin import MAX_BODY, MAX_HEAD, build_admin_app, start_admin

METRICS = b"# TYPE mesh_requests_total counter\nmesh_requests_total 3.0\n"


class Agent:
    """Stands in for sidecar.tlsagent.CertAgent: a certificate or not, and its description."""

    def __init__(self, valid: bool):
        self.valid = valid

    def has_valid_cert(self) -> bool:
        return self.valid

    def describe(self) -> dict:
        return {"identity": "spiffe://mesh.local/ns/shop/sa/orders", "valid": self.valid}


@contextlib.asynccontextmanager
async def admin(control, listening=lambda: True):
    server = await start_admin(build_admin_app(control, lambda: METRICS, listening), "127.0.0.1", 0)
    try:
        yield server
    finally:
        await server.cleanup()


def control_with(current=None, agent=None, connected=True):
    return SimpleNamespace(current=current, connected=connected, nacks=2, agent=agent, refusals=1,
                           last_error="[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")


async def raw(port: int, data: bytes, read_until_close: bool = True) -> bytes:
    """Send bytes on a fresh connection; everything the server answered until it closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    try:
        return await reader.read(-1) if read_until_close else await reader.read(65536)
    finally:
        writer.close()


async def _routes():
    snap = Snapshot(version=7, config=MeshConfig(services={}, endpoints={}))
    listening = {"up": False}
    control = control_with()
    async with admin(control, lambda: listening["up"]) as server, aiohttp.ClientSession() as s:
        base = f"http://127.0.0.1:{server.port}"
        async with s.get(base + "/metrics") as r:   # as meshd and Prometheus scrape
            assert r.status == 200 and await r.read() == METRICS
            assert r.headers["Content-Type"] == "text/plain; charset=utf-8"
            assert r.headers["X-Content-Type-Options"] == "nosniff"
        ready = []
        for step in ("no config", "listening", "certificate", "ready"):
            if step == "listening":
                control.current = snap
            elif step == "certificate":
                listening["up"] = True
                control.agent = Agent(False)
            elif step == "ready":
                control.agent = Agent(True)
            async with s.get(base + "/healthz/ready?probe=1") as r:
                assert r.headers["Content-Type"] == "application/json; charset=utf-8"
                ready.append((r.status, await r.json()))
        assert ready == [
            (503, {"ready": False, "reason": "no config from meshd yet"}),
            (503, {"ready": False, "reason": "listeners not up"}),
            (503, {"ready": False, "reason": "no workload certificate yet"}),
            (200, {"ready": True, "version": 7}),
        ]
        async with s.get(base + "/config") as r:
            assert r.status == 200 and r.headers["Content-Type"] == "application/json; charset=utf-8"
            assert await r.json() == {"control_connected": True, "nacks": 2, "control_refusals": 1,
                                      "control_last_error": "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed",
                                      "tls": Agent(True).describe(), "snapshot": encode_snapshot(snap)}
        async with s.head(base + "/metrics") as r:
            assert r.status == 200 and int(r.headers["Content-Length"]) == len(METRICS)
            assert await r.read() == b""
        async with s.get(base + "/nope") as r:
            assert r.status == 404 and r.headers["Content-Type"].startswith("text/plain")
        async with s.get(base + "/metrics/") as r:
            assert r.status == 404
        async with s.post(base + "/metrics", data=b"x") as r:
            assert r.status == 405 and r.headers["Allow"] == "GET, HEAD"
        # every request above went over one kept-alive connection
        assert len(server.conns) == 1


def test_routes_status_codes_and_content_types(run):
    run(_routes)


async def _http_edges():
    async with admin(control_with()) as server:
        port = server.port
        # two pipelined requests in one segment: two answers, in order, then close on request
        out = await raw(port, b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n"
                              b"GET /healthz/ready HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        first, _, rest = out.partition(METRICS)
        assert first.startswith(b"HTTP/1.1 200 OK\r\n") and rest.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
        assert b"Connection: close" in rest and rest.endswith(b'"no config from meshd yet"}')
        # HTTP/1.0 without keep-alive: answered, then closed
        assert (await raw(port, b"GET /metrics HTTP/1.0\r\n\r\n")).endswith(METRICS)
        # not HTTP: 400 and close
        assert (await raw(port, b"\x16\x03\x01 hello\r\n\r\n")).startswith(b"HTTP/1.1 400 Bad Request\r\n")
        # an oversized head: 431; an oversized body: 413; both close the connection
        big = b"GET /metrics HTTP/1.1\r\nX-Pad: " + b"a" * MAX_HEAD + b"\r\n\r\n"
        assert (await raw(port, big)).startswith(b"HTTP/1.1 431 ")
        body = b"POST /metrics HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1) + b"b" * (MAX_BODY + 1)
        assert (await raw(port, body)).startswith(b"HTTP/1.1 413 ")
        # a small body is read and the request answered (405 here: GET and HEAD only)
        out = await raw(port, b"PUT /config HTTP/1.1\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi")
        assert out.startswith(b"HTTP/1.1 405 ") and b"Allow: GET, HEAD\r\n" in out
        # an idle kept-alive connection is closed by cleanup
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /config HTTP/1.1\r\nHost: a\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.startswith(b"Content-Length")))
        assert json.loads(await reader.readexactly(length))["snapshot"] is None
    assert await asyncio.wait_for(reader.read(), 5) == b""   # closed by cleanup
    writer.close()


def test_http_edges_pipelining_limits_and_close(run):
    run(_http_edges)
