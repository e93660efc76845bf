"""Transparent capture: iptables rules in the app's network namespace (Istio's layout, see README)."""

from __future__ import annotations

import subprocess

import structlog

from .dns import DNS_PORT

log = structlog.get_logger("sidecar.capture")

PROXY_UID = 1337          # the sidecar's own uid: its traffic is never captured (Istio's convention)
OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
OUT_CHAIN = "MESH_OUTPUT"
IN_CHAIN = "MESH_INBOUND"
DNS_CHAIN = "MESH_DNS"
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
    result = subprocess.run(["iptables-restore", "--noflush"], input=script.encode(),
                            capture_output=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"iptables-restore failed: {result.stderr.decode(errors='replace').strip()}")
    log.info("capture_installed", app_port=app_port, outbound=OUTBOUND_PORT, inbound=INBOUND_PORT)
