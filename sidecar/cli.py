"""`sidecar run`: the per-container proxy that meshd starts in an app's network namespace."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
from dataclasses import dataclass
from typing import Callable

# meshproc.runtime imports structlog without its console extras (rich & co.): before anything else does
from meshproc.runtime import configure_logging, run_forever, stop_signal, structlog, wants_run
from meshcore.bootstrap import TOKEN_ENV, TOKEN_FILE, TOKEN_FILE_ENV
from meshcore.labels import PROTOCOLS
from meshcore.limits import DEFAULT_LIMITS, LimitError, Limits, limits_from_env
from sidecar.capture import PROXY_UID, apply_capture

log = structlog.get_logger("sidecar")

OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
ANNOUNCE_POLL_S = 0.05  # until ready (announce_when_ready)
DRAIN_S = 1.0  # after SIGTERM: withdraw from discovery, keep serving briefly for in-flight requests
# The app gone: Docker tears down its interfaces when it stops, but this process keeps its network
# namespace alive with only `lo`. Then the sidecar ends itself (exit 0, so on-failure does not restart
# it) instead of waiting for meshd to kill it in the middle of a `compose down` storm.
ORPHAN_GRACE_S = 5.0   # longer than a `docker network disconnect` then `connect` leaves only lo
ORPHAN_POLL_S = 2.0   # without a netlink socket (link_watch) only
RTMGRP_LINK = 1       # rtnetlink(7): the multicast group of link changes


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
    bootstrap_token: str = ""      # MESH_BOOTSTRAP_TOKEN: only where no token file can be given
    token_file: str = TOKEN_FILE   # MESH_BOOTSTRAP_TOKEN_FILE: the one-time token meshd copied in
    ca_bundle: str = ""            # MESH_CA_BUNDLE: the mesh's trust roots (PEM), to verify meshd
    tls_dir: str = "/tmp/mesh-tls"  # MESH_TLS_DIR: the node's own key and certificate (0700/0600)
    limits: Limits = DEFAULT_LIMITS  # MESH_MAX_HEADERS, MESH_HEAD_TIMEOUT...: meshcore.limits

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
        if protocol not in PROTOCOLS:
            raise ConfigError(f"MESH_PROTOCOL: {protocol!r} is not http, grpc, http2 or tcp")
        capture = env.get("MESH_CAPTURE", "transparent")
        if capture not in ("transparent", "explicit"):
            raise ConfigError(f"MESH_CAPTURE: {capture!r} is not transparent or explicit")
        try:
            limits = limits_from_env(env)
        except LimitError as exc:
            raise ConfigError(str(exc)) from None
        return cls(control_url=need("MESH_CONTROL_URL"), node=need("MESH_NODE"),
                   container=need("MESH_CONTAINER"), service=need("MESH_SERVICE"),
                   namespace=env.get("MESH_NAMESPACE", "default"), version=env.get("MESH_VERSION", "v1"),
                   app_port=int(port_raw), protocol=protocol, capture=capture,
                   identity=env.get("MESH_IDENTITY", ""),
                   admin_port=int(env.get("MESH_ADMIN_PORT", "15020")),
                   bootstrap_token=env.get(TOKEN_ENV, ""), token_file=env.get(TOKEN_FILE_ENV) or TOKEN_FILE,
                   ca_bundle=env.get("MESH_CA_BUNDLE", ""),
                   tls_dir=env.get("MESH_TLS_DIR", "/tmp/mesh-tls"), limits=limits)

    @property
    def secure(self) -> bool:
        """mTLS mode: meshd gave a trust bundle and a wss:// control URL (the default deployment)."""
        return bool(self.ca_bundle) and self.control_url.startswith("wss://")


def read_routes() -> list:
    """The namespace's IPv4 routes now (an app's network can be disconnected and reconnected)."""
    from meshcore.control_address import parse_proc_net_route

    with open("/proc/net/route", encoding="ascii") as fh:
        return parse_proc_net_route(fh.read())


def interface_names(proc_net_dev: str) -> list[str]:
    """The interface names in the text of /proc/net/dev (pure; two header lines, then `name: counters`)."""
    return [line.split(":", 1)[0].strip() for line in proc_net_dev.splitlines()[2:] if ":" in line]


def lone_since(names: list[str], since: float | None, now: float) -> float | None:
    """When the namespace was first seen with no interface but loopback (pure): `since` while that
    lasts, `now` when it begins, None while any other interface is there."""
    if any(name != "lo" for name in names):
        return None
    return now if since is None else since


def read_interfaces() -> list[str]:
    """The interfaces of this process's network namespace (the app's) now."""
    with open("/proc/net/dev", encoding="ascii") as fh:
        return interface_names(fh.read())


def link_watch() -> socket.socket | None:
    """A netlink socket told of every link change in this namespace (rtnetlink(7), RTMGRP_LINK), so
    that the orphan check costs nothing at idle; None where it cannot be opened (then: polling)."""
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        sock.bind((0, RTMGRP_LINK))
        sock.setblocking(False)
        return sock
    except (OSError, AttributeError):
        return None


async def stop_when_orphaned(stop: asyncio.Event, read=read_interfaces, watch: socket.socket | None = None,
                             grace_s: float = ORPHAN_GRACE_S, poll_s: float = ORPHAN_POLL_S,
                             clock=time.monotonic) -> bool:
    """Set `stop` once the namespace has had no interface but lo for `grace_s` (its app has stopped);
    True then, False if `stop` is set otherwise. Checks on each message of `watch` (a link_watch
    socket), else every `poll_s`."""
    loop = asyncio.get_running_loop()
    changed = asyncio.Event()

    def on_message() -> None:
        try:
            while watch.recv(65536):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:  # ENOBUFS: messages were lost; the check below reads the state afresh
            pass
        changed.set()

    if watch is not None:
        loop.add_reader(watch.fileno(), on_message)
    since = None
    try:
        while not stop.is_set():
            changed.clear()
            try:
                since = lone_since(read(), since, clock())
            except OSError:
                since = None
            if since is not None and clock() - since >= grace_s:
                log.info("sidecar_orphaned", reason="its app's network namespace has no interface but lo",
                         seconds=round(clock() - since, 1), action="exit 0")
                stop.set()
                return True
            timeout = poll_s if watch is None else None
            if since is not None:   # check again when the grace ends, at the latest
                timeout = min(t for t in (timeout, grace_s - (clock() - since)) if t is not None)
            waits = [asyncio.ensure_future(changed.wait()), asyncio.ensure_future(stop.wait())]
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
        return False
    finally:
        if watch is not None:
            loop.remove_reader(watch.fileno())
            watch.close()


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
    state.namespace = settings.namespace
    state.egress.namespace = settings.namespace
    state.limits = settings.limits
    apply = state.apply_snapshot
    if settings.secure:
        from sidecar.mtls import Authorizer
        from sidecar.tlsagent import CertAgent, MeshTls, read_bootstrap_token

        token, token_file = read_bootstrap_token(settings.token_file, settings.bootstrap_token)
        agent = CertAgent(settings.identity, settings.ca_bundle.encode("ascii"), token, token_file=token_file,
                          tls_dir=settings.tls_dir, registry=state.telemetry.registry, restore=False)
        await agent.restore()   # saved material, read by a certs.worker subprocess
        if agent.needs_bootstrap() and not token:
            # Restarted after its token was spent, without a valid saved certificate: it could never
            # join. Exit 0 (on-failure does not restart it): meshd creates a new sidecar with a new token.
            log.error("sidecar_without_credentials", reason="no valid saved certificate and no bootstrap token",
                      action="exit 0: meshd creates a new sidecar")
            return
        state.tls = MeshTls(agent)
        state.authz = Authorizer(settings.service, settings.namespace)

        def apply(snapshot, _apply=state.apply_snapshot, _authz=state.authz):
            _apply(snapshot)
            _authz.update(snapshot)
    # Spans go to meshd's trace store beside the control channel (mTLS with the workload certificate),
    # at the host the control channel last reached: an address of this host (meshcore.control_address).
    state.tracing.node = settings.node
    tls_factory = agent.control_ssl_context if agent is not None else None

    def follow_control(url: str) -> None:
        state.tracing.collector = (collector_url(url), tls_factory)

    control = ControlClient(settings.control_url, "sidecar", settings.node, settings.container,
                            apply=apply, agent=agent, routes=read_routes, on_connected=follow_control)
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
        servers.append(await start_inbound(state, "0.0.0.0", INBOUND_PORT, app_port=settings.app_port,
                                           protocol=settings.protocol))
    listening = lambda: all(s.is_serving() for s in servers)  # noqa: E731
    admin = await start_admin(build_admin_app(control, lambda: render_metrics(state.telemetry), listening),
                              "0.0.0.0", settings.admin_port)
    announcer = Announcer(settings.container, settings.service, settings.version, settings.identity,
                          settings.protocol, INBOUND_PORT)
    control_task = asyncio.ensure_future(control.run())
    stop = stop_signal()
    orphan_task = asyncio.ensure_future(stop_when_orphaned(stop, watch=link_watch()))
    announce_task = asyncio.ensure_future(announce_when_ready(announcer, control, listening))
    log.info("sidecar_started", service=settings.service, version=settings.version,
             app_port=settings.app_port, capture=settings.capture, protocol=settings.protocol)
    await stop.wait()
    log.info("sidecar_stopping")
    orphan_task.cancel()
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
