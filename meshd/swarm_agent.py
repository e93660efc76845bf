"""`meshd swarm-agent`: the per-node agent on Docker Swarm (a `global` service with the Docker socket).

A stack file cannot put a container in another's network namespace, so on each node this agent
starts the sidecars through the node's own engine: exactly one per local meshed task, in the task
container's namespace, removed with the task (meshd.plan decides, meshd.docker_adapter acts, as on
one host). The control plane (meshd.swarm_control) says which tasks the swarm placed on this node,
with their service labels (`deploy.labels` are not on the container), and hands out each sidecar's
environment with its one-time bootstrap token. While the control plane is away, the agent changes
nothing: sidecars keep serving with their last snapshot and certificates.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
import socket
import ssl
import threading
from dataclasses import dataclass

import aiohttp
import docker
from aiohttp import web
import docker.errors
import structlog

from meshcore.labels import ContainerInfo
from meshcore.snapshot import build_workloads

from .docker_adapter import DockerAdapter, decode_container_attrs, sidecar_name
from .plan import plan_sidecars
from .swarm_control import ADMIN_TLS_PORT, AGENT_PORT

log = structlog.get_logger("meshd.agent")

POLL_S = 2.0     # reconcile at least this often (container events trigger one sooner)
CALL_S = 5.0     # one call to the control plane, at most


@dataclass
class AgentSettings:
    """The agent's settings, from the environment (see docs/SWARM.md)."""

    image: str = "meshd:latest"                          # MESH_IMAGE: what sidecars run
    control_host: str = "mesh_control"                   # MESH_SWARM_CONTROL_HOST
    agent_key_file: str = "/run/secrets/mesh_agent_key"  # MESH_SWARM_AGENT_KEY_FILE
    ca_file: str = "/run/secrets/mesh_ca_cert"           # MESH_SWARM_CA_FILE: verifies the control plane
    gateway: bool = True                                 # MESH_SWARM_GATEWAY: run this node's gateway
    admin_port: int = 15014                              # MESH_SWARM_ADMIN_PORT: the admin relay (0: none)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "AgentSettings":
        """Settings from MESH_* variables."""
        env = dict(os.environ if env is None else env)
        return cls(image=env.get("MESH_IMAGE", cls.image),
                   control_host=env.get("MESH_SWARM_CONTROL_HOST", cls.control_host),
                   agent_key_file=env.get("MESH_SWARM_AGENT_KEY_FILE", cls.agent_key_file),
                   ca_file=env.get("MESH_SWARM_CA_FILE", cls.ca_file),
                   gateway=env.get("MESH_SWARM_GATEWAY", "true").lower() not in ("0", "false", "no", "off"),
                   admin_port=int(env.get("MESH_SWARM_ADMIN_PORT", cls.admin_port)))


def local_apps(entries: list[dict], inspected: dict[str, ContainerInfo]) -> list[ContainerInfo]:
    """The local task containers the control plane listed, as this engine sees them (start time,
    image, namespace), with the service labels the control plane read from the swarm (pure)."""
    out = []
    for entry in entries:
        info = inspected.get(entry.get("container", ""))
        if info is not None:
            out.append(dataclasses.replace(info, labels=dict(entry.get("labels") or {})))
    return out


class SwarmAgent:
    """One node's agent: reconcile the node's sidecars against the swarm's tasks."""

    def __init__(self, settings: AgentSettings, client: docker.DockerClient | None = None):
        self.settings = settings
        self.docker = DockerAdapter(client or docker.from_env(), settings.image)
        with open(settings.agent_key_file, encoding="utf-8") as fh:
            self._key = fh.read().strip()
        self._tls = ssl.create_default_context(cafile=settings.ca_file)
        self._dirty = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.node_id = ""
        self._gateway: asyncio.subprocess.Process | None = None
        self._relay: aiohttp.ClientSession | None = None

    # ---- the control plane -----------------------------------------------------------------

    async def _base_url(self) -> str:
        """The control plane's agent API at its current address (the service name resolves to its
        one task: dnsrr), so that its certificate's IP SANs match."""
        infos = await asyncio.get_running_loop().getaddrinfo(self.settings.control_host, AGENT_PORT,
                                                             family=socket.AF_INET, type=socket.SOCK_STREAM)
        return f"https://{infos[0][4][0]}:{AGENT_PORT}"

    async def _call(self, session: aiohttp.ClientSession, method: str, path: str, body: dict | None = None) -> dict:
        url = await self._base_url() + path
        async with session.request(method, url, json=body, ssl=self._tls,
                                   headers={"Authorization": f"Bearer {self._key}"}) as resp:
            if resp.status != 200:
                raise RuntimeError(f"{method} {path}: {resp.status} {(await resp.text())[:200]}")
            return await resp.json()

    # ---- one reconcile ---------------------------------------------------------------------

    def _inspect_all(self, ids: list[str]) -> dict[str, ContainerInfo]:
        out = {}
        for cid in ids:
            try:
                out[cid] = decode_container_attrs(self.docker.client.api.inspect_container(cid))
            except docker.errors.NotFound:
                continue    # not here (yet, or any more): the next pass sees
        return out

    async def reconcile(self, session: aiohttp.ClientSession) -> None:
        """List the node's tasks at the control plane, then remove and create sidecars."""
        loop = asyncio.get_running_loop()
        listing = await self._call(session, "GET", "/v1/swarm/tasks")
        self.node_id = listing.get("node", "")
        await self.keep_gateway(session, bool(listing.get("restart_gateway")))
        entries = [e for e in listing.get("tasks", []) if not e.get("error")]
        inspected = await loop.run_in_executor(None, self._inspect_all, [e["container"] for e in entries])
        view = await loop.run_in_executor(None, self.docker.list_view)
        # Sidecars the control plane refused for a token it never issued: recreated with a new one.
        orphans = {sidecar_name(app) for app in local_apps([e for e in entries if e.get("recreate")], inspected)}
        for sc in [sc for sc in view.sidecars if sc.name in orphans]:
            log.info("sidecar_remove", sidecar=sc.name, reason="its bootstrap token is unknown to the control plane")
            await loop.run_in_executor(None, self.docker.remove, sc.id)
        workloads = build_workloads(local_apps(entries, inspected))
        plan = plan_sidecars(workloads, [sc for sc in view.sidecars if sc.name not in orphans], view.image_id)
        for sc in plan.remove:
            log.info("sidecar_remove", sidecar=sc.name, reason="task gone, stopped, stale or duplicate")
            await loop.run_in_executor(None, self.docker.remove, sc.id)
        for wl in plan.create:
            answer = await self._call(session, "POST", "/v1/swarm/sidecars", {"container": wl.container.id})
            if answer.get("name") != sidecar_name(wl.container):
                raise RuntimeError(f"the control plane names the sidecar {answer.get('name')!r}")
            log.info("sidecar_create", app=wl.container.name, sidecar=answer["name"], service=wl.spec.service)
            await loop.run_in_executor(None, functools.partial(
                self.docker.create_sidecar, wl.container, answer["env"], token=answer.get("token", "")))

    async def keep_gateway(self, session: aiohttp.ClientSession, restart: bool) -> None:
        """Run this node's gateway in the agent's own task (its published port), with an environment
        and a one-time token from the control plane; started again when it exits or is refused."""
        if not self.settings.gateway:
            return
        gw = self._gateway
        if gw is not None and gw.returncode is None:
            if not restart:
                return
            log.info("gateway_restart", reason="its bootstrap token is unknown to the control plane")
            gw.terminate()
            await gw.wait()
        answer = await self._call(session, "POST", "/v1/swarm/gateway", {})
        # Only the gateway's own settings: none of the agent's (its key file path stays out too).
        env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
        env.update(answer["env"])
        self._gateway = await asyncio.create_subprocess_exec("gateway", "run", env=env)
        log.info("gateway_started", gateway=answer.get("name"), pid=self._gateway.pid)

    async def _relay_admin(self, request: web.Request) -> web.StreamResponse:
        """One admin API call, passed on to the control plane wherever it runs (HTTPS over the
        overlay); the control plane checks the caller's admin token itself."""
        base = (await self._base_url()).replace(f":{AGENT_PORT}", f":{ADMIN_TLS_PORT}")
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() in ("authorization", "content-type", "accept")}
        try:
            async with self._relay.request(request.method, base + request.path_qs, headers=headers,
                                           data=await request.read(), ssl=self._tls) as resp:
                body = await resp.read()
                return web.Response(status=resp.status, body=body,
                                    content_type=resp.content_type if body else None)
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            return web.json_response({"error": f"the control plane did not answer: {type(exc).__name__}"},
                                     status=502)

    async def _start_admin_relay(self) -> web.AppRunner | None:
        if not self.settings.admin_port:
            return None
        self._relay = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._relay_admin)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "0.0.0.0", self.settings.admin_port, reuse_address=True).start()
        return runner

    # ---- run -------------------------------------------------------------------------------

    def _watch_events(self) -> None:
        """Blocking: a container event on this node asks for a reconcile."""
        while True:
            try:
                for _ in self.docker.client.events(decode=True, filters={"type": "container"}):
                    if self._loop is not None:
                        self._loop.call_soon_threadsafe(self._dirty.set)
            except Exception as exc:  # noqa: BLE001 - the engine restarted: listen again
                log.warning("docker_events_lost", error=str(exc))
                threading.Event().wait(1.0)

    async def run(self) -> None:
        """Reconcile on every event and every POLL_S, until cancelled; failures are logged and retried."""
        self._loop = asyncio.get_running_loop()
        threading.Thread(target=self._watch_events, name="docker-events", daemon=True).start()
        log.info("agent_started", control=self.settings.control_host)
        last_error = None
        timeout = aiohttp.ClientTimeout(total=CALL_S)
        relay = await self._start_admin_relay()
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session:
                while True:
                    try:
                        await self.reconcile(session)
                        if last_error is not None:
                            log.info("agent_reconciling_again", node=self.node_id)
                        last_error = None
                    except Exception as exc:  # noqa: BLE001 - the control plane may be moving: keep all as is
                        error = f"{type(exc).__name__}: {exc}"
                        if error != last_error:
                            log.warning("agent_reconcile_failed", error=error, action="sidecars kept as they are")
                        last_error = error
                    try:
                        await asyncio.wait_for(self._dirty.wait(), timeout=POLL_S)
                        await asyncio.sleep(0.15)   # events come in bursts
                    except asyncio.TimeoutError:
                        pass
                    self._dirty.clear()
        finally:
            if relay is not None:
                await relay.cleanup()
            if self._relay is not None:
                await self._relay.close()
