"""The node's admin port (15020 for sidecars, Istio's merged-metrics port): metrics, readiness, config."""

from __future__ import annotations

from typing import Callable

from aiohttp import web

from meshcore.snapshot import encode_snapshot

from .control import ControlClient

ADMIN_PORT = 15020


def build_admin_app(control: ControlClient, render_metrics: Callable[[], bytes],
                    is_listening: Callable[[], bool]) -> web.Application:
    """`/metrics` (Prometheus text), `/healthz/ready` (200 once serving with a config), `/config`."""
    app = web.Application()

    async def metrics(_req: web.Request) -> web.Response:
        return web.Response(body=render_metrics(), content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    async def ready(_req: web.Request) -> web.Response:
        if control.current is None:
            return web.json_response({"ready": False, "reason": "no config from meshd yet"}, status=503)
        if not is_listening():
            return web.json_response({"ready": False, "reason": "listeners not up"}, status=503)
        agent = getattr(control, "agent", None)
        if agent is not None and not agent.has_valid_cert():
            return web.json_response({"ready": False, "reason": "no workload certificate yet"}, status=503)
        return web.json_response({"ready": True, "version": control.current.version})

    async def config(_req: web.Request) -> web.Response:
        agent = getattr(control, "agent", None)
        body = {"control_connected": control.connected, "nacks": control.nacks,
                "tls": agent.describe() if agent is not None else None,
                "control_refusals": getattr(control, "refusals", 0),
                "snapshot": encode_snapshot(control.current) if control.current else None}
        return web.json_response(body)

    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz/ready", ready)
    app.router.add_get("/config", config)
    return app


async def start_admin(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Serve the admin app; returns the runner to clean up."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, reuse_address=True).start()
    return runner
