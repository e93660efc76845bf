"""Transparent capture: iptables rules in the app's network namespace (Istio's layout, see README)."""

from __future__ import annotations

import subprocess

import structlog

log = structlog.get_logger("sidecar.capture")

PROXY_UID = 1337          # the sidecar's own uid: its traffic is never captured (Istio's convention)
OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
OUT_CHAIN = "MESH_OUTPUT"
IN_CHAIN = "MESH_INBOUND"


def build_capture_rules(app_port: int, proxy_uid: int = PROXY_UID,
                        exclude_outbound_ports: tuple[int, ...] = ()) -> str:
    """An iptables-restore script (nat table) that sends the app's TCP through the sidecar."""
    lines = [
        "*nat",
        f":{OUT_CHAIN} - [0:0]",
        f":{IN_CHAIN} - [0:0]",
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
    lines += [f"-A {OUT_CHAIN} -p tcp -j REDIRECT --to-ports {OUTBOUND_PORT}", "COMMIT", ""]
    return "\n".join(lines)


def apply_capture(app_port: int) -> None:
    """Install the capture rules (idempotent: a restarted sidecar replaces its own chains)."""
    script = build_capture_rules(app_port)
    for chain, parent in ((OUT_CHAIN, "OUTPUT"), (IN_CHAIN, "PREROUTING")):
        subprocess.run(["iptables", "-t", "nat", "-D", parent, "-p", "tcp", "-j", chain],
                       capture_output=True, check=False)
        subprocess.run(["iptables", "-t", "nat", "-F", chain], capture_output=True, check=False)
        subprocess.run(["iptables", "-t", "nat", "-X", chain], capture_output=True, check=False)
    result = subprocess.run(["iptables-restore", "--noflush"], input=script.encode(),
                            capture_output=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"iptables-restore failed: {result.stderr.decode(errors='replace').strip()}")
    log.info("capture_installed", app_port=app_port, outbound=OUTBOUND_PORT, inbound=INBOUND_PORT)
