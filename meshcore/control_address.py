"""Which address a node may dial meshd at: one of its own host's, read from its namespace's routes.

A sidecar lives in its app's network namespace. On a Docker bridge network the host is that
namespace's default gateway, and every address on a directly connected (on-link) subnet is on the
same host-local bridge. An address reached *through* a gateway is not: with a stale address from a
network that Compose re-created, the connection would be routed off the machine, where anything may
answer. So the node dials the configured host only while it is on-link (or loopback), and otherwise
its namespace's current default gateway; never an address that needs a router.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

RTF_UP = 0x0001       # route usable (linux/route.h)
RTF_GATEWAY = 0x0002  # destination reached through a gateway (linux/route.h)


@dataclass(frozen=True)
class Route:
    """One IPv4 route of the namespace (a row of /proc/net/route)."""

    interface: str
    network: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address | None   # None: on-link

    @property
    def is_default(self) -> bool:
        return self.network.prefixlen == 0


def _hex_ipv4(value: str) -> ipaddress.IPv4Address:
    """An address as /proc/net/route writes it: 8 hex digits in host (little-endian) byte order."""
    return ipaddress.IPv4Address(socket.inet_ntoa(struct.pack("<I", int(value, 16))))


def parse_proc_net_route(text: str) -> list[Route]:
    """The usable routes of /proc/net/route's text; malformed rows are skipped."""
    routes = []
    for line in text.splitlines()[1:]:
        cols = line.split()
        if len(cols) < 8:
            continue
        try:
            flags = int(cols[3], 16)
            dest, gateway, mask = _hex_ipv4(cols[1]), _hex_ipv4(cols[2]), _hex_ipv4(cols[7])
            network = ipaddress.IPv4Network(f"{dest}/{mask}", strict=False)
        except ValueError:
            continue
        if not flags & RTF_UP:
            continue
        routes.append(Route(cols[0], network, gateway if flags & RTF_GATEWAY else None))
    return routes


class NoControlAddress(ValueError):
    """No address of the node's own host to dial meshd at (the reason names what was looked at)."""


def choose_control_host(configured: str, routes: list[Route]) -> str:
    """The host to dial: `configured` when it is loopback or on-link, else the default gateway.

    Raises NoControlAddress when neither exists (e.g. the namespace has no route at all yet)."""
    try:
        addr = ipaddress.ip_address(configured)
    except ValueError:
        addr = None
    if addr is not None and addr.is_loopback:
        return configured
    if isinstance(addr, ipaddress.IPv4Address):
        for route in routes:
            if route.gateway is None and addr in route.network:
                return configured
    for route in routes:
        if route.is_default and route.gateway is not None:
            return str(route.gateway)
    raise NoControlAddress(f"{configured!r} is not on a directly connected network of this namespace "
                           f"and it has no default gateway ({len(routes)} routes)")
