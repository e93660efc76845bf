"""sidecar.wsclient against aiohttp's WebSocket server (meshd's) and raw peers on loopback."""

from __future__ import annotations

import asyncio
import base64
import hashlib

import pytest
from aiohttp import WSMsgType, web

from meshcore import websocket as wsp
from sidecar.wsclient import ConnectionClosed, WebSocketError, connect


class Server:
    """An aiohttp app on 127.0.0.1 whose /ws handler is `handler(ws)`."""

    def __init__(self, handler, **ws_options):
        self.handler = handler
        self.ws_options = ws_options
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def _ws(self, request):
        ws = web.WebSocketResponse(**self.ws_options)
        await ws.prepare(request)
        await self.handler(ws)
        return ws

    async def _plain(self, request):
        return web.Response(text="no")

    async def __aenter__(self):
        app = web.Application()
        app.router.add_get("/ws", self._ws)
        app.router.add_get("/plain", self._plain)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        await self.runner.cleanup()

    def url(self, path="/ws"):
        return f"ws://127.0.0.1:{self.port}{path}"


async def echo(ws):
    async for msg in ws:
        if msg.type == WSMsgType.TEXT:
            await ws.send_str("echo:" + msg.data)
        elif msg.type == WSMsgType.BINARY:
            await ws.send_bytes(msg.data[::-1])


async def test_text_and_binary_messages_both_ways_at_every_length_form():
    async with Server(echo) as srv:
        async with connect(srv.url(), max_size=1 << 21) as ws:
            for text in ("", "hello", "é" * 200, "x" * 70000):
                await ws.send(text)
                assert await ws.recv() == "echo:" + text
            blob = bytes(range(256)) * 4000
            await ws.send(blob)
            assert await ws.recv() == blob[::-1]


async def test_server_close_code_and_reason_reach_recv():
    async def refuse(ws):
        await ws.close(code=4401, message=b"bootstrap token refused")

    async with Server(refuse) as srv:
        async with connect(srv.url()) as ws:
            with pytest.raises(ConnectionClosed) as err:
                await ws.recv()
            assert (err.value.rcvd.code, err.value.rcvd.reason) == (4401, "bootstrap token refused")
            assert not ws.open
            with pytest.raises(ConnectionClosed):
                await ws.send("late")
            with pytest.raises(ConnectionClosed):   # and every later recv
                await ws.recv()


async def test_server_heartbeat_pings_are_answered():
    """aiohttp closes a connection whose pong is late (heartbeat); ours stays open past many beats."""
    got = []

    async def slow(ws):
        await asyncio.sleep(1.0)
        await ws.send_str("still here")
        got.append(ws.closed)
        async for _ in ws:
            pass

    async with Server(slow, heartbeat=0.1) as srv:
        async with connect(srv.url(), ping_interval=None) as ws:
            assert await asyncio.wait_for(ws.recv(), 5) == "still here"
    assert got == [False]


async def test_client_closes_cleanly_and_server_sees_the_code():
    seen = []

    async def record(ws):
        async for _ in ws:
            pass
        seen.append(ws.close_code)

    async with Server(record) as srv:
        async with connect(srv.url()) as ws:
            await ws.send("hi")
        for _ in range(100):
            if seen:
                break
            await asyncio.sleep(0.02)
    assert seen == [1000]


async def test_message_over_max_size_closes_with_1009():
    seen = []

    async def big(ws):
        await ws.send_bytes(b"x" * 5000)
        async for _ in ws:
            pass
        seen.append(ws.close_code)

    async with Server(big) as srv:
        async with connect(srv.url(), max_size=4096) as ws:
            with pytest.raises(ConnectionClosed):
                await ws.recv()
        for _ in range(100):
            if seen:
                break
            await asyncio.sleep(0.02)
    assert seen == [wsp.CLOSE_TOO_BIG]


async def test_silent_peer_is_dropped_after_ping_timeout():
    """A peer that stops answering pings (autoping off, nothing read) is given up on."""
    async def mute(ws):
        async for _ in ws:   # pings are delivered here, never answered
            pass

    async with Server(mute, autoping=False) as srv:
        async with connect(srv.url(), ping_interval=0.1, ping_timeout=0.2, close_timeout=0.2) as ws:
            with pytest.raises(ConnectionClosed) as err:
                await asyncio.wait_for(ws.recv(), 5)
            assert err.value.rcvd is None


async def test_not_a_websocket_endpoint_is_named():
    async with Server(echo) as srv:
        with pytest.raises(WebSocketError, match="did not switch protocols: 'HTTP/1.1 200"):
            async with connect(srv.url("/plain")):
                pass


async def raw_server(respond):
    """A TCP server answering the handshake with `respond(key) -> bytes`, then waiting for EOF."""
    async def handle(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        key = [ln.split(b":", 1)[1].strip() for ln in head.split(b"\r\n") if ln.lower().startswith(b"sec-websocket-key")][0]
        writer.write(respond(key))
        await writer.drain()
        await reader.read()   # until the client hangs up
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def accept(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())


@pytest.mark.parametrize("respond, why", [
    (lambda key: b"HTTP/1.1 101 OK\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: x\r\n\r\n",
     "wrong Sec-WebSocket-Accept"),
    (lambda key: b"HTTP/1.1 101 OK\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: " + accept(key) + b"\r\n\r\n",
     "Upgrade: websocket"),
])
async def test_bad_handshakes_are_refused(respond, why):
    server = await raw_server(respond)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(WebSocketError, match=why):
            async with connect(f"ws://127.0.0.1:{port}/ws"):
                pass
    finally:
        server.close()


async def test_frames_right_after_the_handshake_and_masked_server_frames():
    """Bytes sent with the 101 are not lost; a masked frame from the server is a protocol error."""
    def respond(key):
        return (b"HTTP/1.1 101 OK\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: "
                + accept(key) + b"\r\n\r\n" + b"\x81\x05hello" + b"\x81\x81abcd\x00")

    server = await raw_server(respond)
    port = server.sockets[0].getsockname()[1]
    try:
        async with connect(f"ws://127.0.0.1:{port}/ws", close_timeout=0.2) as ws:
            assert await ws.recv() == "hello"
            with pytest.raises(ConnectionClosed):
                await ws.recv()
    finally:
        server.close()


def test_bad_urls_are_named():
    with pytest.raises(ValueError, match="not a ws:// or wss:// URL: 'http://x/'"):
        connect("http://x/")


async def test_open_timeout_bounds_a_server_that_never_answers():
    async def handle(reader, writer):
        await asyncio.sleep(5)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(asyncio.TimeoutError):
            async with connect(f"ws://127.0.0.1:{port}/ws", open_timeout=0.3):
                pass
    finally:
        server.close()
