"""meshcore.limits on loopback, one test per limit: client -> inbound listener (or the gateway) ->
a scripted app. Timeouts are set short; waits poll toward GUARD_S."""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack
from dataclasses import replace

from gateway.server import start_gateway
from meshcore.limits import DEFAULT_LIMITS, KIB, Limits
from meshcore.snapshot import Endpoint, GatewayRoute, MeshConfig, ServiceConfig, Snapshot
from sidecar.proxy import ProxyState, start_inbound
from .loops import eventually
from .test_proxy import RawServer, Responses, port_of, raw_call, read_request


async def answer_ok(reader, writer):
    """The app: reads each request (Content-Length bodies) and answers 200 with the body's length."""
    while True:
        try:
            _head, body = await read_request(reader)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%d" % (len(str(len(body))), len(body)))
        await writer.drain()


async def inbound(stack: AsyncExitStack, limits: Limits, handler=answer_ok) -> tuple[int, ProxyState, RawServer]:
    app = await RawServer(handler).start()
    stack.push_async_callback(app.stop)
    state = ProxyState("payments", "v1")
    state.limits = limits
    stack.callback(state.close)
    server = await start_inbound(state, "127.0.0.1", 0, app_port=app.port)
    stack.callback(server.close)
    return port_of(server), state, app


def request(target: bytes = b"/", headers: list[bytes] = (), body: bytes = b"") -> bytes:
    extra = b"".join(h + b"\r\n" for h in headers)
    length = b"content-length: %d\r\n" % len(body) if body else b""
    return b"GET %b HTTP/1.1\r\nhost: payments\r\n%b%b\r\n%b" % (target, extra, length, body)


async def status_of(port: int, data: bytes) -> tuple[int, bool]:
    (resp,), closed = await raw_call(port, data)
    return resp["status"], closed


async def _header_limits():
    async with AsyncExitStack() as stack:
        port, _, _ = await inbound(stack, DEFAULT_LIMITS)
        # Envoy's defaults: 100 fields, 60 KiB of names and values.
        assert await status_of(port, request(headers=[b"x-h%d: v" % i for i in range(99)])) == (200, False)
        assert await status_of(port, request(headers=[b"x-h%d: v" % i for i in range(100)])) == (431, True)
        big = [b"x-big%d: %b" % (i, b"v" * 4000) for i in range(14)]          # ~56 KiB
        assert await status_of(port, request(headers=big)) == (200, False)
        assert await status_of(port, request(headers=big + [b"x-more: " + b"v" * 6000])) == (431, True)
        # Request-target: 414 above the line limit.
        assert await status_of(port, request(b"/" + b"a" * (16 * KIB - 2))) == (200, False)
        assert await status_of(port, request(b"/" + b"a" * (16 * KIB + 10))) == (414, True)
        port2, _, _ = await inbound(stack, Limits(max_headers=10, max_header_bytes=2 * KIB, max_request_line=1 * KIB))
        assert await status_of(port2, request(headers=[b"x-h%d: v" % i for i in range(9)])) == (200, False)
        assert await status_of(port2, request(headers=[b"x-h%d: v" % i for i in range(10)])) == (431, True)
        assert await status_of(port2, request(headers=[b"x-a: " + b"v" * 2100])) == (431, True)
        assert await status_of(port2, request(b"/" + b"a" * 1100)) == (414, True)


def test_header_count_bytes_and_request_line(run):
    run(_header_limits)


async def _head_timeout():
    async with AsyncExitStack() as stack:
        port, state, app = await inbound(stack, replace(DEFAULT_LIMITS, head_timeout=0.3))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        start = time.monotonic()
        writer.write(b"GET / HTTP/1.1\r\nhost: payments\r\n")

        async def trickle():   # a header line every 50 ms, until just before the deadline: never done
            for i in range(5):   # (bytes arriving after the 408 would make the close a reset)
                writer.write(b"x-slow-%d: 1\r\n" % i)
                await asyncio.sleep(0.05)

        slow = asyncio.ensure_future(trickle())
        items = await Responses().read(reader, 1)
        assert items and items[0]["status"] == 408 and items[0]["headers"]["x-mesh-flags"] == "SI"
        assert await reader.read() == b""
        assert 0.3 <= time.monotonic() - start < 1.5
        slow.cancel()
        writer.close()
        assert app.connections == 0


def test_a_head_sent_too_slowly_is_answered_408(run):
    run(_head_timeout)


async def _idle_timeout():
    async with AsyncExitStack() as stack:
        port, _, _ = await inbound(stack, replace(DEFAULT_LIMITS, idle_timeout=0.3))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        start = time.monotonic()
        assert await reader.read() == b""          # never sent a byte: closed
        assert 0.3 <= time.monotonic() - start < 1.5
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request())
        items = await Responses().read(reader, 1)
        assert items[0]["status"] == 200
        start = time.monotonic()
        assert await reader.read() == b""          # idle after a keep-alive response: closed
        assert 0.3 <= time.monotonic() - start < 1.5
        writer.close()


def test_an_idle_connection_is_closed(run):
    run(_idle_timeout)


async def _body_timeout():
    async with AsyncExitStack() as stack:
        port, _, _ = await inbound(stack, replace(DEFAULT_LIMITS, body_timeout=0.3))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST / HTTP/1.1\r\nhost: payments\r\ncontent-length: 100\r\n\r\n" + b"b" * 10)
        start = time.monotonic()
        items = await Responses().read(reader, 1)
        assert items[0]["status"] == 408 and items[0]["headers"]["x-mesh-flags"] == "SI"
        assert await reader.read() == b""
        assert 0.3 <= time.monotonic() - start < 1.5
        writer.close()
        # A slow but steady body is not cut: a byte every 100 ms for a second.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST / HTTP/1.1\r\nhost: payments\r\ncontent-length: 10\r\n\r\n")
        for _ in range(10):
            await asyncio.sleep(0.1)
            writer.write(b"b")
        items = await Responses().read(reader, 1)
        assert items[0]["status"] == 200 and items[0]["body"] == b"10"
        writer.close()


def test_a_stalled_body_is_answered_408(run):
    run(_body_timeout)


async def _max_connections():
    async with AsyncExitStack() as stack:
        port, state, _ = await inbound(stack, replace(DEFAULT_LIMITS, max_connections=5))
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(5)]
        gauge = state.telemetry.connections("inbound")
        await eventually(lambda: gauge.get() == 5, "5 connections open")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)   # the kernel accepts it...
        writer.write(request())
        try:
            assert await reader.read() == b""                                 # ...the proxy resets it
        except ConnectionResetError:
            pass
        writer.close()
        for r, w in held[:1]:
            w.close()
        await eventually(lambda: gauge.get() == 4, "one closed")
        assert await status_of(port, request()) == (200, False)           # room again
        for r, w in held[1:]:
            w.close()


def test_connections_above_the_limit_are_reset(run):
    run(_max_connections)


async def _gateway_body():
    async with AsyncExitStack() as stack:
        app = await RawServer(answer_chunked_or_length).start()
        stack.push_async_callback(app.stop)
        svc = ServiceConfig(name="payments", namespace="shop", protocol="http", port=8080, identity="")
        ep = Endpoint(instance="p1", address="127.0.0.1", port=app.port, version="v1", identity="")
        snap = Snapshot(version=1, config=MeshConfig(services={"payments": svc}, endpoints={"payments": (ep,)},
                                                     gateway_routes=(GatewayRoute("payments", "/", None, False),)))
        state = ProxyState("gateway", "v1")
        state.limits = replace(DEFAULT_LIMITS, gateway_max_body=1 * KIB)
        state.apply_snapshot(snap)
        stack.callback(state.close)
        server = await start_gateway(state, "127.0.0.1", 0)
        stack.callback(server.close)
        port = port_of(server)
        post = b"POST / HTTP/1.1\r\nhost: shop\r\n"
        assert await status_of(port, post + b"content-length: 1024\r\n\r\n" + b"b" * 1024) == (200, False)
        assert await status_of(port, post + b"content-length: 1025\r\n\r\n" + b"b" * 1025) == (413, True)
        chunked = post + b"transfer-encoding: chunked\r\n\r\n"
        small = b"".join(b"100\r\n" + b"c" * 256 + b"\r\n" for _ in range(4)) + b"0\r\n\r\n"
        assert await status_of(port, chunked + small) == (200, False)
        large = b"".join(b"100\r\n" + b"c" * 256 + b"\r\n" for _ in range(5)) + b"0\r\n\r\n"
        assert await status_of(port, chunked + large) == (413, True)


async def answer_chunked_or_length(reader, writer):
    """The app behind the gateway: reads a request with a Content-Length or chunked body, answers 200."""
    while True:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return
        if b"transfer-encoding: chunked" in head.lower():
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                await reader.readexactly(size + 2)
                if size == 0:
                    break
        else:
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    await reader.readexactly(int(line.split(b":")[1]))
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        await writer.drain()


def test_the_gateway_refuses_large_bodies(run):
    run(_gateway_body)
