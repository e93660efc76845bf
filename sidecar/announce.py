"""mDNS announcement of this instance (DNS-SD), on the container's own non-loopback addresses."""

from __future__ import annotations

import socket

import ifaddr
import structlog
from zeroconf import ServiceInfo
from zeroconf.asyncio import AsyncZeroconf

from meshcore.dnssd import SERVICE_TYPE, encode_txt, instance_name
from meshcore.snapshot import Announcement

log = structlog.get_logger("sidecar.announce")


def local_ipv4_addresses() -> list[str]:
    """The namespace's IPv4 addresses other than loopback (its Docker networks)."""
    out = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and not ip.ip.startswith("127."):
                out.append(ip.ip)
    return sorted(set(out))


class Announcer:
    """Registers this instance over mDNS and withdraws it (goodbye packets) on close."""

    def __init__(self, container: str, service: str, version: str, identity: str, protocol: str, port: int):
        self.container = container
        self.service = service
        self.version = version
        self.identity = identity
        self.protocol = protocol
        self.port = port
        self._azc: AsyncZeroconf | None = None
        self._info: ServiceInfo | None = None

    async def start(self) -> None:
        """Announce on every local non-loopback IPv4 address."""
        addresses = local_ipv4_addresses()
        if not addresses:
            log.warning("mdns_no_address")
            return
        ann = Announcement(instance=self.container, service=self.service, version=self.version,
                           address=addresses[0], port=self.port, identity=self.identity,
                           protocol=self.protocol)
        name = instance_name(self.container)
        self._info = ServiceInfo(SERVICE_TYPE, name, port=self.port, properties=encode_txt(ann),
                                 addresses=[socket.inet_aton(a) for a in addresses],
                                 server=f"{self.container[:12]}.local.")
        self._azc = AsyncZeroconf(interfaces=addresses)
        await self._azc.async_register_service(self._info, allow_name_change=False)
        log.info("mdns_announced", name=name, addresses=addresses, service=self.service, version=self.version)

    async def close(self) -> None:
        """Withdraw the record and stop."""
        if self._azc is not None:
            if self._info is not None:
                await self._azc.async_unregister_service(self._info)
            await self._azc.async_close()
            self._azc = None
