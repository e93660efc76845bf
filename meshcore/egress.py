"""Egress control (Istio's outboundTrafficPolicy): the mesh-wide mode, the `mesh.egress` allow-list
grammar and the decision whether a call to a destination outside the mesh may leave.

Pure, standard library only.

Modes: `allow-any` (the default: every destination outside the mesh is passed through) or
`registry-only` (only the mesh's services, and what the calling service's `mesh.egress` lists).

`mesh.egress` is a comma-separated list of `host:port` entries:
- `api.example.com:443`   a DNS name, exactly (case-insensitive, a trailing dot ignored);
- `*.internal.test:80`    any name below `internal.test` (not `internal.test` itself, as Istio's hosts);
- `10.1.2.3:5432`, `10.0.0.0/8:5432`   an IPv4 address or network (CIDR);
- `[2001:db8::1]:443`, `[2001:db8::/32]:443`   an IPv6 address or network, in brackets;
- the port is a number 1-65535 or `*` (any port).
Names match names only and addresses addresses only: the decision is on what the caller asked for
(an HTTP Host or absolute-form authority, a CONNECT target, or the original destination address).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

EGRESS_ALLOW_ANY = "allow-any"
EGRESS_REGISTRY_ONLY = "registry-only"
EGRESS_MODES = (EGRESS_ALLOW_ANY, EGRESS_REGISTRY_ONLY)
EGRESS_LABEL = "mesh.egress"
ANY_PORT = 0
MAX_EGRESS_ENTRIES = 64   # one label, read by every node of the service: kept short
# RFC 1123 host names: labels of letters, digits and '-', not starting or ending with '-'.
_DNS_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_NAME_RE = re.compile(rf"^(?:\*\.)?{_DNS_LABEL}(?:\.{_DNS_LABEL})*$")


class EgressError(ValueError):
    """A mode or allow-list entry that is not valid; the message names it."""


@dataclass(frozen=True)
class EgressRule:
    """One allowed destination: a name (`*.` prefix: any name below it) or a network, and a port."""

    name: str | None                 # lowercase DNS name, possibly `*.suffix`; None for a network
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None
    port: int                        # ANY_PORT: any

    def __str__(self) -> str:
        port = "*" if self.port == ANY_PORT else str(self.port)
        if self.name is not None:
            return f"{self.name}:{port}"
        net = self.network
        host = str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)
        return f"[{host}]:{port}" if net.version == 6 else f"{host}:{port}"


def decode_egress_mode(raw: str) -> str:
    """`allow-any` or `registry-only` (case-insensitive), else EgressError."""
    if not isinstance(raw, str):
        raise EgressError(f"{raw!r} is not one of {', '.join(EGRESS_MODES)}")
    mode = raw.strip().lower()
    if mode not in EGRESS_MODES:
        raise EgressError(f"{raw!r} is not one of {', '.join(EGRESS_MODES)}")
    return mode


def _decode_port(item: str, text: str) -> int:
    if text == "*":
        return ANY_PORT
    if not re.fullmatch(r"[0-9]{1,5}", text) or not 1 <= int(text) <= 65535:
        raise EgressError(f"{item!r}: port {text!r} is not 1-65535 or *")
    return int(text)


def decode_egress_rule(item: str) -> EgressRule:
    """One `host:port` entry (see the module docstring), else EgressError naming it."""
    text = item.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise EgressError(f"{item!r}: an IPv6 entry is [address]:port")
    else:
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            raise EgressError(f"{item!r}: expected host:port")
    port_number = _decode_port(item, port)
    try:
        network = ipaddress.ip_network(host, strict=True)
    except ValueError as exc:
        if "/" in host or ":" in host or re.fullmatch(r"[0-9.]+", host):
            raise EgressError(f"{item!r}: {exc}") from None
        network = None
    if network is not None:
        if (network.version == 6) != text.startswith("["):
            raise EgressError(f"{item!r}: IPv6 addresses are written in brackets, IPv4 without")
        return EgressRule(name=None, network=network, port=port_number)
    name = host.lower().rstrip(".")
    if len(name) > 253 or not _NAME_RE.match(name):
        raise EgressError(f"{item!r}: {host!r} is not a host name, *.domain, address or network")
    return EgressRule(name=name, network=None, port=port_number)


def decode_egress_list(raw: str) -> tuple[EgressRule, ...]:
    """The rules of a `mesh.egress` value (comma-separated, duplicates dropped, order kept)."""
    items = [item for item in (part.strip() for part in raw.split(",")) if item]
    if not items:
        raise EgressError("empty: list host:port entries, or remove the label")
    if len(items) > MAX_EGRESS_ENTRIES:
        raise EgressError(f"{len(items)} entries, at most {MAX_EGRESS_ENTRIES}")
    rules: dict[str, EgressRule] = {}
    for item in items:
        rule = decode_egress_rule(item)
        rules.setdefault(str(rule), rule)
    return tuple(rules.values())


def _host_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def rule_matches(rule: EgressRule, host: str, port: int) -> bool:
    """Whether `rule` allows `host` (a name or an address literal) on `port`."""
    if rule.port != ANY_PORT and rule.port != port:
        return False
    address = _host_address(host)
    if rule.network is not None:
        return address is not None and address in rule.network
    if address is not None:
        return False
    name = host.lower().rstrip(".")
    if rule.name.startswith("*."):
        return name.endswith(rule.name[1:]) and len(name) > len(rule.name) - 1
    return name == rule.name


def egress_allowed(mode: str, allow_list: tuple[EgressRule, ...] | None, host: str, port: int) -> bool:
    """Whether a call from a service with `allow_list` (its mesh.egress; None: no label) to `host:port`,
    a destination outside the mesh, may leave under the mesh-wide `mode`."""
    if mode != EGRESS_REGISTRY_ONLY:
        return True
    return any(rule_matches(rule, host, port) for rule in allow_list or ())


def egress_findings(mode: str, lists: dict[str, tuple[str, ...] | None]) -> list[str]:
    """What `meshctl analyze` says of the services' mesh.egress lists (service -> canonical entries,
    None: no label) under the mesh-wide `mode`: labels without effect, services cut off, lists that
    let everything out."""
    out = []
    for service, entries in sorted(lists.items()):
        if mode == EGRESS_ALLOW_ANY:
            if entries:
                out.append(f"{service}: mesh.egress has no effect while egress is allow-any "
                           "(meshd's MESH_EGRESS=registry-only enforces it)")
            continue
        if not entries:
            out.append(f"{service}: no mesh.egress: it reaches only mesh services (registry-only)")
            continue
        rules = decode_egress_list(",".join(entries))
        everything = [str(r) for r in rules if r.network is not None and r.network.prefixlen == 0]
        if everything:
            out.append(f"{service}: mesh.egress {', '.join(everything)} lets every address out: for raw TCP "
                       "and addressed calls this service is as under allow-any")
    return out
