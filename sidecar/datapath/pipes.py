"""Byte forwarding: a tunnel of two `_Pipe` protocols (services with protocol "tcp", passthrough of
destinations the mesh does not know, CONNECT), connected with the HTTP path's balance layer,
connect-retry and TLS; and the tunnel an HTTP/1.1 Upgrade (WebSocket) becomes after its 101."""

from __future__ import annotations

import asyncio
from typing import Any

from meshcore.lb import connect_tries

from ..routing import Cluster
from .engine import WRITE_HIGH_WATER, Exchange, ProxyState, Stack, _Downstream, _Upstream, _dec, log
from .layers.metrics import metric_labels
from .peers import check_peer, hop_tls


class _Pipe(asyncio.Protocol):
    """One side of a byte tunnel; writes what it reads to its peer, with backpressure and half-close."""

    __slots__ = ("transport", "peer", "buffer", "eof", "closed", "gauge", "counts", "key", "moved", "meter")

    def __init__(self, gauge: Any = None):
        self.transport: asyncio.Transport | None = None
        self.peer: _Pipe | None = None
        self.buffer: list[bytes] = []
        self.eof = False
        self.closed = False
        self.gauge = gauge
        self.counts: dict | None = None
        self.key: tuple[str, int] | None = None
        self.moved = 0                 # bytes read from this side (for `meter`)
        self.meter: Any = None         # meter(bytes) once this side is closed: its bytes in the metrics

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None:
            self.buffer.append(data)
            self.transport.pause_reading()
        else:
            peer.transport.write(data)
        self.moved += len(data)

    def eof_received(self) -> bool | None:
        self.eof = True
        peer = self.peer
        if peer is None:
            return True  # forwarded once the other side is connected
        if peer.eof or peer.closed or not peer.transport.can_write_eof():
            peer.transport.close()
            return None
        peer.transport.write_eof()
        return True

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.gauge is not None:
            self.gauge.dec()
        if self.counts is not None:
            _dec(self.counts, self.key)
            self.counts = None
        if self.meter is not None:
            self.meter(self.moved)
            self.meter = None
        peer = self.peer
        if peer is not None and not peer.closed:
            if exc is not None:
                peer.transport.abort()
            else:
                peer.transport.close()


class _TcpDownstream(_Pipe):
    """An accepted connection of a TCP listener: tunnels to the stack's cluster."""

    __slots__ = ("state", "stack", "cluster")

    def __init__(self, state: ProxyState, stack: Stack, cluster: Cluster):
        super().__init__(stack.gauge)
        self.state = state
        self.stack = stack
        self.cluster = cluster

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.gauge.inc()
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        transport.pause_reading()
        asyncio.get_running_loop().create_task(_tunnel(self.state, self.stack, self, self.cluster, None))


async def _tunnel(state: ProxyState, stack: Stack, client: _Pipe, cluster: Cluster,
                  greeting: bytes | None) -> None:
    """Connect `client` to an endpoint of `cluster` (connect-retry on other endpoints), then pipe."""
    loop = asyncio.get_running_loop()
    tries = connect_tries(len(cluster.endpoints), stack.max_tries)
    excluded: set[int] = set()
    while tries > 0 and not client.closed:
        idx = stack.balance.pick(state, cluster, excluded, None)
        if idx is None:
            break
        key = cluster.keys[idx]
        tls = state.tls
        ctx = None
        try:
            ctx, hostname = hop_tls(tls, cluster)
            transport, up = await asyncio.wait_for(
                loop.create_connection(_Pipe, key[0], key[1], ssl=ctx, server_hostname=hostname),
                stack.connect_timeout)
            if ctx is not None:
                check_peer(tls, transport, cluster, idx)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001
            state.connect_failed(key)
            log.debug("tunnel connect to %s:%s failed: %r", key[0], key[1], exc)
            excluded.add(idx)
            tries -= 1
            continue
        state.connect_succeeded(key)
        if client.closed:
            transport.close()
            return
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        up.counts = state.in_flight
        up.key = key
        state.in_flight[key] = state.in_flight.get(key, 0) + 1
        if greeting:
            client.transport.write(greeting)
        client.peer = up
        up.peer = client
        for data in client.buffer:
            transport.write(data)
        for data in up.buffer:
            client.transport.write(data)
        client.buffer = up.buffer = []
        if up.closed:
            client.transport.close()
            return
        if up.eof:
            if client.transport.can_write_eof():
                client.transport.write_eof()
            else:
                client.transport.close()
        if client.eof:
            if transport.can_write_eof():
                transport.write_eof()
            else:
                transport.close()
        else:
            client.transport.resume_reading()
        up.transport.resume_reading()
        return
    if client.closed:
        return
    if greeting:
        client.transport.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n"
                               b"x-mesh-flags: UF\r\nconnection: close\r\n\r\n")
        client.transport.close()
    else:
        client.transport.abort()  # a reset tells the client the destination is unreachable


def switch_protocols(down: _Downstream, ex: Exchange, up: _Upstream, rest: bytes) -> None:
    """The upstream answered `ex`'s upgrade with 101 (its head already written downstream): the
    exchange ends (counted with status 101) and the two connections become one byte tunnel, each
    side given what arrived after the heads (`down.early`, `rest`)."""
    up.exchange = None
    ex.up = None
    up.detach()   # out of its pool and breaker: the tunnel owns the connection now
    key = ex.key
    ex.key = None   # still in flight (least-request balancing) until the tunnel ends: the pipe releases it
    ex.resp_done = True
    down.switched = True
    down.queue.clear()
    down.cur = None
    down._end_layers(ex)
    labels = metric_labels(down, ex)
    telemetry = down.state.telemetry
    client = _Pipe(down.stack.gauge)   # the downstream connection's gauge count ends with the tunnel
    client.transport = down.transport
    server = _Pipe()
    server.transport = up.transport
    if key is not None:
        server.counts = down.state.in_flight
        server.key = key
    client.peer = server
    server.peer = client
    client.meter = lambda n: telemetry.record_tunnel_bytes(labels, n, 0)
    server.meter = lambda n: telemetry.record_tunnel_bytes(labels, 0, n)
    down.transport.set_protocol(client)
    up.transport.set_protocol(server)
    if down.writes is not None:   # the pipes write at once: the held 101 (and anything before it) goes first
        down.writes.settle(down.transport)
        down.writes.settle(up.transport)
    if down.early:
        up.transport.write(down.early)
        down.early = b""
    if rest:
        down.transport.write(rest)
    if down.eof:   # the client half-closed after its request: pass that on
        client.eof_received()
    else:
        down.transport.resume_reading()
    if up.read_paused:
        up.transport.resume_reading()
