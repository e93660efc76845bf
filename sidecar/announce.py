"""mDNS announcement of this instance (DNS-SD), on the container's own non-loopback addresses.

A small responder of our own (meshcore.mdns) on one UDP socket: announce at start, answer queries
for our records, say goodbye at stop. meshd browses and resolves with python-zeroconf.
"""

from __future__ import annotations

import asyncio
import fcntl
import random
import socket
import struct

import structlog

from meshcore import mdns
from meshcore.dnssd import SERVICE_TYPE, encode_txt, instance_name
from meshcore.snapshot import Announcement

log = structlog.get_logger("sidecar.announce")

SIOCGIFADDR = 0x8915                      # linux/sockios.h: an interface's IPv4 address
ANNOUNCE_INTERVALS_S = (0.0, 1.0, 2.0)   # RFC 6762 8.3: at least twice, one second apart, then doubling


def local_ipv4_addresses() -> list[str]:
    """The namespace's IPv4 addresses other than loopback (its Docker networks)."""
    out = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _index, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:    # no IPv4 address on this interface
                continue
            addr = socket.inet_ntoa(raw[20:24])
            if not addr.startswith("127."):
                out.append(addr)
    return sorted(set(out))


class Announcer:
    """Registers this instance over mDNS, answers for it, and withdraws it (goodbye) on close."""

    def __init__(self, container: str, service: str, version: str, identity: str, protocol: str, port: int,
                 addresses: list[str] | None = None):
        self.container = container
        self.service = service
        self.version = version
        self.identity = identity
        self.protocol = protocol
        self.port = port
        self.addresses = addresses   # None: the namespace's own (local_ipv4_addresses)
        self.records: tuple[mdns.Record, ...] = ()
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timers: set[asyncio.TimerHandle] = set()

    async def start(self) -> None:
        """Join the mDNS group on every local non-loopback IPv4 address and announce there."""
        addresses = self.addresses if self.addresses is not None else local_ipv4_addresses()
        if not addresses:
            log.warning("mdns_no_address")
            return
        self.addresses = addresses
        ann = Announcement(instance=self.container, service=self.service, version=self.version,
                           address=addresses[0], port=self.port, identity=self.identity, protocol=self.protocol)
        name = instance_name(self.container)
        self.records = mdns.build_records(SERVICE_TYPE, name, f"{self.container[:12]}.local.", self.port,
                                          encode_txt(ann), addresses)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 255)   # RFC 6762 section 11
            sock.bind(("", mdns.MDNS_PORT))
            for addr in addresses:
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                                socket.inet_aton(mdns.MDNS_GROUP) + socket.inet_aton(addr))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._on_readable)
        for delay in ANNOUNCE_INTERVALS_S:
            self._later(delay, self._multicast, mdns.encode_response(self.records))
        log.info("mdns_announced", name=name, addresses=addresses, service=self.service, version=self.version)

    def _later(self, delay: float, fn, *args) -> None:
        assert self._loop is not None
        handle: asyncio.TimerHandle | None = None

        def run() -> None:
            self._timers.discard(handle)
            fn(*args)

        handle = self._loop.call_later(delay, run)
        self._timers.add(handle)

    def _multicast(self, packet: bytes) -> None:
        """Send to the group on each of our interfaces (a container sits on one or two networks)."""
        if self._sock is None:
            return
        for addr in self.addresses or ():
            try:
                self._sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(addr))
                self._sock.sendto(packet, (mdns.MDNS_GROUP, mdns.MDNS_PORT))
            except OSError as exc:   # a network detached meanwhile: the others still get it
                log.warning("mdns_send_failed", address=addr, error=str(exc))

    def _on_readable(self) -> None:
        if self._sock is None:
            return
        try:
            packet, (host, port) = self._sock.recvfrom(mdns.MAX_PACKET)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.warning("mdns_receive_failed", error=str(exc))
            return
        try:
            query = mdns.decode_query(packet)
            if query is None:
                return
            answers, additionals = mdns.build_answer(query, self.records)
        except ValueError as exc:   # someone else's malformed packet: never ours to fail on
            log.debug("mdns_bad_packet", source=host, error=str(exc))
            return
        if not answers:
            return
        if port != mdns.MDNS_PORT:   # RFC 6762 6.7: a one-shot querier gets a unicast reply
            try:
                self._sock.sendto(mdns.encode_response(answers, additionals, query=query), (host, port))
            except OSError as exc:
                log.warning("mdns_send_failed", address=host, error=str(exc))
            return
        packet = mdns.encode_response(answers, additionals)
        # RFC 6762 section 6: answers with shared records wait 20-120 ms so responders don't collide.
        self._later(random.uniform(0.020, 0.120) if mdns.has_shared(answers) else 0.0, self._multicast, packet)

    async def close(self) -> None:
        """Withdraw the records (TTL 0, RFC 6762 10.1) and stop answering."""
        if self._sock is None:
            return
        for handle in self._timers:
            handle.cancel()
        self._timers.clear()
        self._multicast(mdns.encode_response(self.records, ttl=0))
        assert self._loop is not None
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        self._sock = None
