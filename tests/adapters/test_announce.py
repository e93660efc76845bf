"""sidecar.announce's responder on loopback, found and resolved by python-zeroconf as meshd uses it."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest
from zeroconf import DNSIncoming, DNSOutgoing, DNSQuestion, ServiceStateChange, const
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from meshcore import mdns
from meshcore.dnssd import SERVICE_TYPE, decode_txt, instance_name
from meshcore.snapshot import Announcement
from sidecar import announce
from sidecar.announce import Announcer

LO = "127.0.0.1"
CONTAINER = "0123456789ab" + "cd" * 26
IDENTITY = "spiffe://mesh.local/ns/default/sa/payments"


class Browser:
    """meshd's way of browsing (meshd.discovery): zeroconf on one address, resolve on Added."""

    def __init__(self):
        self.events: list[tuple[ServiceStateChange, str]] = []
        self.resolved: dict[str, list[Announcement]] = {}
        self.azc = AsyncZeroconf(interfaces=[LO])
        self._tasks = set()
        self.browser = AsyncServiceBrowser(self.azc.zeroconf, SERVICE_TYPE, handlers=[self._on])

    def _on(self, zeroconf, service_type, name, state_change):
        self.events.append((state_change, name))
        if state_change is not ServiceStateChange.Removed:
            task = asyncio.ensure_future(self._resolve(zeroconf, name))
            self._tasks.add(task)

    async def _resolve(self, zeroconf, name):
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if await info.async_request(zeroconf, 3000):
            self.resolved[name] = decode_txt(info.properties or {}, info.parsed_addresses(), info.port or 0)

    async def close(self):
        await self.browser.async_cancel()
        await self.azc.async_close()


async def eventually(check, timeout=8.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def announcer() -> Announcer:
    return Announcer(CONTAINER, "payments", "v2", IDENTITY, "http", 15006, addresses=[LO])


EXPECTED = [Announcement(instance=CONTAINER, service="payments", version="v2", address=LO, port=15006,
                         identity=IDENTITY, protocol="http")]


async def test_announced_instance_is_found_resolved_and_withdrawn():
    browser = Browser()
    ann = announcer()
    try:
        await ann.start()
        name = instance_name(CONTAINER)
        await eventually(lambda: name in browser.resolved)
        assert browser.resolved[name] == EXPECTED
        await ann.close()
        await eventually(lambda: (ServiceStateChange.Removed, name) in browser.events)
    finally:
        await ann.close()
        await browser.close()


async def test_browser_started_later_gets_answers_to_its_queries(monkeypatch):
    """Only the first announcement goes out; a browser that starts afterwards finds the instance
    through the responder's answer to its PTR query (SRV, TXT and A as additionals)."""
    monkeypatch.setattr(announce, "ANNOUNCE_INTERVALS_S", (0.0,))
    ann = announcer()
    await ann.start()
    await asyncio.sleep(0.3)
    browser = Browser()
    try:
        await eventually(lambda: instance_name(CONTAINER) in browser.resolved)
        assert browser.resolved[instance_name(CONTAINER)] == EXPECTED
    finally:
        await ann.close()
        await browser.close()


def legacy_query(name: str, qtype: int, qid: int) -> bytes:
    out = DNSOutgoing(const._FLAGS_QR_QUERY)
    out.add_question(DNSQuestion(name, qtype, const._CLASS_IN))
    packet = bytearray(out.packets()[0])
    packet[0:2] = struct.pack("!H", qid)
    return bytes(packet)


async def test_garbage_is_ignored_and_legacy_querier_gets_a_unicast_reply(monkeypatch):
    monkeypatch.setattr(announce, "ANNOUNCE_INTERVALS_S", ())
    ann = announcer()
    await ann.start()
    loop = asyncio.get_running_loop()
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(LO))
    client.bind((LO, 0))
    client.setblocking(False)
    try:
        for junk in (b"", b"\xff" * 40, b"\x00\x00\x00\x00\x00\x01" + b"\x00" * 6 + b"\xc0\x0c"):
            client.sendto(junk, (mdns.MDNS_GROUP, mdns.MDNS_PORT))
        client.sendto(legacy_query(instance_name(CONTAINER), const._TYPE_SRV, 0x4242),
                      (mdns.MDNS_GROUP, mdns.MDNS_PORT))
        reply = await asyncio.wait_for(loop.sock_recv(client, mdns.MAX_PACKET), 5)
        msg = DNSIncoming(reply)
        assert msg.id == 0x4242 and msg.is_response()
        srv = [r for r in msg.answers() if r.type == const._TYPE_SRV]
        assert [(r.port, r.ttl) for r in srv] == [(15006, mdns.LEGACY_TTL)]
    finally:
        client.close()
        await ann.close()


def test_local_addresses_leave_out_loopback():
    addresses = announce.local_ipv4_addresses()
    assert all(not a.startswith("127.") for a in addresses)
    assert all(len(socket.inet_aton(a)) == 4 for a in addresses)


@pytest.mark.parametrize("addresses", [[]])
async def test_no_address_means_no_socket(addresses):
    ann = Announcer(CONTAINER, "payments", "v2", IDENTITY, "http", 15006, addresses=addresses)
    await ann.start()
    assert ann._sock is None
    await ann.close()
