"""`gateway run`: the mesh's external entry, managed by meshd, in the host's network namespace."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import sys
from urllib.parse import urlsplit

# meshproc.runtime imports structlog without its console extras (rich & co.): before anything else does
from meshproc.runtime import configure_logging, run_forever, stop_signal, structlog, wants_run

log = structlog.get_logger("gateway")

ADMIN_PORT = 15021  # Istio's ingress gateway health port


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _read_routes() -> list:
    """The namespace's IPv4 routes now (meshcore.control_address)."""
    from meshcore.control_address import parse_proc_net_route

    with open("/proc/net/route", encoding="ascii") as fh:
        return parse_proc_net_route(fh.read())


async def serve(control_url: str, node: str, bind: str, port: int, admin_port: int,
                env: dict[str, str] | None = None) -> None:
    """The gateway listener, its admin port and its control channel, until SIGTERM."""
    from sidecar.admin import build_admin_app, start_admin
    from sidecar.control import ControlClient
    from sidecar.proxy import ProxyState
    from sidecar.tracing import collector_url
    from sidecar.telemetry import render_metrics

    from gateway.jwt_auth import JwtVerifier
    from gateway.server import GATEWAY_SOURCE, start_gateway

    from meshcore.limits import limits_from_env

    env = env or {}
    state = ProxyState(GATEWAY_SOURCE, "v1")
    state.limits = limits_from_env(env)   # checked by main
    agent = None
    https = None
    bundle = env.get("MESH_CA_BUNDLE", "")
    if bundle and control_url.startswith("wss://"):
        from meshcore.bootstrap import TOKEN_ENV, TOKEN_FILE, TOKEN_FILE_ENV
        from sidecar.tlsagent import CertAgent, MeshTls, ServerCert, read_bootstrap_token

        user_cert, user_key = env.get("MESH_GATEWAY_CERT", ""), env.get("MESH_GATEWAY_KEY", "")
        hosts = tuple(h.strip() for h in env.get("MESH_GATEWAY_HOSTS", "localhost").split(",") if h.strip())
        token, token_file = read_bootstrap_token(env.get(TOKEN_FILE_ENV) or TOKEN_FILE, env.get(TOKEN_ENV, ""))
        agent = CertAgent(env.get("MESH_IDENTITY", ""), bundle.encode("ascii"), token, token_file=token_file,
                          tls_dir=env.get("MESH_TLS_DIR", "/tmp/mesh-tls"),
                          server_names=() if user_cert else hosts, registry=state.telemetry.registry, restore=False)
        await agent.restore()   # saved material, read by a certs.worker subprocess
        state.tls = MeshTls(agent)
        if user_cert and user_key:
            server_cert = ServerCert()
            with open(user_cert, "rb") as c, open(user_key, "rb") as k:
                await server_cert.aload_pem(c.read(), k.read())
            https = server_cert.front
        else:
            https = agent.server_holder.front
    jwt = JwtVerifier(env.get("MESH_JWKS_FILE", ""), env.get("MESH_JWKS_URL", ""))
    jwt.start()
    # Spans go to meshd's trace store beside the control channel (mTLS with the workload certificate).
    state.tracing.node = node
    state.tracing.collector = (collector_url(control_url),
                               agent.control_ssl_context if agent is not None else None)
    # A control host given as a name (on Swarm, the control service) is resolved and checked against
    # this namespace's routes, as a sidecar does; the address meshd gives on one host is dialled as is.
    routes = None if _is_address(urlsplit(control_url).hostname or "") else _read_routes
    control = ControlClient(control_url, "gateway", node, "", apply=state.apply_snapshot, agent=agent,
                            routes=routes)
    server = await start_gateway(state, bind, port, jwt=jwt)
    https_port = int(env.get("MESH_GATEWAY_HTTPS_PORT", "8443"))
    https_server = await start_gateway(state, bind, https_port, ssl_context=https, jwt=jwt) if https else None
    admin = await start_admin(build_admin_app(control, lambda: render_metrics(state.telemetry),
                                              server.is_serving), "127.0.0.1", admin_port)
    control_task = asyncio.ensure_future(control.run())
    stop = stop_signal()
    log.info("gateway_started", bind=bind, port=port, https_port=https_port if https else None,
             admin_port=admin_port, mtls=agent is not None)
    await stop.wait()
    control_task.cancel()
    server.close()
    if https_server is not None:
        https_server.close()
    await admin.cleanup()
    # Queued spans are flushed off the loop (bounded by the export timeout), then the data path closes.
    await asyncio.to_thread(state.tracing.close)
    state.close()


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `gateway` console script."""
    if not wants_run("gateway", "The mesh API gateway.", "serve external traffic (settings from MESH_* variables)",
                     argv):
        return
    configure_logging("gateway")
    env = os.environ
    port_raw = env.get("MESH_GATEWAY_PORT", "8080")
    if not port_raw.isdigit() or not 0 < int(port_raw) < 65536:
        log.error("gateway_config_invalid", error=f"MESH_GATEWAY_PORT: {port_raw!r} is not a port number")
        sys.exit(2)
    from meshcore.limits import LimitError, limits_from_env
    try:
        limits_from_env(env)
    except LimitError as exc:
        log.error("gateway_config_invalid", error=str(exc))
        sys.exit(2)
    run_forever(lambda: serve(env.get("MESH_CONTROL_URL", "wss://127.0.0.1:15012/v1/stream"),
                              env.get("MESH_NODE", "gateway"), env.get("MESH_GATEWAY_BIND", "0.0.0.0"),
                              int(port_raw), int(env.get("MESH_GATEWAY_ADMIN_PORT", ADMIN_PORT)), dict(env)))


if __name__ == "__main__":
    main()
