"""mDNS browsing for meshd: instances announced by sidecars, on the mesh's bridge networks only."""

from __future__ import annotations

import asyncio
import socket
from typing import Callable

import structlog
from zeroconf import ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from meshcore.dnssd import SERVICE_TYPE, decode_txt
from meshcore.snapshot import Announcement

log = structlog.get_logger("meshd.discovery")


def address_missing(address: str) -> str | None:
    """Why the host cannot use `address` now (e.g. its bridge was removed), or None when it can."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((address, 0))
    except OSError as exc:
        return f"address not on this host: {exc.strerror or exc}"
    return None


class Discovery:
    """Keeps the set of announced instances; calls `on_change` whenever it changes."""

    def __init__(self, on_change: Callable[[], None]):
        self.on_change = on_change
        self.records: dict[str, list[Announcement]] = {}  # DNS-SD instance name -> announcements
        self.interfaces: tuple[str, ...] = ()
        self._azc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._tasks: set[asyncio.Task] = set()

    def announcements(self) -> list[Announcement]:
        """Every announcement currently known."""
        return [a for anns in self.records.values() for a in anns]

    async def apply_interfaces(self, interfaces: list[str]) -> dict[str, str]:
        """Browse on these IPv4 addresses (bridge gateways) that exist on the host; restarts when the
        set changes. Returns the addresses it could not browse on, with the reason (retried by the
        next call): a bridge removed since Docker listed it must not stop browsing on the others."""
        failed = {addr: why for addr in sorted(set(interfaces)) if (why := address_missing(addr))}
        wanted = tuple(sorted(set(interfaces) - set(failed)))
        if wanted == self.interfaces:
            return failed
        await self.close()
        if not wanted:
            return failed
        try:
            # Never InterfaceChoice.All: that would put mDNS on the host's uplink.
            self._azc = AsyncZeroconf(interfaces=list(wanted))
        except OSError as exc:
            self._azc = None
            return {**failed, **{addr: f"mDNS: {exc}" for addr in wanted}}
        self.interfaces = wanted
        self._browser = AsyncServiceBrowser(self._azc.zeroconf, SERVICE_TYPE, handlers=[self._on_state])
        log.info("mdns_browsing", interfaces=list(wanted))
        return failed

    def _on_state(self, zeroconf: Zeroconf, service_type: str, name: str,
                  state_change: ServiceStateChange) -> None:
        if state_change is ServiceStateChange.Removed:
            if self.records.pop(name, None) is not None:
                self.on_change()
            return
        task = asyncio.ensure_future(self._resolve(zeroconf, service_type, name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, zeroconf: Zeroconf, service_type: str, name: str) -> None:
        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(zeroconf, 3000):
            return
        anns = decode_txt(info.properties or {}, info.parsed_addresses(), info.port or 0)
        if self.records.get(name) != anns:
            self.records[name] = anns
            self.on_change()

    async def close(self) -> None:
        """Stop browsing."""
        if self._browser is not None:
            await self._browser.async_cancel()
            self._browser = None
        if self._azc is not None:
            await self._azc.async_close()
            self._azc = None
        # Records are kept: they are joined with Docker's view at each rebuild anyway, and clearing
        # them here would empty every endpoint table while the browser restarts.
        self.interfaces = ()

    def prune(self, live_containers: set[str]) -> None:
        """Forget records of containers that no longer exist."""
        for name in [n for n, anns in self.records.items()
                     if not any(a.instance in live_containers for a in anns)]:
            del self.records[name]
