"""`sidecar run`: the per-container proxy that meshd starts in an app's network namespace."""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import dataclass
from typing import Callable

# meshproc.runtime imports structlog without its console extras (rich & co.): before anything else does
from meshproc.runtime import configure_logging, run_forever, stop_signal, structlog, wants_run
from sidecar.capture import PROXY_UID, apply_capture

log = structlog.get_logger("sidecar")

OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
ANNOUNCE_POLL_S = 0.05  # until ready (announce_when_ready)
DRAIN_S = 1.0  # after SIGTERM: withdraw from discovery, keep serving briefly for in-flight requests


class ConfigError(ValueError):
    """A sidecar setting that is missing or malformed; names the variable."""


@dataclass(frozen=True)
class SidecarSettings:
    """The sidecar's settings, from the environment meshd gives it (docs/DESIGN.md)."""

    control_url: str
    node: str
    container: str
    service: str
    namespace: str
    version: str
    app_port: int
    protocol: str
    capture: str
    identity: str
    admin_port: int = 15020
    bootstrap_token: str = ""      # MESH_BOOTSTRAP_TOKEN: one-time, for the first certificate
    ca_bundle: str = ""            # MESH_CA_BUNDLE: the mesh's trust roots (PEM), to verify meshd
    tls_dir: str = "/tmp/mesh-tls"  # MESH_TLS_DIR: the node's own key and certificate (0700/0600)

    @classmethod
    def from_env(cls, env: dict[str, str]) -> "SidecarSettings":
        """Decode MESH_* variables; raises ConfigError naming the variable."""
        def need(name: str) -> str:
            value = env.get(name, "").strip()
            if not value:
                raise ConfigError(f"{name} is required")
            return value

        port_raw = need("MESH_APP_PORT")
        if not port_raw.isdigit() or not 0 < int(port_raw) < 65536:
            raise ConfigError(f"MESH_APP_PORT: {port_raw!r} is not a port number")
        protocol = env.get("MESH_PROTOCOL", "http")
        if protocol not in ("http", "tcp"):
            raise ConfigError(f"MESH_PROTOCOL: {protocol!r} is not http or tcp")
        capture = env.get("MESH_CAPTURE", "transparent")
        if capture not in ("transparent", "explicit"):
            raise ConfigError(f"MESH_CAPTURE: {capture!r} is not transparent or explicit")
        return cls(control_url=need("MESH_CONTROL_URL"), node=need("MESH_NODE"),
                   container=need("MESH_CONTAINER"), service=need("MESH_SERVICE"),
                   namespace=env.get("MESH_NAMESPACE", "default"), version=env.get("MESH_VERSION", "v1"),
                   app_port=int(port_raw), protocol=protocol, capture=capture,
                   identity=env.get("MESH_IDENTITY", ""),
                   admin_port=int(env.get("MESH_ADMIN_PORT", "15020")),
                   bootstrap_token=env.get("MESH_BOOTSTRAP_TOKEN", ""),
                   ca_bundle=env.get("MESH_CA_BUNDLE", ""),
                   tls_dir=env.get("MESH_TLS_DIR", "/tmp/mesh-tls"))

    @property
    def secure(self) -> bool:
        """mTLS mode: meshd gave a trust bundle and a wss:// control URL (the default deployment)."""
        return bool(self.ca_bundle) and self.control_url.startswith("wss://")


def read_routes() -> list:
    """The namespace's IPv4 routes now (an app's network can be disconnected and reconnected)."""
    from meshcore.control_address import parse_proc_net_route

    with open("/proc/net/route", encoding="ascii") as fh:
        return parse_proc_net_route(fh.read())


def drop_privileges(uid: int) -> None:
    """Run as the proxy uid from here on: the capture rules exempt its traffic."""
    if os.getuid() != 0:
        return
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


async def announce_when_ready(announcer, control, listening: Callable[[], bool],
                              poll_s: float = ANNOUNCE_POLL_S) -> bool:
    """Announce the instance (mDNS) once it can serve: config, listeners and workload certificate, as
    /healthz/ready says. Before that, a caller that learnt of it would fail its TLS handshake and
    skip it for a while (as Kubernetes adds a pod to a Service's endpoints only once it is ready).
    True once announced; False when the announcement failed."""
    from sidecar.admin import not_ready_reason

    while not_ready_reason(control, listening) is not None:
        await asyncio.sleep(poll_s)
    try:
        await announcer.start()
    except OSError as exc:
        log.warning("mdns_announce_failed", error=str(exc))
        return False
    return True


async def serve(settings: SidecarSettings) -> None:
    """Listeners, admin port, control channel and mDNS announcement, until SIGTERM."""
    from sidecar.admin import build_admin_app, start_admin
    from sidecar.announce import Announcer
    from sidecar.control import ControlClient
    from sidecar.proxy import ProxyState, start_inbound, start_outbound, start_tcp_inbound
    from sidecar.tracing import collector_url
    from sidecar.telemetry import render_metrics

    agent = None
    state = ProxyState(settings.service, settings.version)
    apply = state.apply_snapshot
    if settings.secure:
        from sidecar.mtls import Authorizer
        from sidecar.tlsagent import CertAgent, MeshTls

        agent = CertAgent(settings.identity, settings.ca_bundle.encode("ascii"), settings.bootstrap_token,
                          tls_dir=settings.tls_dir, registry=state.telemetry.registry, restore=False)
        await agent.restore()   # saved material, read by a certs.worker subprocess
        state.tls = MeshTls(agent)
        state.authz = Authorizer(settings.service)

        def apply(snapshot, _apply=state.apply_snapshot, _authz=state.authz):
            _apply(snapshot)
            _authz.update(snapshot)
    # Spans go to meshd's trace store beside the control channel (mTLS with the workload certificate).
    state.tracing.node = settings.node
    state.tracing.collector = (collector_url(settings.control_url),
                               agent.control_ssl_context if agent is not None else None)
    control = ControlClient(settings.control_url, "sidecar", settings.node, settings.container,
                            apply=apply, agent=agent, routes=read_routes)
    servers: list[asyncio.AbstractServer] = []
    # Outbound on loopback only: REDIRECT maps locally generated packets to 127.0.0.1, and nothing
    # outside the namespace may use this sidecar as an open proxy.
    mode = "transparent" if settings.capture == "transparent" else "explicit"
    servers.append(await start_outbound(state, "127.0.0.1", OUTBOUND_PORT, mode=mode))
    if mode == "transparent":  # traffic management: capture sends the app's DNS to this proxy (sidecar/dns.py)
        from sidecar.dns import start_dns
        servers.append(await start_dns(state))
    if agent is not None:
        from sidecar.mtls import start_mesh_inbound
        servers.append(await start_mesh_inbound(state, "0.0.0.0", INBOUND_PORT, app_port=settings.app_port,
                                                protocol=settings.protocol))
    elif settings.protocol == "tcp":
        servers.append(await start_tcp_inbound(state, "0.0.0.0", INBOUND_PORT, app_port=settings.app_port))
    else:
        servers.append(await start_inbound(state, "0.0.0.0", INBOUND_PORT, app_port=settings.app_port))
    listening = lambda: all(s.is_serving() for s in servers)  # noqa: E731
    admin = await start_admin(build_admin_app(control, lambda: render_metrics(state.telemetry), listening),
                              "0.0.0.0", settings.admin_port)
    announcer = Announcer(settings.container, settings.service, settings.version, settings.identity,
                          settings.protocol, INBOUND_PORT)
    control_task = asyncio.ensure_future(control.run())
    stop = stop_signal()
    announce_task = asyncio.ensure_future(announce_when_ready(announcer, control, listening))
    log.info("sidecar_started", service=settings.service, version=settings.version,
             app_port=settings.app_port, capture=settings.capture, protocol=settings.protocol)
    await stop.wait()
    log.info("sidecar_stopping")
    announce_task.cancel()
    await announcer.close()
    await asyncio.sleep(DRAIN_S)
    control_task.cancel()
    for server in servers:
        server.close()
    await admin.cleanup()
    # Queued spans are flushed off the loop (bounded by the export timeout), then the data path closes.
    await asyncio.to_thread(state.tracing.close)
    state.close()


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `sidecar` console script."""
    if not wants_run("sidecar", "The mesh sidecar proxy.",
                     "capture the app's traffic and proxy it (settings from MESH_* variables)", argv):
        return
    configure_logging("sidecar")
    try:
        settings = SidecarSettings.from_env(dict(os.environ))
    except ConfigError as exc:
        log.error("sidecar_config_invalid", error=str(exc))
        sys.exit(2)
    structlog.contextvars.bind_contextvars(node=settings.node, service=settings.service)
    if settings.capture == "transparent":
        try:
            apply_capture(settings.app_port)
        except (RuntimeError, OSError) as exc:
            log.error("capture_failed", error=str(exc),
                      hint="the sidecar needs NET_ADMIN; use mesh.capture=explicit where it cannot have it")
            sys.exit(3)
    drop_privileges(PROXY_UID)
    run_forever(lambda: serve(settings))


if __name__ == "__main__":
    main()
