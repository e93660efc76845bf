"""Dead peers: requests in flight to an endpoint whose network namespace vanished (no FIN, no RST).

On loopback the kernel acknowledges everything, so most tests inject `ProxyState(tcp_info=...)` (what
TCP_INFO reports for the connections to the "dead" endpoint) and `ProxyState(probe=...)` (the kernel's
keepalive verdict, ETIMEDOUT, simulated). The real reader is checked on real sockets, and
`test_real_black_hole_in_a_network_namespace` runs the whole path against a real black hole (iptables
DROP in a private network namespace; root only).

Every test runs on both event loops. Waits poll toward a deadline; GUARD_S only bounds a hang.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
from contextlib import AsyncExitStack
from time import monotonic

import aiohttp
import pytest
from aiohttp import web

from meshcore.policy import decode_traffic_policy
from meshcore.snapshot import Endpoint, MeshConfig, ServiceConfig, Snapshot
from sidecar.proxy import (
    TcpInfo, ProxyState, probe_peer, read_tcp_info, start_inbound, start_outbound,
)
from .loops import GUARD_S, LOOPS, eventually, serve_on_loopback

URL = "http://payments:8080"
IDENTITY = "spiffe://mesh.local/ns/shop/sa/payments"
APP_TIMEOUT_S = 5.0   # the caller's own timeout in the incident: every answer must come well before


async def read_request(reader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head, await reader.readexactly(length) if length else b""


class Peer:
    """Stands in for an endpoint's inbound sidecar (plaintext mesh hop): answers the first request of
    each connection at once (so the proxy pools the connection); later requests are recorded and
    answered after `delay` seconds, or never when `delay` is None (the connection stays open)."""

    def __init__(self, delay: float | None = None, ssl_context=None):
        self.delay = delay
        self.ssl_context = ssl_context
        self.requests: list[tuple[bytes, bytes]] = []   # (request line, body)
        self.connections = 0
        self.lost = 0            # connections that ended while a request waited for its answer
        self.port = 0

    async def start(self, stack: AsyncExitStack) -> Peer:
        self.tasks: set[asyncio.Task] = set()
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.ssl_context)
        stack.push_async_callback(self._stop, server)
        self.port = server.sockets[0].getsockname()[1]
        return self

    async def _stop(self, server) -> None:
        server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _handle(self, reader, writer):
        task = asyncio.current_task()
        self.tasks.add(task)
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            writer.close()
        finally:
            self.tasks.discard(task)

    async def _serve(self, reader, writer):
        self.connections += 1
        n = 0
        waiting = False
        try:
            while True:
                head, body = await read_request(reader)
                self.requests.append((head.split(b"\r\n", 1)[0], body))
                n += 1
                if n > 1:
                    if self.delay is None:
                        waiting = True
                        await reader.read()   # until the proxy gives up on the connection
                        return
                    await asyncio.sleep(self.delay)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\npeer")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if waiting:
                self.lost += 1
            writer.close()

    def lines(self) -> list[bytes]:
        return [line for line, _ in self.requests]


class App:
    """The healthy replica's app (behind a real inbound): counts requests per method."""

    def __init__(self):
        self.seen: list[tuple[str, bytes]] = []
        self.port = 0

    async def start(self, stack: AsyncExitStack) -> App:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.port = await serve_on_loopback(app, stack)
        return self

    async def _handle(self, request: web.Request):
        self.seen.append((request.method, await request.read()))
        return web.Response(body=b"app")


class Harness:
    """frontend outbound (explicit proxy) -> payments endpoints: a scripted `Peer` and a healthy
    replica (real inbound + `App`)."""

    def __init__(self, stack: AsyncExitStack):
        self.stack = stack

    async def start(self, *, peer: Peer, policy: dict | None = None, tls=None, **state_kw) -> Harness:
        self.peer = peer
        self.app = await App().start(self.stack)
        inbound = ProxyState("payments", "v1", tls=tls)
        self.stack.callback(inbound.close)
        srv = await start_inbound(inbound, "127.0.0.1", 0, app_port=self.app.port)
        self.stack.callback(srv.close)
        self.peer_ep = Endpoint(instance="dying", address="127.0.0.1", port=peer.port, version="v1",
                                identity=IDENTITY)
        self.good_ep = Endpoint(instance="healthy", address="127.0.0.1", port=srv.sockets[0].getsockname()[1],
                                version="v1", identity=IDENTITY)
        self.peer_key = (self.peer_ep.address, self.peer_ep.port)
        self.good_key = (self.good_ep.address, self.good_ep.port)
        self.service = ServiceConfig(name="payments", namespace="shop", protocol="http", port=8080,
                                     identity=IDENTITY, policy=decode_traffic_policy(policy or {}))
        self.version = 0
        self.out = ProxyState("frontend", "v1", rand=random.Random(3).random, tls=tls, **state_kw)
        self.stack.callback(self.out.close)
        self.publish(self.peer_ep)
        srv = await start_outbound(self.out, "127.0.0.1", 0, mode="explicit")
        self.stack.callback(srv.close)
        self.proxy = f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}"
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=GUARD_S))
        self.stack.push_async_callback(self.session.close)
        return self

    def publish(self, *endpoints: Endpoint) -> None:
        """What meshd would push: a snapshot with these payments endpoints."""
        self.version += 1
        self.out.apply_snapshot(Snapshot(version=self.version, config=MeshConfig(
            services={"payments": self.service}, endpoints={"payments": tuple(endpoints)})))

    async def call(self, method: str = "GET", body: bytes | None = None) -> tuple[int, str, bytes, float]:
        """(status, x-mesh-flags, body, seconds)."""
        t0 = monotonic()
        async with self.session.request(method, URL + "/checkout", data=body, proxy=self.proxy) as r:
            data = await r.read()
            return r.status, r.headers.get("x-mesh-flags", ""), data, monotonic() - t0

    async def warm_up(self) -> None:
        """One answered request to the peer: its connection is pooled, the next request reuses it."""
        status, _, body, _ = await self.call()
        assert (status, body) == (200, b"peer")
        await eventually(lambda: self.out.pools.idle.get(self.peer_key), "the peer's connection to be pooled")
        assert self.out._watchdog is None  # a fresh connection is not watched


def to_port(port: int, info: TcpInfo, real=read_tcp_info):
    """A tcp_info reader that reports `info` for connections to `port` (the dead peer), the truth otherwise."""
    def reader(transport):
        peer = transport.get_extra_info("peername")
        return info if peer is not None and peer[1] == port else real(transport)
    return reader


UNDELIVERED = TcpInfo(state=1, unacked=1, last_ack_recv_ms=10**6)   # in flight, no ACK for ages
DELIVERED = TcpInfo(state=1, unacked=0, last_ack_recv_ms=10**6)


class Vanish:
    """A probe for connections to `port` that stands for the kernel's verdict on a peer gone silent:
    the connection ends with ETIMEDOUT `after` seconds later. Other connections get the real probe."""

    def __init__(self, after: float = 0.1):
        self.after = after
        self.port = 0
        self.probed = 0

    def __call__(self, transport) -> bool:
        peer = transport.get_extra_info("peername")
        if peer is None or peer[1] != self.port:
            return probe_peer(transport)
        self.probed += 1
        proto = transport.get_protocol()

        def timed_out():
            proto.connection_lost(TimeoutError(110, "Connection timed out (simulated keepalive)"))
            transport.abort()
        asyncio.get_running_loop().call_later(self.after, timed_out)
        return True


async def post_in_flight(h: Harness, method: str = "POST", body: bytes = b'{"order": 42}'):
    """Start a request on the pooled connection to the peer; returns its task once the peer read it."""
    n = len(h.peer.requests)
    task = asyncio.ensure_future(h.call(method, body if method == "POST" else None))
    await eventually(lambda: len(h.peer.requests) > n, "the peer to read the request")
    return task


# ---- a snapshot withdraws the endpoint while a request is in flight --------------------------------

async def _undelivered_post_retried():
    async with AsyncExitStack() as stack:
        peer = await Peer().start(stack)
        h = await Harness(stack).start(peer=peer, tcp_info=to_port(peer.port, UNDELIVERED))
        await h.warm_up()
        task = await post_in_flight(h)
        t0 = monotonic()
        h.publish(h.good_ep)      # the replica stopped: meshd withdraws it (~200 ms later in real life)
        status, flags, body, seconds = await task
        assert (status, body) == (200, b"app"), (status, flags, body)
        assert h.app.seen == [("POST", b'{"order": 42}')]            # exactly one POST reached an app
        assert h.out.undelivered_total == 1
        assert monotonic() - t0 < h.out.undelivered_after + 0.5 and seconds < 2.0
        await eventually(lambda: peer.lost == 1, "the dead peer's connection to be reset")
        assert h.peer_key not in h.out.pools.live
        assert h.out.traffic.services["payments"].retries_total == 1  # counted as a retry (budget)


def test_undelivered_post_to_a_withdrawn_endpoint_is_retried_on_another(run):
    run(_undelivered_post_retried)


async def _delivered_post_vanishes():
    async with AsyncExitStack() as stack:
        peer = await Peer().start(stack)
        vanish = Vanish()
        vanish.port = peer.port
        h = await Harness(stack).start(peer=peer, tcp_info=to_port(peer.port, DELIVERED), probe=vanish)
        await h.warm_up()
        task = await post_in_flight(h)
        h.publish(h.good_ep)
        status, flags, body, seconds = await task
        # Delivered: the app behind the peer may have acted on it; a POST is not retried.
        assert (status, flags) == (503, "UC"), (status, flags, body)
        assert seconds < 2.0
        assert h.app.seen == [] and vanish.probed == 1 and h.out.undelivered_total == 0


def test_delivered_post_to_a_withdrawn_endpoint_that_vanishes_is_503_uc(run):
    run(_delivered_post_vanishes)


async def _delivered_get_vanishes():
    async with AsyncExitStack() as stack:
        peer = await Peer().start(stack)
        vanish = Vanish()
        vanish.port = peer.port
        h = await Harness(stack).start(peer=peer, tcp_info=to_port(peer.port, DELIVERED), probe=vanish,
                                       policy={"mesh.retries.on": "reset"})
        await h.warm_up()
        task = await post_in_flight(h, "GET")
        h.publish(h.good_ep)
        status, flags, body, seconds = await task
        assert (status, body) == (200, b"app"), (status, flags, body)   # idempotent, reset retried
        assert h.app.seen == [("GET", b"")] and seconds < 2.0


def test_delivered_get_to_a_withdrawn_endpoint_that_vanishes_is_retried_with_reset(run):
    run(_delivered_get_vanishes)


async def _draining_peer_finishes():
    async with AsyncExitStack() as stack:
        peer = await Peer(delay=0.8).start(stack)   # alive, draining: answers in-flight requests
        h = await Harness(stack).start(peer=peer)   # the real TCP_INFO and probe
        await h.warm_up()
        task = await post_in_flight(h)
        h.publish(h.good_ep)      # withdrawn at its stop signal, still serving
        status, flags, body, _ = await task
        assert (status, flags, body) == (200, "", b"peer")
        assert h.app.seen == [] and h.out.undelivered_total == 0 and h.out.probed_total == 1
        # Its connection is closed once the exchange ends, not pooled again.
        await eventually(lambda: h.peer_key not in h.out.pools.live, "the withdrawn endpoint's connection to close")
        assert h.peer_key not in h.out.pools.idle


def test_delivered_request_to_a_withdrawn_but_alive_endpoint_completes(run):
    run(_draining_peer_finishes)


# ---- no snapshot comes (meshd down): the safety net on reused connections --------------------------

async def _safety_net_retries():
    async with AsyncExitStack() as stack:
        peer = await Peer().start(stack)
        h = await Harness(stack).start(peer=peer, tcp_info=to_port(peer.port, UNDELIVERED), dead_peer_after=0.3)
        h.publish(h.peer_ep, h.good_ep)
        h.out.ejected[h.good_key] = monotonic() + 60   # steer the warm-up and the POST to the peer
        await h.warm_up()
        task = await post_in_flight(h)
        status, flags, body, seconds = await task
        assert (status, body) == (200, b"app"), (status, flags, body)
        assert h.app.seen == [("POST", b'{"order": 42}')]
        assert 0.3 <= seconds < 1.5
        assert h.out.undelivered_total == 1
        assert h.out.ejected[h.peer_key] > monotonic()   # skipped by the balancer for a while
        await eventually(lambda: peer.lost == 1, "the dead peer's connection to be reset")
        await eventually(lambda: h.out._watchdog is None, "the watchdog to stop with nothing to watch")


def test_safety_net_retries_an_undelivered_post_without_a_snapshot(run):
    run(_safety_net_retries)


async def _safety_net_spares_slow_apps():
    async with AsyncExitStack() as stack:
        peer = await Peer(delay=1.0).start(stack)   # thinks for a second; its kernel ACKs at once
        h = await Harness(stack).start(peer=peer, dead_peer_after=0.2)   # the real TCP_INFO and probe
        await h.warm_up()
        status, flags, body, seconds = await h.call("POST", b"slow")
        # Answered after the peer's second, not cut at dead_peer_after (0.2 s); uvloop's timers have
        # millisecond resolution, so its 1 s sleep may end a fraction of a millisecond early.
        assert (status, flags, body) == (200, "", b"peer") and seconds >= 0.95
        assert peer.lines().count(b"POST /checkout HTTP/1.1") == 1 and h.app.seen == []
        assert h.out.undelivered_total == 0
        assert h.out.probed_total == 1   # delivered: the kernel probes the peer, which answers
        assert h.out.pools.opened == 1   # the same connection all along, still pooled
        await eventually(lambda: h.out.pools.idle.get(h.peer_key), "the connection back in the pool")
        sock = h.out.pools.idle[h.peer_key][0].transport.get_extra_info("socket")
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0   # probes stopped: it answered


def test_safety_net_leaves_a_slow_but_alive_app_alone(run):
    run(_safety_net_spares_slow_apps)


# ---- the real TCP_INFO reader --------------------------------------------------------------------------

def test_tcp_info_layout_matches_linux_tcp_h():
    """struct tcp_info: 8 one-byte fields, then u32s: rto at 8 (us), snd_mss at 16, unacked at 24,
    last_ack_recv at 56; checked against TCP_MAXSEG and the kernel's minimum RTO on a real socket."""
    srv = socket.create_server(("127.0.0.1", 0))
    c = socket.create_connection(srv.getsockname())
    a, _ = srv.accept()
    try:
        c.sendall(b"x" * 100)
        assert a.recv(100) == b"x" * 100
        a.sendall(b"y")
        assert c.recv(1) == b"y"
        raw = c.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        assert len(raw) == 104
        rto, _ato, snd_mss = struct.unpack_from("=3I", raw, 8)
        assert snd_mss == c.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
        assert 200_000 <= rto <= 3_000_000          # TCP_RTO_MIN 200 ms, in microseconds
        unacked, = struct.unpack_from("=I", raw, 24)
        last_ack_recv, = struct.unpack_from("=I", raw, 56)
        assert raw[0] == 1 and unacked == 0 and last_ack_recv < 10_000
    finally:
        for s in (a, c, srv):
            s.close()


async def _reader_on_transports():
    got = {}

    async def handle(reader, writer):
        await reader.readexactly(5)
        writer.write(b"world")
        await writer.drain()
        await reader.read()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname())
        writer.write(b"hello")
        assert await reader.readexactly(5) == b"world"
        await asyncio.sleep(0.05)
        got["info"] = read_tcp_info(writer.transport)
        got["probe"] = probe_peer(writer.transport)
        writer.close()
    finally:
        server.close()

    class NoSocket:
        def get_extra_info(self, name, default=None):
            return None

    class Refuses:
        def get_extra_info(self, name, default=None):
            class Sock:
                def getsockopt(self, *a):
                    raise OSError(95, "not supported")
            return Sock() if name == "socket" else None

    assert read_tcp_info(NoSocket()) is None and read_tcp_info(Refuses()) is None
    assert probe_peer(NoSocket()) is False
    return got


def test_tcp_info_reader_on_a_real_loopback_connection(run):
    got = run(_reader_on_transports)
    info = got["info"]
    assert info is not None and info.state == 1 and info.unacked == 0   # ESTABLISHED, all acknowledged
    assert 0 <= info.last_ack_recv_ms < 10_000 and got["probe"] is True


# ---- a real black hole ---------------------------------------------------------------------------------

def _netns_available() -> bool:
    return (sys.platform == "linux" and hasattr(os, "geteuid") and os.geteuid() == 0
            and all(shutil.which(tool) for tool in ("unshare", "ip", "iptables")))


def test_real_black_hole_in_a_network_namespace():
    """The whole path with the real TCP_INFO reader and keepalive probe, against iptables DROP (what a
    vanished network namespace looks like from the caller) in a private network namespace; both loops,
    in parallel subprocesses."""
    if not _netns_available():
        pytest.skip("needs root, unshare, ip and iptables")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    procs = {
        (loop, hop): subprocess.Popen(
            ["unshare", "-n", "sh", "-c", f'ip link set lo up && exec "{sys.executable}" -m '
                                          f"tests.adapters.test_dead_peer {loop} {hop}"],
            cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for loop in sorted(LOOPS) for hop in ("plain", "mtls")}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=60)
        if proc.returncode != 0 and "Operation not permitted" in err:
            pytest.skip(f"no network namespace here: {err.strip()[-200:]}")
        assert proc.returncode == 0, f"{name}: {err[-3000:]}"
        res = json.loads(out.strip().splitlines()[-1])
        undelivered, vanished, net = res["undelivered"], res["vanished"], res["safety_net"]
        # Withdrawn while the POST was in flight to the black hole: retried, one POST reached an app.
        assert undelivered["status"] == 200 and undelivered["app"] == ["POST"], (name, res)
        assert undelivered["seconds"] < 2.0 and undelivered["peer_posts"] == 0, (name, res)
        # Delivered, then the peer vanished: the kernel's probes time out; 503 UC long before 5 s.
        assert (vanished["status"], vanished["flags"]) == (503, "UC"), (name, res)
        assert vanished["seconds"] < APP_TIMEOUT_S - 0.5 and vanished["app"] == [], (name, res)
        assert vanished["peer_posts"] == 1, (name, res)
        # No snapshot at all: the safety net finds the undelivered POST after ~1 s.
        assert net["status"] == 200 and net["app"] == ["POST"], (name, res)
        assert 1.0 <= net["seconds"] < 2.5 and net["peer_posts"] == 0, (name, res)


class Holder:
    """The TLS hook (`ProxyState(tls=...)`) with one throwaway certificate for `payments`."""

    def __init__(self, directory: str):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
        import datetime
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "payments")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(hours=1))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName("payments")]), critical=False)
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(key, hashes.SHA256()))
        cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        with open(os.path.join(directory, "tls.crt"), "wb") as f:
            f.write(cert_pem)
        with open(os.path.join(directory, "tls.key"), "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        self.server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.server.minimum_version = ssl.TLSVersion.TLSv1_3
        self.server.load_cert_chain(os.path.join(directory, "tls.crt"), os.path.join(directory, "tls.key"))
        self.client = ssl.create_default_context(cadata=cert_pem.decode())

    def server_context(self) -> ssl.SSLContext:
        return self.server

    def client_context(self) -> ssl.SSLContext:
        return self.client


async def _black_hole_scenarios(mtls: bool) -> dict:
    """Runs inside a private network namespace (see the test above); mesh hops over TLS 1.3 or not."""
    tls = Holder(tempfile.mkdtemp()) if mtls else None
    kw = {"tls": tls}
    peer_ctx = tls.server if tls is not None else None
    def drop(port: int, both: bool = False) -> None:
        rules = [["--dport", str(port)]] + ([["--sport", str(port)]] if both else [])
        for match in rules:
            subprocess.run(["iptables", "-A", "INPUT", "-p", "tcp", *match, "-j", "DROP"], check=True)

    def flush() -> None:
        subprocess.run(["iptables", "-F", "INPUT"], check=True)

    def posts(peer: Peer) -> int:
        return peer.lines().count(b"POST /checkout HTTP/1.1")

    results = {}
    async with AsyncExitStack() as stack:
        peer = await Peer(ssl_context=peer_ctx).start(stack)
        h = await Harness(stack).start(peer=peer, **kw)
        await h.warm_up()
        await asyncio.sleep(0.2)                          # our (delayed) ACKs of its answer got there
        drop(peer.port)                                   # from now on nothing reaches the peer
        task = asyncio.ensure_future(h.call("POST", b'{"order": 1}'))
        await asyncio.sleep(0.2)
        h.publish(h.good_ep)
        status, flags, _, seconds = await task
        results["undelivered"] = {"status": status, "flags": flags, "seconds": seconds,
                                  "app": [m for m, _ in h.app.seen], "peer_posts": posts(peer)}
        flush()
    async with AsyncExitStack() as stack:
        peer = await Peer(ssl_context=peer_ctx).start(stack)
        h = await Harness(stack).start(peer=peer, **kw)
        await h.warm_up()
        task = await post_in_flight(h)                    # read by the peer: delivered
        await asyncio.sleep(0.3)                          # its (delayed) ACK has come back
        drop(peer.port, both=True)                        # then the peer vanishes
        h.publish(h.good_ep)
        status, flags, _, seconds = await task
        results["vanished"] = {"status": status, "flags": flags, "seconds": seconds,
                               "app": [m for m, _ in h.app.seen], "peer_posts": posts(peer)}
        flush()
    async with AsyncExitStack() as stack:
        peer = await Peer(ssl_context=peer_ctx).start(stack)
        h = await Harness(stack).start(peer=peer, **kw)
        h.publish(h.peer_ep, h.good_ep)
        h.out.ejected[h.good_key] = monotonic() + 60
        await h.warm_up()
        await asyncio.sleep(0.2)
        drop(peer.port)
        status, flags, _, seconds = await h.call("POST", b'{"order": 3}')
        results["safety_net"] = {"status": status, "flags": flags, "seconds": seconds,
                                 "app": [m for m, _ in h.app.seen], "peer_posts": posts(peer)}
        flush()
    return results


if __name__ == "__main__":
    with asyncio.Runner(loop_factory=LOOPS[sys.argv[1]]) as runner:
        print(json.dumps(runner.run(asyncio.wait_for(_black_hole_scenarios(sys.argv[2] == "mtls"), 50))))
