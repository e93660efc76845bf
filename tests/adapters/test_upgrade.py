"""HTTP/1.1 Upgrade (WebSocket) through a sidecar pair on loopback: client -> outbound -> mTLS ->
inbound -> app. The upgrade request goes through the layers (authorization, routes); after the 101
the two hops are byte tunnels; the exchange is counted with response_code 101."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack

import aiohttp
import pytest


from meshcore.authz import Policy, make_rule
from tests.adapters.loops import GUARD_S, eventually
from tests.adapters.test_mtls import SVC_PORT, Pair, _raw, metric, snapshot

WS_URL = f"http://payments:{SVC_PORT}/ws"



async def _websocket_echo(ca):
    async with AsyncExitStack() as stack:
        pair = await Pair(stack, ca).start()
        async with pair.session.ws_connect(WS_URL, proxy=pair.proxy, max_msg_size=0) as ws:
            for i in range(20):   # both directions, many times over one tunnel
                await ws.send_str(f"hello {i}")
                assert await ws.receive_str(timeout=GUARD_S) == f"{len(f'hello {i}')}:hello {i}"
            blob = bytes(range(256)) * 4096   # 1 MiB, many TLS records each way
            await ws.send_bytes(blob)
            assert await ws.receive_bytes(timeout=GUARD_S) == blob
        for state, reporter in ((pair.outbound, "source"), (pair.inbound, "destination")):
            assert metric(state, "istio_requests_total", reporter=reporter, response_code="101") == 1
        # The bytes each way, once both tunnels closed: the messages (framed: at least their sizes).
        sizes = sum(len(f"hello {i}") for i in range(20)) + len(blob)
        for state, reporter in ((pair.outbound, "source"), (pair.inbound, "destination")):
            await eventually(lambda: metric(state, "istio_tcp_sent_bytes_total", reporter=reporter) > 0
                             and metric(state, "istio_tcp_received_bytes_total", reporter=reporter) > 0,
                             f"{reporter}'s tunnel closed on both sides")
            received = metric(state, "istio_tcp_received_bytes_total", reporter=reporter,
                              source_workload="orders", destination_service="payments")
            sent = metric(state, "istio_tcp_sent_bytes_total", reporter=reporter, destination_service="payments")
            assert sizes < received < sizes + 4096 and sizes < sent < sizes + 4096, (reporter, received, sent)
        # The tunnels ended with the WebSocket: no connection of theirs is left open or in flight.
        await eventually(lambda: not any(pair.outbound.in_flight.values()), "the tunnel's in-flight count released")


def test_websocket_through_the_mesh_counts_101_and_carries_both_ways(run, ca):
    run(_websocket_echo, ca)


async def _denied(ca):
    async with AsyncExitStack() as stack:
        pair = await Pair(stack, ca).start(policy=Policy(rules=(make_rule("deny", "orders", "payments"),)))
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await pair.session.ws_connect(WS_URL, proxy=pair.proxy)
        assert refused.value.status == 403
        assert pair.app.peers == set()   # the app never saw the upgrade


def test_an_upgrade_is_authorized_like_any_request(run, ca):
    run(_denied, ca)


async def _snapshot_change_keeps_the_tunnel(ca):
    async with AsyncExitStack() as stack:
        pair = await Pair(stack, ca).start()
        async with pair.session.ws_connect(WS_URL, proxy=pair.proxy) as ws:
            await ws.send_str("before")
            assert await ws.receive_str(timeout=GUARD_S) == "6:before"
            # A new snapshot in which payments' only endpoint is gone: pooled connections to it end,
            # new requests get 503; the established tunnel is not a request and goes on.
            gone = snapshot(port=1, version=2)
            pair.apply(gone)
            await ws.send_str("after")
            assert await ws.receive_str(timeout=GUARD_S) == "5:after"
            await ws.send_str("bye")
            closed = await ws.receive(timeout=GUARD_S)
            assert closed.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)


def test_a_snapshot_change_does_not_cut_an_established_tunnel(run, ca):
    run(_snapshot_change_keeps_the_tunnel, ca)


async def _refused_upgrade_closes(ca):
    async with AsyncExitStack() as stack:
        pair = await Pair(stack, ca).start()
        port = int(pair.proxy.rsplit(":", 1)[1])
        # The app does not switch (/echo answers 200): the answer is passed on and the connection
        # closed, since what follows the request on it is in no agreed protocol.
        answer = await _raw(port, b"GET http://payments:8080/echo HTTP/1.1\r\nhost: payments:8080\r\n"
                                           b"connection: upgrade\r\nupgrade: websocket\r\n\r\n")
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), answer
        assert b"connection: close" in head.lower()
        assert b'"upgrade": "websocket"' in body   # the app was asked to switch
        # Upgrade without Connection: upgrade is no upgrade: the header is not passed on, the
        # connection stays a keep-alive HTTP one.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for _ in range(2):
                writer.write(b"GET http://payments:8080/echo HTTP/1.1\r\nhost: payments:8080\r\nupgrade: websocket\r\n\r\n")
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), GUARD_S)
                assert head.startswith(b"HTTP/1.1 200"), head
                length = int(next(line.split(b":")[1] for line in head.lower().split(b"\r\n")
                                  if line.startswith(b"content-length")))
                body = await asyncio.wait_for(reader.readexactly(length), GUARD_S)
                assert b'"upgrade"' not in body
        finally:
            writer.close()


def test_an_upgrade_answered_without_101_is_passed_on_and_closed(run, ca):
    run(_refused_upgrade_closes, ca)
