"""DNS for mesh names in the app's namespace (Istio's "DNS proxying"), on 127.0.0.1:15053.

Transparent capture redirects the app's queries to Docker's embedded resolver (127.0.0.11:53, UDP
and TCP) here (sidecar.capture, chain MESH_DNS; the sidecar's own uid is exempt, so what it forwards
reaches Docker). A-queries for a mesh service name or alias, bare or with `.namespace`
(`catalog`, `catalog.shop`; a bare name resolves in the node's own project first, as the route table's
host names do), are answered with the service's virtual IP; every other query is
forwarded unchanged to the upstream of /etc/resolv.conf (Docker's resolver) and its answer relayed.

Virtual IPs: one per service from 240.240.0.0/16 (RFC 1112 section 4 reserves 240.0.0.0/4; Istio
auto-allocates service addresses from this same /16). An app connecting to a VIP always goes through
capture (nothing else routes there), and the outbound listener maps the original destination back to
the service (`RouteTable.vips`), Host header or not. The address does not depend on which replicas
exist, so a cached answer never points at a replica that has gone. A VIP is the hash of
`name.namespace` (linear probing on a collision) and stays with its service for the sidecar's life.

Message format: RFC 1035 section 4.1 (header 4.1.1, question 4.1.2, resource records 4.1.3, name
compression 4.1.4; names are read by meshcore.dnsname); TCP messages carry a two-byte length prefix (RFC 1035 section 4.2.2). A mesh
name asked for another type (AAAA, RFC 3596, and the rest) gets an empty NOERROR answer ("NODATA",
RFC 2308 section 2.2), so a resolver does not go looking for it elsewhere.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import struct
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from meshcore.dnsname import DnsFormatError, decode_name
from meshcore.snapshot import base_name

log = logging.getLogger("sidecar.dns")

DNS_PORT = 15053
VIP_NETWORK = ipaddress.IPv4Network("240.240.0.0/16")
DEFAULT_UPSTREAM = ("127.0.0.11", 53)   # Docker's embedded resolver
TTL_S = 30
UPSTREAM_TIMEOUT_S = 5.0

TYPE_A = 1
TYPE_AAAA = 28
CLASS_IN = 1
RCODE_FORMERR = 1
RCODE_SERVFAIL = 2
_HEADER = struct.Struct("!HHHHHH")       # RFC 1035 4.1.1: ID, flags, QD/AN/NS/AR counts
_QR = 0x8000
_OPCODE = 0x7800
_AA = 0x0400
_TC = 0x0200
_RD = 0x0100
_RA = 0x0080


@dataclass(frozen=True)
class Query:
    """The parts of a query the proxy needs."""

    id: int
    flags: int
    name: str            # lower case, no trailing dot ("" is the root)
    qtype: int
    qclass: int
    question: bytes      # the question section exactly as received (echoed in answers)
    qdcount: int


def parse_query(msg: bytes) -> Query:
    """The header and first question of a message; DnsFormatError when it is malformed."""
    if len(msg) < _HEADER.size:
        raise DnsFormatError("shorter than a header")
    ident, flags, qdcount, _an, _ns, _ar = _HEADER.unpack_from(msg, 0)
    if qdcount < 1:
        raise DnsFormatError("no question")
    name, offset = decode_name(msg, _HEADER.size)
    name = name[:-1].lower()   # mesh names are matched without the root's dot, case-insensitively
    if offset + 4 > len(msg):
        raise DnsFormatError("question runs past the message")
    qtype, qclass = struct.unpack_from("!HH", msg, offset)
    return Query(id=ident, flags=flags, name=name, qtype=qtype, qclass=qclass,
                 question=msg[_HEADER.size:offset + 4], qdcount=qdcount)


def build_response(query: Query, addresses: Iterable[str] = (), ttl: int = TTL_S, rcode: int = 0,
                   authoritative: bool = True) -> bytes:
    """A response to `query`: its question echoed, one A record per address (the name as a pointer to
    the question's, RFC 1035 4.1.4), no authority or additional records."""
    answers = []
    for addr in addresses:
        answers.append(struct.pack("!HHHIH", 0xC00C, TYPE_A, CLASS_IN, ttl, 4)
                       + ipaddress.IPv4Address(addr).packed)
    flags = _QR | (query.flags & (_OPCODE | _RD)) | _RA | (rcode & 0xF)
    if authoritative:
        flags |= _AA
    head = _HEADER.pack(query.id, flags, 1, len(answers), 0, 0)
    return head + query.question + b"".join(answers)


def error_response(msg: bytes, rcode: int) -> bytes | None:
    """A header-only error answer (FORMERR, SERVFAIL) to whatever header `msg` has; None without one."""
    if len(msg) < 4:
        return None
    ident, flags = struct.unpack_from("!HH", msg, 0)
    return _HEADER.pack(ident, _QR | (flags & (_OPCODE | _RD)) | _RA | rcode, 0, 0, 0, 0)


def answer_locally(query: Query, names: Mapping[str, str], ttl: int = TTL_S) -> bytes | None:
    """The answer to a query for a mesh name, or None to forward it (not a mesh name, not a
    standard query, not class IN)."""
    if query.flags & (_QR | _OPCODE) or query.qdcount != 1 or query.qclass != CLASS_IN:
        return None
    vip = names.get(query.name)
    if vip is None:
        return None
    if query.qtype == TYPE_A:
        return build_response(query, (vip,), ttl)
    return build_response(query, (), ttl)   # NODATA: the name exists, with no record of this type


def with_id(msg: bytes, ident: int) -> bytes:
    return struct.pack("!H", ident) + msg[2:]


# ---- names and virtual IPs ---------------------------------------------------------------------

def _vip_slot(key: str) -> int:
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=4).digest()
    return int.from_bytes(digest, "big") % (VIP_NETWORK.num_addresses - 2) + 1   # not .0.0, not .255.255


class VipAllocator:
    """Virtual IPs for services, sticky for the allocator's life: a service keeps its VIP, and a VIP
    once given is not given to another service (apps cache answers)."""

    def __init__(self) -> None:
        self.by_key: dict[str, str] = {}
        self.taken: set[int] = set()

    def vip(self, name: str, namespace: str) -> str:
        key = f"{name}.{namespace}"
        vip = self.by_key.get(key)
        if vip is None:
            size = VIP_NETWORK.num_addresses - 2
            slot = _vip_slot(key)
            while slot in self.taken:
                slot = slot % size + 1
                if len(self.taken) >= size:
                    raise RuntimeError("virtual IP range exhausted")
            self.taken.add(slot)
            vip = self.by_key[key] = str(VIP_NETWORK.network_address + slot)
        return vip

    def assign(self, services: Mapping[str, Any]) -> dict[str, str]:
        """service name -> VIP for a snapshot's services (ServiceConfig: name, namespace), in name order
        so that first-time collisions resolve the same way in every sidecar."""
        return {name: self.vip(base_name(name), services[name].namespace) for name in sorted(services)}


def mesh_names(table: Any) -> dict[str, str]:
    """DNS name -> VIP from a route table: the host names it routes (each service's name and aliases,
    bare as the node's project resolves them and `.namespace`), without ports and VIPs."""
    vips = table.vips
    taken = set(vips.values())
    names: dict[str, str] = {}
    for host, cluster in table.hosts.items():
        vip = vips.get(cluster.name)
        if vip is not None and ":" not in host and host not in taken:
            names[host] = vip
    return names


def read_upstream(path: str = "/etc/resolv.conf") -> tuple[str, int]:
    """The first IPv4 `nameserver` of a resolv.conf, port 53; Docker's resolver if there is none."""
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    try:
                        ipaddress.IPv4Address(parts[1])
                    except ValueError:
                        continue
                    return parts[1], 53
    except OSError:
        pass
    return DEFAULT_UPSTREAM


# ---- the server --------------------------------------------------------------------------------

class _Upstream(asyncio.DatagramProtocol):
    """The UDP socket queries are forwarded on; IDs are rewritten so clients cannot collide."""

    def __init__(self, server: "DnsServer"):
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.server._from_upstream(data)

    def error_received(self, exc: Exception) -> None:
        log.debug("dns upstream error: %r", exc)


class _Front(asyncio.DatagramProtocol):
    """The UDP listener the app's queries are redirected to."""

    def __init__(self, server: "DnsServer"):
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.server._from_client(data, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("dns client error: %r", exc)


class DnsServer:
    """UDP and TCP DNS on one port: mesh names answered from `names()`, the rest forwarded."""

    def __init__(self, names: Callable[[], Mapping[str, str]], upstream: tuple[str, int] = DEFAULT_UPSTREAM,
                 *, ttl: int = TTL_S, timeout: float = UPSTREAM_TIMEOUT_S):
        self.names = names
        self.upstream = upstream
        self.ttl = ttl
        self.timeout = timeout
        self.front: _Front | None = None
        self.up: _Upstream | None = None
        self.tcp: asyncio.AbstractServer | None = None
        self.pending: dict[int, tuple[int, Any, asyncio.TimerHandle]] = {}
        self.next_id = 0
        self.answered = 0
        self.forwarded = 0

    async def start(self, host: str, port: int) -> "DnsServer":
        """Listen on UDP and TCP `port` of `host` (port 0: one free port for both)."""
        loop = asyncio.get_running_loop()
        for attempt in range(20):
            transport, self.front = await loop.create_datagram_endpoint(lambda: _Front(self),
                                                                        local_addr=(host, port))
            bound = transport.get_extra_info("sockname")[1]
            try:
                self.tcp = await asyncio.start_server(self._tcp_client, host, bound, reuse_address=True)
                break
            except OSError:
                transport.close()
                if port or attempt == 19:
                    raise
        _, self.up = await loop.create_datagram_endpoint(lambda: _Upstream(self), remote_addr=self.upstream)
        return self

    def is_serving(self) -> bool:
        return self.tcp is not None and self.tcp.is_serving()

    @property
    def port(self) -> int:
        return self.front.transport.get_extra_info("sockname")[1]

    def close(self) -> None:
        for _, _, timer in self.pending.values():
            timer.cancel()
        self.pending.clear()
        for proto in (self.front, self.up):
            if proto is not None and proto.transport is not None:
                proto.transport.close()
        if self.tcp is not None:
            self.tcp.close()

    def answer(self, msg: bytes) -> bytes | None:
        """The local answer to a query message, or None to forward it."""
        try:
            query = parse_query(msg)
        except DnsFormatError:
            return None  # the upstream decides what to say to it
        reply = answer_locally(query, self.names(), self.ttl)
        if reply is not None:
            self.answered += 1
        return reply

    # -- UDP

    def _from_client(self, data: bytes, addr: Any) -> None:
        if len(data) < _HEADER.size:
            return
        reply = self.answer(data)
        if reply is not None:
            self.front.transport.sendto(reply, addr)
            return
        if len(self.pending) >= 0xFFFF:
            return  # every ID in use: drop, the client retries
        ident = self.next_id
        while ident in self.pending:
            ident = (ident + 1) & 0xFFFF
        self.next_id = (ident + 1) & 0xFFFF
        orig = struct.unpack_from("!H", data, 0)[0]
        timer = asyncio.get_running_loop().call_later(self.timeout, self.pending.pop, ident, None)
        self.pending[ident] = (orig, addr, timer)
        self.forwarded += 1
        self.up.transport.sendto(with_id(data, ident))

    def _from_upstream(self, data: bytes) -> None:
        if len(data) < 2:
            return
        entry = self.pending.pop(struct.unpack_from("!H", data, 0)[0], None)
        if entry is None:
            return  # late or unknown
        orig, addr, timer = entry
        timer.cancel()
        self.front.transport.sendto(with_id(data, orig), addr)

    # -- TCP (RFC 1035 4.2.2: each message after a two-byte length)

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while True:
                try:
                    size = struct.unpack("!H", await reader.readexactly(2))[0]
                    msg = await reader.readexactly(size)
                except asyncio.IncompleteReadError:
                    return
                reply = self.answer(msg)
                if reply is None:
                    try:
                        if upstream is None:
                            upstream = await asyncio.wait_for(asyncio.open_connection(*self.upstream), self.timeout)
                        up_reader, up_writer = upstream
                        up_writer.write(struct.pack("!H", len(msg)) + msg)
                        n = struct.unpack("!H", await asyncio.wait_for(up_reader.readexactly(2), self.timeout))[0]
                        reply = await asyncio.wait_for(up_reader.readexactly(n), self.timeout)
                        self.forwarded += 1
                    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as exc:
                        log.debug("dns tcp upstream failed: %r", exc)
                        if upstream is not None:
                            upstream[1].close()
                            upstream = None
                        reply = error_response(msg, RCODE_SERVFAIL)
                        if reply is None:
                            return
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            if upstream is not None:
                upstream[1].close()
            writer.close()


def table_names(state: Any) -> Callable[[], Mapping[str, str]]:
    """names() for a ProxyState: the mesh names of its current route table (recomputed per table)."""
    cache: list = [None, {}]

    def names() -> Mapping[str, str]:
        table = state.table
        if cache[0] is not table:
            cache[0] = table
            cache[1] = mesh_names(table)
        return cache[1]
    return names


async def start_dns(state: Any, host: str = "127.0.0.1", port: int = DNS_PORT, *,
                    upstream: tuple[str, int] | None = None) -> DnsServer:
    """The DNS proxy of a sidecar: mesh names of `state.table` answered with their VIPs, the rest sent
    to `upstream` (default: the first nameserver of /etc/resolv.conf, read now). Close it with close()."""
    server = DnsServer(table_names(state), upstream or read_upstream())
    await server.start(host, port)
    log.info("dns proxy on %s:%d, upstream %s:%d", host, server.port, *server.upstream)
    return server
