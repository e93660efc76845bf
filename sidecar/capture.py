"""Transparent capture: iptables rules in the app's network namespace (Istio's layout, see README).

The mesh speaks IPv4 (its listeners, mDNS and the control channel). On an IPv6-enabled network the
app's port would still answer on the container's IPv6 addresses, past the sidecar: ip6tables rejects
those connections (any non-loopback IPv6 TCP to the app's port)."""

from __future__ import annotations

import subprocess

import structlog

from meshcore.bootstrap import NODE_UID

from .dns import DNS_PORT

log = structlog.get_logger("sidecar.capture")

PROXY_UID = NODE_UID      # the sidecar's own uid: its traffic is never captured (Istio's convention)
OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
OUT_CHAIN = "MESH_OUTPUT"
IN_CHAIN = "MESH_INBOUND"
DNS_CHAIN = "MESH_DNS"
IN6_CHAIN = "MESH_INBOUND6"
DOCKER_DNS = "127.0.0.11"  # Docker's embedded resolver, the nameserver of every container's resolv.conf


def build_capture_rules(app_port: int, proxy_uid: int = PROXY_UID,
                        exclude_outbound_ports: tuple[int, ...] = (),
                        dns_port: int | None = DNS_PORT) -> str:
    """An iptables-restore script (nat table) that sends the app's TCP through the sidecar, and its
    DNS queries to Docker's resolver to the sidecar's DNS proxy (`dns_port`; None: no DNS capture)."""
    lines = [
        "*nat",
        f":{OUT_CHAIN} - [0:0]",
        f":{IN_CHAIN} - [0:0]",
    ]
    if dns_port is not None:
        lines.append(f":{DNS_CHAIN} - [0:0]")
    lines += [
        # Inbound: anything addressed to the app's port from outside goes to the inbound listener,
        # so the app is not reachable past its sidecar.
        f"-A PREROUTING -p tcp -j {IN_CHAIN}",
        f"-A {IN_CHAIN} -p tcp --dport {app_port} -j REDIRECT --to-ports {INBOUND_PORT}",
        # Outbound: the app's TCP connections go to the outbound listener; the sidecar's own
        # connections (uid 1337) and loopback traffic pass untouched.
        f"-A OUTPUT -p tcp -j {OUT_CHAIN}",
        f"-A {OUT_CHAIN} -m owner --uid-owner {proxy_uid} -j RETURN",
        f"-A {OUT_CHAIN} -d 127.0.0.0/8 -j RETURN",
    ]
    for port in exclude_outbound_ports:
        lines.append(f"-A {OUT_CHAIN} -p tcp --dport {port} -j RETURN")
    lines.append(f"-A {OUT_CHAIN} -p tcp -j REDIRECT --to-ports {OUTBOUND_PORT}")
    if dns_port is not None:
        lines += [
            # DNS: inserted at the top of OUTPUT, because Docker's own nat rule for its resolver
            # (-A OUTPUT -d 127.0.0.11/32 -j DOCKER_OUTPUT, a DNAT to its real ports) would win otherwise.
            # The sidecar's uid is exempt: the queries it forwards must reach Docker's resolver.
            f"-I OUTPUT 1 -d {DOCKER_DNS}/32 -j {DNS_CHAIN}",
            f"-A {DNS_CHAIN} -m owner --uid-owner {proxy_uid} -j RETURN",
            f"-A {DNS_CHAIN} -p udp --dport 53 -j REDIRECT --to-ports {dns_port}",
            f"-A {DNS_CHAIN} -p tcp --dport 53 -j REDIRECT --to-ports {dns_port}",
        ]
    lines += ["COMMIT", ""]
    return "\n".join(lines)


def build_ipv6_rules(app_port: int) -> str:
    """An ip6tables-restore script (filter table) that refuses the app's port over IPv6 from
    anywhere but loopback (a TCP reset: the caller learns at once)."""
    return "\n".join([
        "*filter",
        f":{IN6_CHAIN} - [0:0]",
        f"-A INPUT -p tcp -j {IN6_CHAIN}",
        f"-A {IN6_CHAIN} -i lo -j RETURN",
        f"-A {IN6_CHAIN} -p tcp --dport {app_port} -j REJECT --reject-with tcp-reset",
        "COMMIT",
        "",
    ])


def ipv6_interfaces(if_inet6: str) -> list[str]:
    """The interfaces but lo with an IPv6 address, from the text of /proc/net/if_inet6 (pure; one
    address a line: address, index, prefix length, scope, flags, interface name)."""
    names = {fields[5] for fields in (line.split() for line in if_inet6.splitlines()) if len(fields) >= 6}
    return sorted(names - {"lo"})


def _restore(command: str, script: str) -> str | None:
    """Run an iptables-restore style command on `script`; its error text, or None."""
    try:
        result = subprocess.run([command, "--noflush"], input=script.encode(), capture_output=True, check=False)
    except OSError as exc:
        return f"{command}: {exc}"
    if result.returncode != 0:
        return f"{command} failed: {result.stderr.decode(errors='replace').strip()}"
    return None


def apply_ipv6_guard(app_port: int) -> None:
    """Refuse the app's port over IPv6 (idempotent). Where ip6tables cannot be used, that is only an
    error when the namespace has IPv6 addresses (else there is no IPv6 path to guard)."""
    subprocess.run(["ip6tables", "-D", "INPUT", "-p", "tcp", "-j", IN6_CHAIN], capture_output=True, check=False)
    subprocess.run(["ip6tables", "-F", IN6_CHAIN], capture_output=True, check=False)
    subprocess.run(["ip6tables", "-X", IN6_CHAIN], capture_output=True, check=False)
    error = _restore("ip6tables-restore", build_ipv6_rules(app_port))
    if error is None:
        log.info("capture_ipv6_guard_installed", app_port=app_port)
        return
    try:
        with open("/proc/net/if_inet6", encoding="ascii") as fh:
            interfaces = ipv6_interfaces(fh.read())
    except FileNotFoundError:   # no IPv6 in this kernel
        interfaces = []
    if interfaces:
        raise RuntimeError(f"{error} (IPv6 on {', '.join(interfaces)}: the app's port would be open past the sidecar)")
    log.warning("capture_ipv6_guard_skipped", error=error, reason="no IPv6 address in the namespace")


def apply_capture(app_port: int, dns_port: int | None = DNS_PORT) -> None:
    """Install the capture rules (idempotent: a restarted sidecar replaces its own chains).

    With `dns_port` the app's DNS goes to the sidecar's DNS proxy, which must then be started
    (sidecar.dns.start_dns); None leaves DNS alone."""
    script = build_capture_rules(app_port, dns_port=dns_port)
    for chain, parent, match in ((OUT_CHAIN, "OUTPUT", ["-p", "tcp"]), (IN_CHAIN, "PREROUTING", ["-p", "tcp"]),
                                 (DNS_CHAIN, "OUTPUT", ["-d", f"{DOCKER_DNS}/32"])):
        subprocess.run(["iptables", "-t", "nat", "-D", parent, *match, "-j", chain],
                       capture_output=True, check=False)
        subprocess.run(["iptables", "-t", "nat", "-F", chain], capture_output=True, check=False)
        subprocess.run(["iptables", "-t", "nat", "-X", chain], capture_output=True, check=False)
    error = _restore("iptables-restore", script)
    if error is not None:
        raise RuntimeError(error)
    apply_ipv6_guard(app_port)
    log.info("capture_installed", app_port=app_port, outbound=OUTBOUND_PORT, inbound=INBOUND_PORT)
