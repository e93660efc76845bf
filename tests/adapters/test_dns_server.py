"""The sidecar's DNS proxy on loopback, with a fake upstream resolver (UDP and TCP), on both loops."""

from __future__ import annotations

import asyncio
import struct


from meshcore.dnsname import decode_name, encode_name
from meshcore.snapshot import Endpoint, MeshConfig, ServiceConfig, Snapshot
from sidecar.dns import TYPE_A, TYPE_AAAA, build_response, parse_query, start_dns
from sidecar.proxy import ProxyState

UPSTREAM_ADDR = "192.0.2.53"   # what the fake upstream answers for every name


def query(name: str, ident: int, qtype: int = TYPE_A) -> bytes:
    return struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + encode_name(name) + struct.pack("!HH", qtype, 1)


def addresses(msg: bytes) -> list[str]:
    an = struct.unpack_from("!H", msg, 6)[0]
    _, offset = decode_name(msg, 12)
    offset += 4
    out = []
    for _ in range(an):
        _, offset = decode_name(msg, offset)
        rtype, _, _, rdlen = struct.unpack_from("!HHIH", msg, offset)
        offset += 10
        if rtype == TYPE_A:
            out.append(".".join(str(b) for b in msg[offset:offset + rdlen]))
        offset += rdlen
    return out


class FakeResolver:
    """Answers every A query with UPSTREAM_ADDR, over UDP and TCP; records the queries it got."""

    def __init__(self):
        self.seen: list[tuple[int, str]] = []   # (id as received, name)
        self.udp = None
        self.tcp = None

    async def start(self) -> FakeResolver:
        loop = asyncio.get_running_loop()
        outer = self

        class Udp(asyncio.DatagramProtocol):
            def connection_made(self, transport):
                self.transport = transport

            def datagram_received(self, data, addr):
                self.transport.sendto(outer.answer(data), addr)

        for _ in range(20):  # one free port for UDP and TCP
            self.udp, _ = await loop.create_datagram_endpoint(Udp, local_addr=("127.0.0.1", 0))
            port = self.udp.get_extra_info("sockname")[1]
            try:
                self.tcp = await asyncio.start_server(self._tcp, "127.0.0.1", port)
                break
            except OSError:
                self.udp.close()
        self.port = port
        return self

    def answer(self, data: bytes) -> bytes:
        q = parse_query(data)
        self.seen.append((q.id, q.name))
        return build_response(q, (UPSTREAM_ADDR,), ttl=60, authoritative=False)

    async def _tcp(self, reader, writer):
        try:
            while True:
                n = struct.unpack("!H", await reader.readexactly(2))[0]
                reply = self.answer(await reader.readexactly(n))
                writer.write(struct.pack("!H", len(reply)) + reply)
        except asyncio.IncompleteReadError:
            writer.close()

    def close(self):
        self.udp.close()
        self.tcp.close()


class UdpClient(asyncio.DatagramProtocol):
    def __init__(self):
        self.replies: asyncio.Queue = asyncio.Queue()

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.replies.put_nowait(data)


async def udp_ask(port: int, msg: bytes) -> bytes:
    loop = asyncio.get_running_loop()
    transport, client = await loop.create_datagram_endpoint(UdpClient, remote_addr=("127.0.0.1", port))
    try:
        transport.sendto(msg)
        return await client.replies.get()
    finally:
        transport.close()


async def tcp_ask(port: int, *msgs: bytes) -> list[bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out = []
    for msg in msgs:
        writer.write(struct.pack("!H", len(msg)) + msg)
        n = struct.unpack("!H", await reader.readexactly(2))[0]
        out.append(await reader.readexactly(n))
    writer.close()
    return out


def snapshot(*names: str) -> Snapshot:
    services = {n: ServiceConfig(name=n, namespace="shop", protocol="http", port=8080, identity=f"id-{n}",
                                 aliases=(f"{n}-svc",)) for n in names}
    endpoints = {n: (Endpoint(f"{n}1", "172.18.0.9", 15006, "v1", f"id-{n}"),) for n in names}
    return Snapshot(version=1, config=MeshConfig(services=services, endpoints=endpoints))


async def _dns():
    upstream = await FakeResolver().start()
    state = ProxyState("frontend", "v1")
    state.apply_snapshot(snapshot("catalog"))
    server = await start_dns(state, "127.0.0.1", 0, upstream=("127.0.0.1", upstream.port))
    try:
        vip = state.table.vips["catalog"]
        assert vip.startswith("240.240.")
        # Mesh names: answered here with the VIP, bare, with the namespace, aliases, any letter case.
        for name in ("catalog", "Catalog.Shop", "catalog-svc", "catalog-svc.shop."):
            reply = await udp_ask(server.port, query(name, 0x4242))
            assert struct.unpack_from("!H", reply, 0)[0] == 0x4242 and addresses(reply) == [vip], name
        reply = await udp_ask(server.port, query("catalog", 7, TYPE_AAAA))
        assert addresses(reply) == [] and reply[3] & 0xF == 0     # NODATA, not NXDOMAIN
        assert upstream.seen == []
        # Anything else goes to the upstream; the answer comes back with the client's own ID, even when
        # two clients use the same ID at once.
        a, b = await asyncio.gather(udp_ask(server.port, query("example.com", 0x0101)),
                                    udp_ask(server.port, query("example.org", 0x0101)))
        assert struct.unpack_from("!H", a, 0)[0] == 0x0101 == struct.unpack_from("!H", b, 0)[0]
        assert addresses(a) == [UPSTREAM_ADDR] == addresses(b)
        assert parse_query(a).name == "example.com" and parse_query(b).name == "example.org"
        assert sorted(n for _, n in upstream.seen) == ["example.com", "example.org"]
        assert len({i for i, _ in upstream.seen}) == 2                   # rewritten: no collision upstream
        # TCP: local and forwarded answers on one connection.
        local, forwarded = await tcp_ask(server.port, query("catalog.shop", 5), query("db.internal", 6))
        assert addresses(local) == [vip] and struct.unpack_from("!H", local, 0)[0] == 5
        assert addresses(forwarded) == [UPSTREAM_ADDR] and struct.unpack_from("!H", forwarded, 0)[0] == 6
        # A new snapshot: the new service is answered, the old one keeps its VIP.
        state.apply_snapshot(snapshot("catalog", "orders"))
        reply = await udp_ask(server.port, query("orders.shop", 8))
        assert addresses(reply) == [state.table.vips["orders"]] and state.table.vips["catalog"] == vip
        assert server.answered == 7 and server.forwarded == 3
    finally:
        server.close()
        upstream.close()
        state.close()


def test_dns_proxy_answers_mesh_names_and_forwards_the_rest(run):
    run(_dns)


async def _upstream_down():
    upstream = await FakeResolver().start()
    port = upstream.port
    upstream.close()   # nothing listens there any more
    state = ProxyState("frontend", "v1")
    state.apply_snapshot(snapshot("catalog"))
    server = await start_dns(state, "127.0.0.1", 0, upstream=("127.0.0.1", port))
    try:
        failed, local = await tcp_ask(server.port, query("example.com", 9), query("catalog", 10))
        assert struct.unpack_from("!H", failed, 0)[0] == 9 and failed[3] & 0xF == 2   # SERVFAIL
        assert addresses(local) == [state.table.vips["catalog"]]                      # still answers
    finally:
        server.close()
        state.close()


def test_dns_proxy_tcp_says_servfail_when_the_upstream_is_down(run):
    run(_upstream_down)
