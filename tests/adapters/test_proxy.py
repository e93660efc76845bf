"""The data path on loopback: client -> outbound -> inbound -> app, the gateway, TCP, TLS.

Every test runs on both event loops the sidecar may use (asyncio's and uvloop). Nothing sleeps for
timing: waits poll toward a deadline, and GUARD_S only bounds a hang.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import io
import ipaddress
import json
import os
import random
import ssl
from contextlib import AsyncExitStack

import aiohttp
import httptools
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.server import start_gateway
from meshcore.snapshot import Endpoint, GatewayRoute, MeshConfig, ServiceConfig, Snapshot
from sidecar.proxy import (
    ProxyState, _send, server_ssl_context, start_inbound, start_outbound, start_tcp_inbound,
)
from sidecar.routing import build_route_table
from sidecar.telemetry import render_metrics
from .loops import GUARD_S, eventually

SVC_PORT = 8080  # the port callers dial for payments (never listened on: transparent capture is simulated)


def port_of(server: asyncio.AbstractServer) -> int:
    return server.sockets[0].getsockname()[1]


def dead_port() -> int:
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# ---- the app ---------------------------------------------------------------------------------------

class App:
    """An aiohttp app standing in for a service; records the peers it saw."""

    def __init__(self):
        self.peers: set[int] = set()
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> App:
        app = web.Application()
        app.router.add_route("*", "/echo", self.echo)
        app.router.add_post("/stream", self.stream)
        app.router.add_post("/count", self.count)
        app.router.add_get("/big", self.big)
        app.router.add_get("/head", self.head)
        app.router.add_get("/nocontent", self.nocontent)
        app.router.add_get("/reset", self.reset)
        app.router.add_get("/ws", self.websocket)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]
        return self

    async def stop(self):
        await self.runner.cleanup()

    def _seen(self, request):
        self.peers.add(request.transport.get_extra_info("peername")[1])

    async def websocket(self, request: web.Request):
        """A WebSocket that echoes each message with its length; "bye" closes it from this side."""
        self._seen(request)
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT and msg.data == "bye":
                await ws.close()
            elif msg.type == aiohttp.WSMsgType.TEXT:
                await ws.send_str(f"{len(msg.data)}:{msg.data}")
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        return ws

    async def echo(self, request: web.Request):
        self._seen(request)
        body = await request.read()
        return web.json_response({
            "method": request.method, "path": request.path, "query": request.query_string,
            "headers": {k.lower(): v for k, v in request.headers.items()}, "body_len": len(body),
        })

    async def stream(self, request: web.Request):
        self._seen(request)
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        async for chunk in request.content.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
        return resp

    async def count(self, request: web.Request):
        self._seen(request)
        h = hashlib.sha256()
        n = 0
        async for chunk in request.content.iter_any():
            h.update(chunk)
            n += len(chunk)
        return web.json_response({"len": n, "sha": h.hexdigest(),
                                  "te": request.headers.get("Transfer-Encoding", "")})

    async def big(self, request: web.Request):
        self._seen(request)
        n = int(request.query["n"])
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        block = bytes(range(256)) * 256
        sent = 0
        while sent < n:
            piece = block[: min(len(block), n - sent)]
            await resp.write(piece)
            sent += len(piece)
        await resp.write_eof()
        return resp

    async def head(self, request: web.Request):
        self._seen(request)
        return web.Response(body=b"h" * 100)

    async def nocontent(self, request: web.Request):
        self._seen(request)
        return web.Response(status=204)

    async def reset(self, request: web.Request):
        request.transport.abort()
        return web.Response(text="never sent")


class RawServer:
    """A scripted TCP server: `handler(reader, writer)` per connection."""

    def __init__(self, handler):
        self.handler = handler
        self.connections = 0
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> RawServer:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    @property
    def port(self) -> int:
        return port_of(self.server)

    async def _handle(self, reader, writer):
        self.connections += 1
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def stop(self):
        self.server.close()


async def read_request(reader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    body = await reader.readexactly(length) if length else b""
    return head, body


async def echo_bytes(reader, writer):
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()


class Responses:
    """Parses a stream of HTTP responses (httptools) for raw-socket clients."""

    def __init__(self):
        self.items: list[dict] = []
        self.parser = httptools.HttpResponseParser(self)
        self.cur: dict = {}

    def on_message_begin(self):
        self.cur = {"headers": {}, "body": b""}

    def on_header(self, name, value):
        self.cur["headers"][name.decode().lower()] = value.decode()

    def on_headers_complete(self):
        self.cur["status"] = self.parser.get_status_code()

    def on_body(self, data):
        self.cur["body"] += data

    def on_message_complete(self):
        self.items.append(self.cur)

    async def read(self, reader, n: int) -> list[dict]:
        while len(self.items) < n:
            data = await reader.read(65536)
            if not data:
                if "status" in self.cur and (not self.items or self.items[-1] is not self.cur):
                    self.cur["eof"] = True  # a body delimited by the end of the connection
                    self.items.append(self.cur)
                break
            self.parser.feed_data(data)
        return self.items


async def raw_call(port: int, data: bytes, n: int = 1, size: int = 0) -> tuple[list[dict], bool]:
    """Send raw bytes (`size` at a time, each piece its own write), read `n` responses; returns them
    and whether the server then closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    step = size or len(data) or 1
    try:
        for i in range(0, len(data), step):
            writer.write(data[i:i + step])
            if size:
                await writer.drain()
                await asyncio.sleep(0)   # let the proxy read each piece on its own
        items = await Responses().read(reader, n)
        last = items[-1] if items else {}
        closed = last.get("eof") or (last.get("headers", {}).get("connection") == "close"
                                     and await reader.read(1) == b"")
        return items, closed
    finally:
        writer.close()


# ---- the mesh ----------------------------------------------------------------------------------------

def service(name: str, port: int, protocol: str = "http", aliases=()) -> ServiceConfig:
    return ServiceConfig(name=name, namespace="shop", protocol=protocol, port=port,
                         identity=f"spiffe://mesh.local/ns/shop/sa/{name}", aliases=tuple(aliases))


def endpoint(instance: str, port: int, version: str = "v2") -> Endpoint:
    return Endpoint(instance=instance, address="127.0.0.1", port=port, version=version,
                    identity="spiffe://mesh.local/ns/shop/sa/payments")


def snapshot(services: dict, endpoints: dict, routes=()) -> Snapshot:
    return Snapshot(version=1, config=MeshConfig(services=services, endpoints=endpoints,
                                                 gateway_routes=tuple(routes)))


class Mesh:
    """app <- inbound (payments v2) <- outbound (frontend v1); optional gateway."""

    def __init__(self, stack: AsyncExitStack):
        self.stack = stack
        self.servers: list[asyncio.AbstractServer] = []

    async def start(self, *, mode: str = "explicit", original_dst=None, live: int = 1, dead: int = 0,
                    tls=None, rand=None, routes=(), app: App | None = None, app_port: int | None = None,
                    sniff_timeout: float = 0.3, tls_in=None, pool_idle_timeout: float = 60.0) -> Mesh:
        if app is None and app_port is None:
            app = await App().start()
            self.stack.push_async_callback(app.stop)
        self.app = app
        self.app_port = app_port if app_port is not None else app.port
        self.inbound_state = ProxyState("payments", "v2", tls=tls_in if tls_in is not None else tls,
                                        pool_idle_timeout=pool_idle_timeout)
        self.stack.callback(self.inbound_state.close)
        eps = []
        for i in range(live):
            srv = await start_inbound(self.inbound_state, "127.0.0.1", 0, app_port=self.app_port)
            self._own(srv)
            eps.append(endpoint(f"live{i}", port_of(srv)))
        eps += [endpoint(f"dead{i}", dead_port(), "v9") for i in range(dead)]
        self.snapshot = snapshot({"payments": service("payments", SVC_PORT, aliases=("pay",))},
                                 {"payments": tuple(eps)}, routes)
        kwargs = {"rand": rand} if rand is not None else {}
        self.out_state = ProxyState("frontend", "v1", table=build_route_table(self.snapshot), tls=tls,
                                    pool_idle_timeout=pool_idle_timeout, **kwargs)
        self.stack.callback(self.out_state.close)
        out = await start_outbound(self.out_state, "127.0.0.1", 0, mode=mode, original_dst=original_dst,
                                   sniff_timeout=sniff_timeout)
        self._own(out)
        self.out_port = port_of(out)
        self.proxy = f"http://127.0.0.1:{self.out_port}"
        return self

    def _own(self, srv):
        self.servers.append(srv)
        self.stack.callback(srv.close)

    async def session(self) -> aiohttp.ClientSession:
        s = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=10),
                                  timeout=aiohttp.ClientTimeout(total=GUARD_S))
        self.stack.push_async_callback(s.close)
        return s


async def transparent_mesh_on(stack: AsyncExitStack, handler) -> tuple[RawServer, Mesh]:
    """A RawServer running `handler` as the app, behind a mesh in transparent mode (routed by Host)."""
    raw = await RawServer(handler).start()
    stack.push_async_callback(raw.stop)
    mesh = await Mesh(stack).start(app_port=raw.port, mode="transparent", original_dst=lambda t: None)
    return raw, mesh


def sample(state: ProxyState, name: str, **labels) -> float | None:
    return state.telemetry.registry.get_sample_value(name, labels)


# ---- HTTP through outbound and inbound ------------------------------------------------------------------

async def _keepalive_reuse():
    async with AsyncExitStack() as stack:
        mesh = await Mesh(stack).start()
        s = await mesh.session()
        for i in range(50):
            async with s.get(f"http://payments:{SVC_PORT}/echo?i={i}", proxy=mesh.proxy) as r:
                assert r.status == 200
                body = await r.json()
                assert body["query"] == f"i={i}"
        assert len(mesh.app.peers) == 1, mesh.app.peers          # inbound -> app: one connection
        assert mesh.out_state.pools.opened == 1                   # outbound -> inbound: one connection
        assert mesh.inbound_state.pools.opened == 1
        assert mesh.out_state.pools.count == 1                    # and it is back in the pool


def test_keepalive_reuses_one_upstream_connection(run):
    run(_keepalive_reuse)


async def _mesh_headers_and_metrics():
    async with AsyncExitStack() as stack:
        mesh = await Mesh(stack).start()
        s = await mesh.session()
        headers = {"X-Mesh-Source": "spoofed", "x-mesh-source-version": "v666", "X-Keep": "yes"}
        async with s.get(f"http://pay:{SVC_PORT}/echo", proxy=mesh.proxy, headers=headers) as r:
            seen = (await r.json())["headers"]
        assert seen["x-mesh-source"] == "frontend"
        assert seen["x-mesh-source-version"] == "v1"
        assert seen["x-keep"] == "yes"
        assert seen["host"] == f"pay:{SVC_PORT}"
        async with s.get(f"http://pay:{SVC_PORT}/nope", proxy=mesh.proxy) as r:
            assert r.status == 404
        src = dict(reporter="source", source_workload="frontend", source_version="v1",
                   destination_service="payments", destination_workload="payments",
                   destination_version="v2", request_protocol="http", response_flags="-", grpc_response_status="", connection_security_policy="none")
        assert sample(mesh.out_state, "istio_requests_total", response_code="200", **src) == 1
        assert sample(mesh.out_state, "istio_requests_total", response_code="404", **src) == 1
        assert sample(mesh.out_state, "istio_request_duration_milliseconds_count", response_code="200", **src) == 1
        dst = dict(src, reporter="destination")
        assert sample(mesh.inbound_state, "istio_requests_total", response_code="200", **dst) == 1
        # aiohttp keeps one proxy connection per target host: one here.
        assert sample(mesh.out_state, "mesh_sidecar_connections_active", direction="outbound") == 1
        assert sample(mesh.inbound_state, "mesh_sidecar_upstream_pool_idle") == 1
        rendered = render_metrics(mesh.out_state.telemetry).decode()
        assert 'istio_requests_total{' in rendered and 'reporter="source"' in rendered
        assert 'istio_request_duration_milliseconds_bucket{' in rendered and 'le="0.5"' in rendered


def test_mesh_source_headers_replace_the_apps_and_metrics_carry_istio_labels(run):
    run(_mesh_headers_and_metrics)


async def _hop_by_hop_request():
    async with AsyncExitStack() as stack:
        mesh = await Mesh(stack).start(mode="transparent", original_dst=lambda t: None)
        req = (b"GET /echo HTTP/1.1\r\nHost: payments:8080\r\nConnection: keep-alive, X-Secret\r\n"
               b"X-Secret: s\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Authorization: Basic eA==\r\n"
               b"Proxy-Connection: keep-alive\r\nX-Keep: yes\r\n\r\n")
        (resp,), _ = await raw_call(mesh.out_port, req)
        seen = json.loads(resp["body"])["headers"]
        for gone in ("x-secret", "keep-alive", "te", "proxy-authorization", "proxy-connection"):
            assert gone not in seen, gone
        assert seen["x-keep"] == "yes"
        assert seen.get("connection", "keep-alive").lower() == "keep-alive"  # aiohttp's view; ours sent none


def test_hop_by_hop_request_headers_and_connection_named_ones_are_removed(run):
    run(_hop_by_hop_request)


async def _hop_by_hop_response():
    async def app(reader, writer):
        while True:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: X-Internal\r\nX-Internal: 1\r\nKeep-Alive: timeout=5\r\n"
                         b"Proxy-Authenticate: Basic\r\nUpgrade: h2c\r\nX-Public: 1\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    async with AsyncExitStack() as stack:
        raw = await RawServer(app).start()
        stack.push_async_callback(raw.stop)
        mesh = await Mesh(stack).start(app_port=raw.port)
        s = await mesh.session()
        for _ in range(3):
            async with s.get(f"http://payments:{SVC_PORT}/", proxy=mesh.proxy) as r:
                assert await r.read() == b"ok"
                names = {k.lower() for k in r.headers}
        assert "x-public" in names
        assert not names & {"x-internal", "keep-alive", "proxy-authenticate", "upgrade"}
        assert raw.connections == 1  # "Connection: X-Internal" is not "close": still reused


def test_hop_by_hop_response_headers_are_removed(run):
    run(_hop_by_hop_response)


async def _chunked_both_ways():
    async with AsyncExitStack() as stack:
        mesh = await Mesh(stack).start(mode="explicit")
        body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (b"hello ", b"chunked ", b"world")) + b"0\r\n\r\n"
        req = (b"POST http://payments:8080/count HTTP/1.1\r\nHost: payments:8080\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n" + body)
        (resp,), _ = await raw_call(mesh.out_port, req)
        got = json.loads(resp["body"])
        assert got["len"] == len(b"hello chunked world")
        assert got["sha"] == hashlib.sha256(b"hello chunked world").hexdigest()
        assert got["te"] == "chunked"
        (resp,), _ = await raw_call(mesh.out_port, b"GET http://payments:8080/big?n=300000 HTTP/1.1\r\n"
                                                   b"Host: payments:8080\r\n\r\n")
        assert resp["headers"]["transfer-encoding"] == "chunked"
        assert resp["body"] == (bytes(range(256)) * 256 * 5)[:300000]


def test_chunked_request_and_response_bodies(run):
    run(_chunked_both_ways)


async def _five_megabytes():
    size = 5 * 1024 * 1024
    data = random.Random(5).randbytes(size)

    async def gen():
        for i in range(0, size, 100_000):
            yield data[i:i + 100_000]

    async with AsyncExitStack() as stack:
        mesh = await Mesh(stack).start()
        s = await mesh.session()
        async with s.post(f"http://payments:{SVC_PORT}/stream", proxy=mesh.proxy, data=gen()) as r:
            assert r.status == 200
            h = hashlib.sha256()
            n = 0
            async for chunk in r.content.iter_any():
                h.update(chunk)
                n += len(chunk)
        assert n == size and h.hexdigest() == hashlib.sha256(data).hexdigest()
        async with s.get(f"http://payments:{SVC_PORT}/big?n={size}", proxy=mesh.proxy) as r:
            got = await r.read()
        assert len(got) == size and got[:512] == bytes(range(256)) * 2
        async with s.post(f"http://payments:{SVC_PORT}/count", proxy=mesh.proxy, data=io.BytesIO(data)) as r:
            assert (await r.json())["sha"] == hashlib.sha256(data).hexdigest()  # Content-Length upload


def test_five_megabyte_bodies_stream_both_ways(run):
    run(_five_megabytes)


async def _head_and_204():
    async with AsyncExitStack() as stack:
        mesh = await Mesh(stack).start()
        s = await mesh.session()
        for _ in range(3):
            async with s.head(f"http://payments:{SVC_PORT}/head", proxy=mesh.proxy) as r:
                assert r.status == 200
                assert r.headers["Content-Length"] == "100"
                assert await r.read() == b""
            async with s.get(f"http://payments:{SVC_PORT}/nocontent", proxy=mesh.proxy) as r:
                assert r.status == 204
                assert await r.read() == b""
            async with s.get(f"http://payments:{SVC_PORT}/head", proxy=mesh.proxy) as r:
                assert await r.read() == b"h" * 100
        assert mesh.out_state.pools.opened == 1 and len(mesh.app.peers) == 1


def test_head_and_204_have_no_body_and_keep_the_connection(run):
    run(_head_and_204)


async def _pipelined():
    async with AsyncExitStack() as stack:
        mesh = await Mesh(stack).start(mode="transparent", original_dst=lambda t: None)
        reqs = b"".join(b"GET /echo?n=%d HTTP/1.1\r\nHost: payments\r\n\r\n" % i for i in range(5))
        reqs += b"POST /count HTTP/1.1\r\nHost: payments\r\nContent-Length: 3\r\n\r\nabc"
        reqs += b"GET /echo?n=last HTTP/1.1\r\nHost: payments\r\nConnection: close\r\n\r\n"
        items, closed = await raw_call(mesh.out_port, reqs, n=7)
        assert [json.loads(i["body"]).get("query") for i in items[:5]] == [f"n={i}" for i in range(5)]
        assert json.loads(items[5]["body"])["len"] == 3
        assert json.loads(items[6]["body"])["query"] == "n=last"
        assert items[6]["headers"]["connection"] == "close" and closed


def test_pipelined_requests_are_answered_in_order(run):
    run(_pipelined)


async def _expect_continue():
    async with AsyncExitStack() as stack:
        mesh = await Mesh(stack).start()
        s = await mesh.session()
        async with s.post(f"http://payments:{SVC_PORT}/count", proxy=mesh.proxy, data=b"x" * 5000,
                          expect100=True) as r:
            assert r.status == 200
            assert (await r.json())["len"] == 5000


def test_expect_100_continue_is_relayed(run):
    run(_expect_continue)


async def _connection_close():
    async with AsyncExitStack() as stack:
        mesh = await Mesh(stack).start(mode="transparent", original_dst=lambda t: None)
        (resp,), closed = await raw_call(mesh.out_port, b"GET /echo HTTP/1.1\r\nHost: payments\r\n"
                                                        b"Connection: close\r\n\r\n")
        assert resp["status"] == 200 and resp["headers"]["connection"] == "close" and closed
        # HTTP/1.0 without keep-alive closes too; the upstream connection stays pooled.
        (resp,), closed = await raw_call(mesh.out_port, b"GET /echo HTTP/1.0\r\nHost: payments\r\n\r\n")
        assert resp["status"] == 200 and closed
        assert mesh.out_state.pools.opened == 1


def test_connection_close_is_honoured(run):
    run(_connection_close)


async def _until_close_response():
    async def app(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nno length, ends with the connection")
        await writer.drain()

    async with AsyncExitStack() as stack:
        raw, mesh = await transparent_mesh_on(stack, app)
        (resp,), closed = await raw_call(mesh.out_port, b"GET / HTTP/1.1\r\nHost: payments\r\n\r\n")
        assert resp["body"] == b"no length, ends with the connection"
        assert resp["headers"]["connection"] == "close" and closed


def test_response_without_length_is_read_until_close(run):
    run(_until_close_response)


async def _stale_pooled_connection():
    async def app(reader, writer):
        # Answers the first request of each connection, then drops the connection on the next one
        # without answering, like a server whose keep-alive timeout just fired.
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await read_request(reader)

    async with AsyncExitStack() as stack:
        raw = await RawServer(app).start()
        stack.push_async_callback(raw.stop)
        mesh = await Mesh(stack).start(app_port=raw.port)
        s = await mesh.session()
        for _ in range(4):
            async with s.post(f"http://payments:{SVC_PORT}/", proxy=mesh.proxy, data=b"body") as r:
                assert r.status == 200 and await r.read() == b"ok"
        assert raw.connections >= 4


def test_pooled_connection_closed_by_the_peer_is_retried_on_a_fresh_one(run):
    run(_stale_pooled_connection)


async def _pool_discards_closed_and_expired():
    async def app(reader, writer):
        await read_request(reader)  # answers as keep-alive, then closes while the proxy holds it idle
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    async with AsyncExitStack() as stack:
        raw = await RawServer(app).start()
        stack.push_async_callback(raw.stop)
        mesh = await Mesh(stack).start(app_port=raw.port)
        s = await mesh.session()
        for i in range(1, 4):
            async with s.get(f"http://payments:{SVC_PORT}/", proxy=mesh.proxy) as r:
                assert await r.read() == b"ok"
            await eventually(lambda: mesh.inbound_state.pools.count == 0, "the closed connection to leave the pool")
            assert raw.connections == i
    async with AsyncExitStack() as stack:
        mesh = await Mesh(stack).start(pool_idle_timeout=0.05)
        s = await mesh.session()
        async with s.get(f"http://payments:{SVC_PORT}/echo", proxy=mesh.proxy) as r:
            assert r.status == 200
        assert mesh.out_state.pools.count == 1
        await eventually(lambda: mesh.out_state.pools.count == 0, "the idle connection to expire")
        async with s.get(f"http://payments:{SVC_PORT}/echo", proxy=mesh.proxy) as r:
            assert r.status == 200
        assert mesh.out_state.pools.opened == 2


def test_pool_discards_connections_closed_by_the_peer_and_expires_idle_ones(run):
    run(_pool_discards_closed_and_expired)


async def _transparent_by_original_dst():
    async with AsyncExitStack() as stack:
        mesh = await Mesh(stack).start(mode="transparent", original_dst=lambda t: ("127.0.0.1", SVC_PORT))
        s = await mesh.session()
        async with s.get(f"http://127.0.0.1:{mesh.out_port}/echo", headers={"Host": "10.9.9.9:8080"}) as r:
            seen = (await r.json())["headers"]
        assert seen["x-mesh-source"] == "frontend" and seen["host"] == "10.9.9.9:8080"


def test_transparent_mode_routes_by_injected_original_destination(run):
    run(_transparent_by_original_dst)


async def spin(n: int = 2000) -> None:
    """Let the loop run `n` rounds of I/O callbacks (no wall-clock wait)."""
    for _ in range(n):
        await asyncio.sleep(0)


TOTAL = 64 * 1024 * 1024


async def _backpressure_response():
    state = {"sent": 0, "blocked": False, "done": False}

    async def app(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % TOTAL)
        block = b"z" * 65536
        while state["sent"] < TOTAL:
            writer.write(block)
            state["sent"] += len(block)
            state["blocked"] = True
            await writer.drain()
            state["blocked"] = False
        state["done"] = True

    async with AsyncExitStack() as stack:
        raw, mesh = await transparent_mesh_on(stack, app)
        reader, writer = await asyncio.open_connection("127.0.0.1", mesh.out_port)
        writer.write(b"GET / HTTP/1.1\r\nHost: payments\r\n\r\n")
        # The client reads nothing: the app must end up blocked, far from done.
        await eventually(lambda: state["sent"] > 0 and state["blocked"], "the app to block")
        await spin()
        assert state["blocked"] and not state["done"] and state["sent"] < TOTAL // 2, state
        head = await reader.readuntil(b"\r\n\r\n")
        assert b"200 OK" in head
        got = 0
        while got < TOTAL:
            got += len(await reader.read(1 << 20))
        assert got == TOTAL and state["done"]
        writer.close()


def test_backpressure_slow_client_stops_the_upstream(run):
    run(_backpressure_response)


async def _backpressure_request():
    app_state = {"reading": asyncio.Event()}

    async def app(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        assert b"content-length" in head.lower()
        await app_state["reading"].wait()  # does not read the body until told to
        got = 0
        while got < TOTAL:
            got += len(await reader.read(1 << 20))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%d" % (len(str(got)), got))
        await writer.drain()

    async with AsyncExitStack() as stack:
        raw, mesh = await transparent_mesh_on(stack, app)
        reader, writer = await asyncio.open_connection("127.0.0.1", mesh.out_port)
        writer.write(b"POST / HTTP/1.1\r\nHost: payments\r\nContent-Length: %d\r\n\r\n" % TOTAL)
        sent = {"n": 0, "blocked": False}

        async def upload():
            block = b"u" * 65536
            while sent["n"] < TOTAL:
                writer.write(block)
                sent["n"] += len(block)
                sent["blocked"] = True
                await writer.drain()
                sent["blocked"] = False

        task = asyncio.ensure_future(upload())
        await eventually(lambda: sent["n"] > 0 and sent["blocked"], "the client to block")
        await spin()
        assert sent["blocked"] and sent["n"] < TOTAL // 2, sent
        app_state["reading"].set()
        await task
        (resp,) = await Responses().read(reader, 1)
        assert resp["body"] == str(TOTAL).encode()
        writer.close()


def test_backpressure_slow_upstream_stops_the_client(run):
    run(_backpressure_request)


# ---- failures ------------------------------------------------------------------------------------------

async def _retry_other_endpoint():
    async with AsyncExitStack() as stack:
        mesh = await Mesh(stack).start(live=1, dead=1, rand=random.Random(3).random)
        s = await mesh.session()
        statuses = []
        for i in range(20):
            async with s.get(f"http://payments:{SVC_PORT}/echo", proxy=mesh.proxy) as r:
                statuses.append(r.status)
        assert statuses == [200] * 20
        # The dead replica was picked once, retried around, then ejected: not tried again.
        assert mesh.out_state.connect_failures == 1
        assert list(mesh.out_state.ejected) == [mesh.out_state.table.clusters["payments"].keys[1]]
        assert mesh.out_state.in_flight == {}


def test_connect_failure_on_one_endpoint_is_retried_on_another(run):
    run(_retry_other_endpoint)


async def _no_endpoints_and_all_failed():
    async with AsyncExitStack() as stack:
        mesh = await Mesh(stack).start(live=0, dead=0)
        s = await mesh.session()
        async with s.get(f"http://payments:{SVC_PORT}/echo", proxy=mesh.proxy) as r:
            assert r.status == 503 and r.headers["x-mesh-flags"] == "UH"
        async with s.get(f"http://payments:{SVC_PORT}/echo", proxy=mesh.proxy) as r:
            assert r.status == 503  # and the connection is still usable
        assert sample(mesh.out_state, "istio_requests_total", reporter="source", source_workload="frontend",
                      source_version="v1", destination_service="payments", destination_workload="payments",
                      destination_version="unknown", request_protocol="http", grpc_response_status="", connection_security_policy="none", response_code="503",
                      response_flags="UH") == 2
    async with AsyncExitStack() as stack:
        mesh = await Mesh(stack).start(live=0, dead=2)
        s = await mesh.session()
        async with s.get(f"http://payments:{SVC_PORT}/echo", proxy=mesh.proxy) as r:
            assert r.status == 503 and r.headers["x-mesh-flags"] == "UF"
        assert mesh.out_state.connect_failures == 2 and mesh.out_state.in_flight == {}


def test_no_endpoints_is_503_uh_and_all_connects_failed_is_503_uf(run):
    run(_no_endpoints_and_all_failed)


async def _upstream_reset():
    async with AsyncExitStack() as stack:
        mesh = await Mesh(stack).start()
        s = await mesh.session()
        async with s.get(f"http://payments:{SVC_PORT}/reset", proxy=mesh.proxy) as r:
            assert r.status == 502 and r.headers["x-mesh-flags"] == "UC"
        async with s.get(f"http://payments:{SVC_PORT}/echo", proxy=mesh.proxy) as r:
            assert r.status == 200  # the mesh recovers on the next request


def test_upstream_reset_before_the_response_is_502_uc(run):
    run(_upstream_reset)


async def _malformed():
    async with AsyncExitStack() as stack:
        mesh = await Mesh(stack).start(mode="explicit")
        for junk in (b"GARBAGE\x01 / HTTP/1.1\r\n\r\n", b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
                     b"POST http://payments:8080/count HTTP/1.1\r\nTransfer-Encoding: chunked\r\n"
                     b"Content-Length: 3\r\n\r\nabc"):
            (resp,), closed = await raw_call(mesh.out_port, junk)
            assert resp["status"] == 400 and closed, junk
        (resp,), closed = await raw_call(mesh.out_port, b"GET http://payments:8080/echo HTTP/1.1\r\n"
                                                        b"X-Big: " + b"b" * 70000 + b"\r\n\r\n")
        assert resp["status"] == 431 and closed
        # A good request, then garbage on the same connection: the good one is answered first.
        items, closed = await raw_call(mesh.out_port, b"GET http://payments:8080/echo HTTP/1.1\r\n"
                                                      b"Host: payments\r\n\r\n\x00\x01garbage\r\n\r\n", n=2)
        assert [i["status"] for i in items] == [200, 400] and closed


def test_malformed_request_is_400_and_closed(run):
    run(_malformed)


# ---- heads taken whole (compiled) or by httptools: the same answers -------------------------------------

async def _heads_in_pieces():
    async with AsyncExitStack() as stack:
        mesh = await Mesh(stack).start(mode="transparent", original_dst=lambda t: None)
        reqs = b"GET /echo?n=1 HTTP/1.1\r\nHost: payments\r\nX-A:  spaced value \t\r\nX-Empty:\r\n\r\n"
        reqs += b"POST /count HTTP/1.1\r\nHost: payments\r\nContent-Length: 10\r\n\r\n0123456789"
        reqs += b"GET /echo?n=3 HTTP/1.0\r\nHost: payments\r\nConnection: keep-alive\r\n\r\n"
        reqs += b"GET /echo?n=last HTTP/1.1\r\nHost: payments\r\nConnection: close\r\n\r\n"
        for size in (len(reqs), 1, 7, 64):
            items, closed = await raw_call(mesh.out_port, reqs, n=4, size=size)
            assert [i["status"] for i in items] == [200] * 4, size
            first = json.loads(items[0]["body"])
            assert first["query"] == "n=1" and first["headers"]["x-a"] == "spaced value", size
            assert first["headers"]["x-empty"] == ""
            assert json.loads(items[1]["body"])["len"] == 10, size
            assert json.loads(items[2]["body"])["query"] == "n=3"
            assert items[2]["headers"]["connection"] == "keep-alive"
            assert json.loads(items[3]["body"])["query"] == "n=last" and closed, size


def test_requests_in_any_pieces_get_the_same_answers(run):
    run(_heads_in_pieces)


async def _nothing_after_close():
    seen: list[bytes] = []

    async def app(reader, writer):
        while True:
            head, _ = await read_request(reader)
            seen.append(head.split(b"\r\n", 1)[0])
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    async with AsyncExitStack() as stack:
        raw, mesh = await transparent_mesh_on(stack, app)
        for first in (b"GET /a HTTP/1.1\r\nHost: payments\r\nConnection: close\r\n\r\n",
                      b"GET /a HTTP/1.0\r\nHost: payments\r\n\r\n"):
            seen.clear()
            items, closed = await raw_call(mesh.out_port, first + b"GET /b HTTP/1.1\r\nHost: payments\r\n\r\n")
            assert items[0]["status"] == 200 and closed, first
            assert seen == [b"GET /a HTTP/1.1"], seen   # RFC 9112 9.6: /b is not processed


def test_no_request_is_processed_after_one_that_closes(run):
    run(_nothing_after_close)


async def _refused_syntax():
    async with AsyncExitStack() as stack:
        mesh = await Mesh(stack).start(mode="transparent", original_dst=lambda t: None)
        for junk in (b"GET /echo HTTP/1.1\r\nHost : payments\r\n\r\n",        # space before the colon
                     b"GET /echo HTTP/1.1\r\nHost: payments\r\nX-A: a\x01b\r\n\r\n",  # a control character
                     b"GET /echo HTTP/1.1\r\nHost: payments\r\nContent-Length: 1\r\n"
                     b"Content-Length: 2\r\n\r\nab",                                 # two lengths
                     b"GET /echo HTTP/1.1\r\nHost: payments\r\nContent-Length: -1\r\n\r\n",
                     b"GET /echo HTTP/1.1\r\nHost: payments\r\nContent-Length: 1\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"):          # smuggling shape
            (resp,), closed = await raw_call(mesh.out_port, junk)
            assert resp["status"] == 400 and closed, junk
        # An extension method (not taken whole) still goes through.
        (resp,), _ = await raw_call(mesh.out_port, b"PROPFIND /echo HTTP/1.1\r\nHost: payments\r\n\r\n")
        assert resp["status"] == 200 and json.loads(resp["body"])["method"] == "PROPFIND"


def test_heads_outside_plain_syntax_get_httptools_answer(run):
    run(_refused_syntax)


async def _responses_in_pieces():
    answers = {
        b"/cl": b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nX-A:  v  \r\n\r\nhello world",
        b"/empty": b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"/204": b"HTTP/1.1 204 No Content\r\n\r\n",
        b"/chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"/junk": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA BYTES",
    }
    size = 1

    async def app(reader, writer):
        while True:
            head, _ = await read_request(reader)
            method, path = head.split(b" ")[:2]
            answer = answers[path]
            if method == b"HEAD":
                answer = b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n"
            for i in range(0, len(answer), size):
                writer.write(answer[i:i + size])
                await writer.drain()
                await asyncio.sleep(0)

    async with AsyncExitStack() as stack:
        raw, mesh = await transparent_mesh_on(stack, app)
        for size in (1000, 1, 3):
            reqs = b"".join(b"GET %s HTTP/1.1\r\nHost: payments\r\n\r\n" % p
                            for p in (b"/cl", b"/empty", b"/204", b"/chunked", b"/cl"))
            items, _ = await raw_call(mesh.out_port, reqs, n=5)
            assert [i["status"] for i in items] == [200, 200, 204, 200, 200], size
            # The same field value (RFC 9110 5.5: OWS around it is not part of it), however parsed.
            assert items[0]["body"] == b"hello world" and items[0]["headers"]["x-a"].strip() == "v", size
            assert items[1]["body"] == b"" and items[2]["body"] == b""
            assert items[3]["body"] == b"hello" and items[4]["body"] == b"hello world", size
            # HEAD: the head alone (its Content-Length as the GET's), then the next answer.
            reader, writer = await asyncio.open_connection("127.0.0.1", mesh.out_port)
            writer.write(b"HEAD /cl HTTP/1.1\r\nHost: payments\r\n\r\nGET /cl HTTP/1.1\r\nHost: payments\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), GUARD_S)
            (after,) = await Responses().read(reader, 1)
            writer.close()
            assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"content-length: 11\r\n" in head.lower(), size
            assert after["body"] == b"hello world", size
        assert raw.connections == 1   # every answer left the inbound's connection to the app reusable
        # Bytes after a complete response: answered, and that connection is not reused.
        (resp,), _ = await raw_call(mesh.out_port, b"GET /junk HTTP/1.1\r\nHost: payments\r\n\r\n")
        assert resp["status"] == 200 and resp["body"] == b"ok"
        (resp,), _ = await raw_call(mesh.out_port, b"GET /cl HTTP/1.1\r\nHost: payments\r\n\r\n")
        assert resp["body"] == b"hello world"
        await eventually(lambda: raw.connections == 2)


def test_responses_in_any_pieces_get_the_same_answers(run):
    run(_responses_in_pieces)


# ---- passthrough and TCP -----------------------------------------------------------------------------

async def _passthrough_unknown():
    async with AsyncExitStack() as stack:
        echo = await RawServer(echo_bytes).start()
        stack.push_async_callback(echo.stop)
        mesh = await Mesh(stack).start(mode="transparent", original_dst=lambda t: ("127.0.0.1", echo.port))
        reader, writer = await asyncio.open_connection("127.0.0.1", mesh.out_port)
        payload = b"\x00\x01binary, not http" * 1000
        writer.write(payload)
        got = await reader.readexactly(len(payload))
        writer.close()
        assert got == payload and echo.connections == 1

        # HTTP to a destination the mesh does not know goes through unchanged (no mesh headers).
        app = mesh.app
        mesh2 = await Mesh(stack).start(mode="transparent", original_dst=lambda t: ("127.0.0.1", app.port))
        (resp,), _ = await raw_call(mesh2.out_port, b"GET /echo HTTP/1.1\r\nHost: example.test\r\n"
                                                    b"Connection: keep-alive, X-Hop\r\nX-Hop: 1\r\n\r\n")
        seen = json.loads(resp["body"])["headers"]
        assert "x-mesh-source" not in seen and seen["x-hop"] == "1" and seen["host"] == "example.test"


def test_unknown_destination_is_passed_through_unchanged(run):
    run(_passthrough_unknown)


async def _passthrough_server_first():
    async def greeter(reader, writer):
        writer.write(b"220 ready\r\n")
        await writer.drain()
        line = await reader.readline()
        writer.write(b"250 " + line)
        await writer.drain()

    async with AsyncExitStack() as stack:
        srv = await RawServer(greeter).start()
        stack.push_async_callback(srv.stop)
        mesh = await Mesh(stack).start(mode="transparent", original_dst=lambda t: ("127.0.0.1", srv.port),
                                       sniff_timeout=0.05)
        reader, writer = await asyncio.open_connection("127.0.0.1", mesh.out_port)
        assert await reader.readline() == b"220 ready\r\n"  # the client never spoke first
        writer.write(b"HELO x\r\n")
        assert await reader.readline() == b"250 HELO x\r\n"
        writer.close()


def test_server_first_protocol_to_unknown_destination_passes_through(run):
    run(_passthrough_server_first)


async def _explicit_passthrough():
    async with AsyncExitStack() as stack:
        mesh = await Mesh(stack).start(mode="explicit")
        s = await mesh.session()
        async with s.get(f"http://127.0.0.1:{mesh.app.port}/echo", proxy=mesh.proxy) as r:
            seen = (await r.json())["headers"]
        assert "x-mesh-source" not in seen  # not a mesh hop
        echo = await RawServer(echo_bytes).start()
        stack.push_async_callback(echo.stop)
        reader, writer = await asyncio.open_connection("127.0.0.1", mesh.out_port)
        writer.write(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\ntunnelled" % (echo.port, echo.port))
        assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 200 Connection Established\r\n\r\n"
        assert await reader.readexactly(9) == b"tunnelled"
        writer.close()


def test_explicit_proxy_passthrough_and_connect_tunnel(run):
    run(_explicit_passthrough)


async def _tcp():
    async with AsyncExitStack() as stack:
        echo = await RawServer(echo_bytes).start()
        stack.push_async_callback(echo.stop)
        db_state = ProxyState("db", "v1")
        stack.callback(db_state.close)
        tcp_in = await start_tcp_inbound(db_state, "127.0.0.1", 0, app_port=echo.port)
        stack.callback(tcp_in.close)
        snap = snapshot({"db": service("db", 5432, "tcp")}, {"db": (endpoint("db1", port_of(tcp_in)),)})
        out_state = ProxyState("frontend", "v1", table=build_route_table(snap))
        stack.callback(out_state.close)
        out = await start_outbound(out_state, "127.0.0.1", 0, original_dst=lambda t: ("127.0.0.1", 5432))
        stack.callback(out.close)
        payload = os.urandom(2 * 1024 * 1024)
        for port in (port_of(tcp_in), port_of(out)):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(payload)
            got = await reader.readexactly(len(payload))
            writer.write_eof()  # half-close: the echo server sees EOF and closes, and so do we
            assert await reader.read() == b""
            writer.close()
            assert got == payload
        assert echo.connections == 2
        await eventually(lambda: out_state.in_flight == {}, "tunnel accounting")


def test_tcp_passthrough_echo_inbound_and_outbound(run):
    run(_tcp)


# ---- gateway -------------------------------------------------------------------------------------------

async def _gateway():
    async with AsyncExitStack() as stack:
        mesh = await Mesh(stack).start(routes=[GatewayRoute(service="payments", path="/pay", host=None,
                                                            strip_prefix=True)])
        gw_state = ProxyState("gateway", "v1", table=mesh.out_state.table)
        stack.callback(gw_state.close)
        gw = await start_gateway(gw_state, "127.0.0.1", 0)
        stack.callback(gw.close)
        url = f"http://127.0.0.1:{port_of(gw)}"
        s = await mesh.session()
        async with s.get(f"{url}/pay/echo?x=1", headers={"Host": "shop.example", "X-Forwarded-For": "10.0.0.1",
                                                         "X-Mesh-Source": "evil"}) as r:
            assert r.status == 200
            got = await r.json()
        assert got["path"] == "/echo" and got["query"] == "x=1"
        h = got["headers"]
        assert h["x-forwarded-for"] == "10.0.0.1, 127.0.0.1"
        assert h["x-forwarded-proto"] == "http" and h["x-forwarded-host"] == "shop.example"
        assert h["x-mesh-source"] == "gateway"
        async with s.get(f"{url}/nothing/here") as r:
            assert r.status == 404 and r.headers["x-mesh-flags"] == "NR"
            assert (await r.json())["error"] == "no route"
        assert sample(gw_state, "istio_requests_total", reporter="source", source_workload="gateway",
                      source_version="v1", destination_service="payments", destination_workload="payments",
                      destination_version="v2", request_protocol="http", grpc_response_status="", connection_security_policy="none", response_code="200",
                      response_flags="-") == 1
        assert sample(mesh.inbound_state, "istio_requests_total", reporter="destination",
                      source_workload="gateway", source_version="v1", destination_service="payments",
                      destination_workload="payments", destination_version="v2", request_protocol="http",
                      response_code="200", response_flags="-", grpc_response_status="", connection_security_policy="none") == 1


def test_gateway_routes_strips_prefix_sets_forwarded_headers_and_404s(run):
    run(_gateway)


# ---- TLS hook ------------------------------------------------------------------------------------------

def self_signed(name: str, cn: str) -> tuple[bytes, bytes, int]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.timezone.utc)
    serial = x509.random_serial_number()
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(serial).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem, serial


def server_ctx(cert_pem: bytes, key_pem: bytes, tmp_path, tag: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    (tmp_path / f"{tag}.crt").write_bytes(cert_pem)
    (tmp_path / f"{tag}.key").write_bytes(key_pem)
    ctx.load_cert_chain(tmp_path / f"{tag}.crt", tmp_path / f"{tag}.key")
    return ctx


class Holder:
    """A TLS holder as the hook expects: current contexts, read per handshake / connection."""

    def __init__(self, server: ssl.SSLContext, trusted: list[bytes]):
        self.server = server
        self.client = ssl.create_default_context(cadata="".join(p.decode() for p in trusted))
        self.server_calls = 0
        self.client_calls = 0

    def server_context(self) -> ssl.SSLContext:
        self.server_calls += 1
        return self.server

    def client_context(self) -> ssl.SSLContext:
        self.client_calls += 1
        return self.client


async def peer_serial(port: int, ctx: ssl.SSLContext) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="payments")
    serial = int(writer.get_extra_info("ssl_object").getpeercert()["serialNumber"], 16)
    writer.close()
    return serial


async def _tls(tmp_path):
    cert1, key1, serial1 = self_signed("payments", "throwaway one")
    cert2, key2, serial2 = self_signed("payments", "throwaway two")
    holder = Holder(server_ctx(cert1, key1, tmp_path, "one"), [cert1, cert2])
    async with AsyncExitStack() as stack:
        mesh = await Mesh(stack).start(tls=holder)
        s = await mesh.session()
        async with s.get(f"http://payments:{SVC_PORT}/echo", proxy=mesh.proxy) as r:
            assert r.status == 200 and (await r.json())["headers"]["x-mesh-source"] == "frontend"
        assert holder.client_calls == 1 and holder.server_calls >= 2  # once at start, once per handshake
        inbound_port = mesh.snapshot.config.endpoints["payments"][0].port
        assert await peer_serial(inbound_port, holder.client) == serial1
        # Rotation: the next handshake presents the new certificate, with no listener restart.
        holder.server = server_ctx(cert2, key2, tmp_path, "two")
        assert await peer_serial(inbound_port, holder.client) == serial2
        mesh.out_state.pools.close()
        async with s.get(f"http://payments:{SVC_PORT}/echo", proxy=mesh.proxy) as r:
            assert r.status == 200
        assert holder.client_calls == 2
        # Plaintext to a TLS inbound fails the hop: no request reaches the app.
        plain = ProxyState("frontend", "v1", table=mesh.out_state.table)
        stack.callback(plain.close)
        out = await start_outbound(plain, "127.0.0.1", 0, mode="explicit")
        stack.callback(out.close)
        async with s.get(f"http://payments:{SVC_PORT}/echo", proxy=f"http://127.0.0.1:{port_of(out)}") as r:
            assert r.status == 502


def test_tls_hook_with_rotation(run, tmp_path):
    run(_tls, tmp_path)


async def _tls_peer_check(tmp_path):
    cert, key, _ = self_signed("payments", "throwaway")
    holder = Holder(server_ctx(cert, key, tmp_path, "one"), [cert])
    checked = []

    def check_peer(ssl_object, endpoint):
        checked.append((ssl_object.getpeercert() is not None, endpoint.instance))
        return False

    holder.check_peer = check_peer
    async with AsyncExitStack() as stack:
        mesh = await Mesh(stack).start(tls=holder)
        s = await mesh.session()
        async with s.get(f"http://payments:{SVC_PORT}/echo", proxy=mesh.proxy) as r:
            assert r.status == 503 and r.headers["x-mesh-flags"] == "UF"
        assert checked == [(True, "live0")]


def test_tls_peer_check_rejecting_the_peer_fails_the_connect(run, tmp_path):
    run(_tls_peer_check, tmp_path)


def test_front_context_with_its_own_sni_callback_is_used_as_is():
    front = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    front.sni_callback = lambda *a: None

    class FrontHolder:
        def server_context(self):
            return front

        def client_context(self):
            raise AssertionError("not needed")

    assert server_ssl_context(FrontHolder()) is front


async def _removed_endpoint_pool_closed():
    async with AsyncExitStack() as stack:
        mesh = await Mesh(stack).start(live=2)
        s = await mesh.session()
        for _ in range(20):
            async with s.get(f"http://payments:{SVC_PORT}/echo", proxy=mesh.proxy) as r:
                assert r.status == 200
        pools = mesh.out_state.pools
        keys = set(build_route_table(mesh.snapshot).clusters["payments"].keys)
        await eventually(lambda: set(pools.idle) == keys, "idle connections to both endpoints")
        gone, kept = sorted(keys)
        survivors = tuple(e for e in mesh.snapshot.config.endpoints["payments"] if (e.address, e.port) == kept)
        mesh.out_state.apply_snapshot(snapshot(mesh.snapshot.config.services, {"payments": survivors}))
        # The removed endpoint's idle connections are closed at once; the survivor's stay pooled.
        assert gone not in pools.idle and kept in pools.idle
        async with s.get(f"http://payments:{SVC_PORT}/echo", proxy=mesh.proxy) as r:
            assert r.status == 200


def test_idle_connections_to_a_removed_endpoint_are_closed_on_a_new_snapshot(run):
    run(_removed_endpoint_pool_closed)


class _Writes:
    """A transport that records how it was written to."""

    def __init__(self):
        self.calls = []

    def write(self, data):
        self.calls.append(("write", bytes(data)))

    def writelines(self, parts):
        self.calls.append(("writelines", [bytes(p) for p in parts]))


@pytest.mark.parametrize("parts, expect", [
    ([b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n", b"ok"],
     [("write", b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")]),                  # one TLS record, not two
    ((b"5\r\n", b"hello", b"\r\n"), [("write", b"5\r\nhello\r\n")]),
    ([b"only"], [("write", b"only")]),
    ([b"h" * 100, b"b" * (16 * 1024)], [("writelines", [b"h" * 100, b"b" * (16 * 1024)])]),   # above JOIN_MAX: no copy
])
def test_small_pieces_are_written_as_one(parts, expect):
    t = _Writes()
    _send(None, t, parts)
    assert t.calls == expect
