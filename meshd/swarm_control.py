"""`meshd swarm-control`: the control plane on a Swarm manager (docs/SWARM.md).

The Compose control plane (meshd.app.Meshd) with the Swarm API as its source: services, tasks and
nodes are listed on the manager's engine every POLL_S (task changes on other nodes are no event
here), turned into containers by meshcore.swarm, and published over the same versioned channel,
which it serves on its own overlay addresses. It creates no container itself: the agent of each node
(meshd.swarm_agent) asks it for one sidecar per local meshed task and starts it there.

Identity proof (the agent vouches, the control plane checks the swarm):
- an agent calls with the swarm secret `mesh_agent_key` (bearer), from an overlay address that
  belongs to a running task of the agent service; that task's node is the agent's node;
- it gets a sidecar's bootstrap token only for a running meshed task that the swarm placed on that
  node, and the identity is derived here from the task's service labels, never sent by the agent;
- the sidecar's hello is then checked as on one host (meshd.auth), with the agent's word standing in
  for `docker inspect` of the sidecar container, and the swarm's task for the app container: the
  peer address must be one of the task's overlay addresses;
- after a move, the control plane's store is new: a sidecar that comes back with a certificate of
  the mesh CA (kept in swarm secrets) for the identity of its task, from the task's address, is
  let in without a record of that certificate's serial; one that comes with a bootstrap token this
  control plane never issued (made just before the move) is recreated by its node's agent.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import docker
import structlog
from aiohttp import web

from certs.holder import peer_identity
from certs.store import write_file_atomic
from meshcore.labels import OWNER_LABEL, ROLE_LABEL, SIDECAR_FOR_LABEL, LabelDecodeError, decode_labels
from meshcore.protocol import CLOSE_FORBIDDEN, CLOSE_UNAUTHORIZED, CONTROL_PATH, CONTROL_PORT, Hello
from meshcore.snapshot import Announcement, build_workloads
from meshcore.swarm import (
    SwarmTask, SwarmView, decode_view, node_of_address, swarm_announcements, tasks_on_node,
)

from .app import Meshd, Settings
from .auth import NodeAuthenticator
from .control import AuthRefused, AuthResult
from .docker_adapter import OWNER, SIDECAR_ROLE, sidecar_name
from .plan import build_sidecar_env
from .store import Store
from .swarm_state import SwarmState, state_document

log = structlog.get_logger("meshd.swarm")

POLL_S = 2.0          # the swarm is listed this often (tasks on other nodes send no event here)
AGENT_PORT = 15013    # the agents' API (HTTPS with the control certificate; bearer = the agent key)
GATEWAY_PREFIX = "gateway-"   # + node id: each node's gateway, run by that node's agent
ADMIN_TLS_PORT = 15016  # the admin API on the overlay (HTTPS, control certificate), for the agents' relays


@dataclass
class SwarmSettings:
    """The control plane's Swarm settings, from the environment (see docs/SWARM.md)."""

    control_host: str = "mesh_control"   # MESH_SWARM_CONTROL_HOST: the name sidecars dial (dnsrr)
    agent_service: str = "mesh_agent"    # MESH_SWARM_AGENT_SERVICE: whose tasks may call as agents
    network: str = "mesh"                # MESH_SWARM_NETWORK: the overlay endpoints are dialled on
    agent_key_file: str = "/run/secrets/mesh_agent_key"   # MESH_SWARM_AGENT_KEY_FILE
    admin_token_file: str = "/run/secrets/mesh_admin_token"   # MESH_SWARM_ADMIN_TOKEN_FILE (optional)

    @classmethod
    def from_env(cls, env: dict[str, str]) -> "SwarmSettings":
        """Settings from MESH_SWARM_* variables."""
        return cls(control_host=env.get("MESH_SWARM_CONTROL_HOST", cls.control_host),
                   agent_service=env.get("MESH_SWARM_AGENT_SERVICE", cls.agent_service),
                   network=env.get("MESH_SWARM_NETWORK", cls.network),
                   agent_key_file=env.get("MESH_SWARM_AGENT_KEY_FILE", cls.agent_key_file),
                   admin_token_file=env.get("MESH_SWARM_ADMIN_TOKEN_FILE", cls.admin_token_file))


def task_inspect_attrs(task: SwarmTask) -> dict[str, Any]:
    """A task's container in the shape of `docker inspect` (what meshd.auth reads), from the swarm."""
    info = task.container
    return {"Id": info.id, "Name": "/" + info.name, "Created": info.created, "Image": info.image,
            "Config": {"Labels": dict(info.labels)}, "HostConfig": {"NetworkMode": "default"},
            "State": {"Running": info.running, "StartedAt": info.started_at},
            "NetworkSettings": {"Networks": {n: {"IPAddress": ip} for n, ip in info.networks.items()}}}


def vouched_sidecar_attrs(name: str, app_id: str) -> dict[str, Any]:
    """The sidecar container an agent created for `app_id`, in the shape of `docker inspect`: what
    the agent vouched for (owner and role labels, the app's network namespace, running)."""
    return {"Id": "", "Name": "/" + name, "State": {"Running": True},
            "Config": {"Labels": {OWNER_LABEL: OWNER, ROLE_LABEL: SIDECAR_ROLE, SIDECAR_FOR_LABEL: app_id}},
            "HostConfig": {"NetworkMode": f"container:{app_id}"}}


class SwarmDiscovery:
    """Discovery from the swarm (meshd.discovery's interface): every meshed running task whose
    sidecar is connected is announced at its overlay address."""

    def __init__(self, plane: "SwarmMeshd"):
        self.plane = plane

    def announcements(self) -> list[Announcement]:
        """What mDNS would have told on one host."""
        plane = self.plane
        # A sidecar that connected once serves while its task runs (its node is dropped with the task);
        # a control channel that drops for a while does not withdraw its endpoint.
        ready = {n.container for n in plane.hub.nodes.values() if n.kind == "sidecar" and n.authenticated}
        workloads = build_workloads([t.container for t in plane.swarm_view.tasks])
        return swarm_announcements(workloads, ready, plane.settings.trust_domain, plane.swarm.network)

    async def close(self) -> None:
        """Nothing to close: no mDNS on Swarm (multicast does not cross overlays)."""


class SwarmAuthenticator(NodeAuthenticator):
    """meshd.auth's checks with the swarm and the agents' word in place of the local engine."""

    def __init__(self, pki, plane: "SwarmMeshd"):
        super().__init__(pki, client=None)
        self.plane = plane

    def _inspect(self, name_or_id: str) -> dict | None:
        app_id = self.plane.vouched.get(name_or_id)
        if app_id is not None:
            return vouched_sidecar_attrs(name_or_id, app_id)
        task = self.plane.swarm_view.task_by_container(name_or_id)
        return task_inspect_attrs(task) if task is not None else None

    def _own_task(self, request, hello: Hello) -> SwarmTask | None:
        """The running task whose sidecar `hello` claims to be, when it calls from the task's address."""
        task = self.plane.swarm_view.task_by_container(hello.container)
        if task is None or not task.container.running or hello.node != sidecar_name(task.container):
            return None
        return task if (request.remote or "") in task.container.networks.values() else None

    def _placement(self, hello: Hello, node_attrs: dict | None, app_attrs: dict | None, peer: str) -> str | None:
        if hello.kind == "gateway":
            return self._gateway_placement(hello.node, peer)
        return super()._placement(hello, node_attrs, app_attrs, peer)

    def _gateway_placement(self, node: str, peer: str) -> str | None:
        """A node's gateway runs in that node's agent task: it calls from that task's address."""
        node_id = node.removeprefix(GATEWAY_PREFIX)
        if not node.startswith(GATEWAY_PREFIX) or not node_id:
            return f"{node!r} is not the gateway of a swarm node"
        if node_of_address(self.plane.swarm_view.tasks, self.plane.swarm.agent_service, peer) != node_id:
            return f"the gateway connects from {peer}, not from the agent task of its node"
        return None

    async def authenticate(self, request, hello: Hello) -> AuthResult:
        if hello.kind == "gateway" and not hello.token:
            return self._gateway_by_certificate(request, hello)
        try:
            return await super().authenticate(request, hello)
        except AuthRefused as exc:
            if hello.token and ("no bootstrap token" in exc.reason or "already used" in exc.reason):
                # Its token came from a control plane that is gone (or it lost its key): the agent of
                # its node is told to recreate it with a new token (GET /v1/swarm/tasks).
                if hello.kind == "gateway":
                    if self._gateway_placement(hello.node, request.remote or "") is None:
                        self.plane.orphans.add(hello.node)
                elif self._own_task(request, hello) is not None:
                    self.plane.orphans.add(hello.node)
                raise
            if hello.token or "was not issued to this node" not in exc.reason:
                raise
        # The store did not move with the control plane: a certificate of the mesh CA for the task's
        # identity, from the task's own address, is enough (the TLS layer verified the chain).
        sslobj = request.transport.get_extra_info("ssl_object") if request.transport else None
        identity = peer_identity(sslobj) if sslobj is not None else None
        task = self._own_task(request, hello)
        if identity is None or task is None or hello.kind != "sidecar":
            raise AuthRefused(CLOSE_FORBIDDEN, "the client certificate was not issued to this node")
        try:
            spec = decode_labels(task.container)
        except LabelDecodeError as exc:
            raise AuthRefused(CLOSE_FORBIDDEN, f"the task's mesh labels do not decode ({exc.label})") from None
        if identity != self.pki.workload_identity(spec.namespace, spec.service):
            raise AuthRefused(CLOSE_FORBIDDEN, "the client certificate is not this task's identity")
        log.info("node_readmitted", node=hello.node, identity=identity, reason="certificate of the mesh CA")
        return AuthResult(identity=identity, via="certificate")

    def _gateway_by_certificate(self, request, hello: Hello) -> AuthResult:
        """A gateway's later hello: the gateway identity's certificate (chain verified by the TLS
        layer), from the agent task of the node it is named for; no store record needed."""
        sslobj = request.transport.get_extra_info("ssl_object") if request.transport else None
        identity = peer_identity(sslobj) if sslobj is not None else None
        if identity != self.pki.gateway_identity:
            raise AuthRefused(CLOSE_UNAUTHORIZED, "no bootstrap token and no gateway certificate")
        reason = self._gateway_placement(hello.node, request.remote or "")
        if reason is not None:
            raise AuthRefused(CLOSE_FORBIDDEN, reason)
        return AuthResult(identity=identity, via="certificate")


class SwarmMeshd(Meshd):
    """The control plane on a manager: the swarm as source, agents as the hands on each node."""

    def __init__(self, settings: Settings, swarm: SwarmSettings, client: docker.DockerClient | None = None):
        client = client or docker.from_env()
        # Rules, policy, tracing settings and the version, as the last control plane left them (in
        # raft, meshd.swarm_state), into the store before meshd reads it.
        self.state = SwarmState(client.api)
        seed = Store(os.path.join(settings.state_dir, "state.db"))
        try:
            seeded = self.state.seed(seed)
        finally:
            seed.close()
        # The admin token from a swarm secret, when there is one: the same after a move.
        if os.path.exists(swarm.admin_token_file):
            with open(swarm.admin_token_file, encoding="ascii") as fh:
                token = fh.read().strip()
            if len(token) < 32:
                raise ValueError(f"{swarm.admin_token_file}: an admin token has 32 characters at least")
            write_file_atomic(os.path.join(settings.state_dir, "admin.token"), token.encode("ascii") + b"\n", 0o600)
        super().__init__(settings, client)
        log.info("swarm_state_loaded", keys=seeded)
        self._saving: asyncio.Future | None = None
        self.swarm = swarm
        self.swarm_view = SwarmView()
        self.vouched: dict[str, str] = {}     # sidecar name -> app container id (an agent's word)
        self.orphans: set[str] = set()        # sidecars refused for a token this control plane never issued
        self.own_ips: list[str] = []
        self.discovery = SwarmDiscovery(self)
        self.hub.auth = SwarmAuthenticator(self.pki, self)
        with open(swarm.agent_key_file, encoding="utf-8") as fh:
            self._agent_key = fh.read().strip()
        if not self._agent_key:
            raise ValueError(f"{swarm.agent_key_file} is empty")

    # ---- the rebuild: the swarm, not the local engine ----------------------------------------

    def _list_swarm(self) -> SwarmView:
        api = self.docker.client.api
        return decode_view(api.services(), api.tasks(filters={"desired-state": "running"}), api.nodes())

    async def _rebuild(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            view = await loop.run_in_executor(None, self._list_swarm)
        except Exception as exc:  # a manager without quorum answers nothing: serve the last view
            self.problems.fail("swarm_list", "swarm", f"{type(exc).__name__}: {exc}", time.time())
            raise
        self.problems.ok("swarm_list", "swarm")
        self.swarm_view = view
        # Its own task by its host name, which Docker sets to the container's short id.
        me = view.task_by_container(socket.gethostname())
        if me is not None:
            self.own_ips = sorted(set(me.container.networks.values()))
            self.problems.ok("swarm_self", "control")
        else:
            self.problems.fail("swarm_self", "control", f"no task with container {socket.gethostname()!r}: "
                               "is `hostname:` set on the control service?", time.time())
        self.pki.control_tls.ensure(self.own_ips)
        await self._apply_listeners(self.own_ips)
        running = {t.container.id for t in view.tasks if t.container.running}
        for name in [n for n, app in self.vouched.items() if app not in running]:
            del self.vouched[name]
        self.orphans &= ({sidecar_name(t.container) for t in view.tasks if t.container.running}
                         | {GATEWAY_PREFIX + n.id for n in view.nodes})
        for name, node in list(self.hub.nodes.items()):
            if node.kind == "sidecar" and node.container not in running:
                await self.hub.drop(name)
        # Just started (or moved here), the first snapshot waits a little for the sidecars of running
        # tasks to reconnect (meshd.app.hold_for_discovery): they keep serving their last one meanwhile.
        self._publish_config(build_workloads([t.container for t in view.tasks]),
                             {sidecar_name(t.container) for t in view.tasks if t.container.running})

    def _publish(self, config) -> None:
        super()._publish(config)
        self._save_state()

    def _save_state(self) -> None:
        """Write the replicated state to the swarm when it changed (one write at a time; the next
        publish writes what a running one missed)."""
        if self._saving is not None and not self._saving.done():
            return
        doc = state_document(self.store)
        if doc == self.state.saved:
            return

        def done(fut: asyncio.Future) -> None:
            exc = fut.exception()
            if exc is not None:
                self.problems.fail("swarm_state", "swarm", f"{type(exc).__name__}: {exc}", time.time())
                self._retry_later()
            else:
                self.problems.ok("swarm_state", "swarm")

        self._saving = asyncio.get_running_loop().run_in_executor(None, self.state.save, doc)
        self._saving.add_done_callback(done)

    def versions_of(self, service: str) -> set[str] | None:
        """The versions of a mesh service among the swarm's tasks; None when there is none."""
        found = {wl.spec.version for wl in build_workloads([t.container for t in self.swarm_view.tasks])
                 if wl.spec is not None and wl.spec.service == service}
        return found or None

    def status(self) -> dict:
        """GET /v1/status, with the swarm: nodes, and per node its agent and sidecars."""
        body = super().status()
        body["swarm"] = swarm_status(self.swarm_view, self.hub.nodes, self.swarm.agent_service)
        return body

    # ---- the agents' API -------------------------------------------------------------------

    def _agent_node(self, request: web.Request) -> str:
        """The node of the calling agent, or HTTPUnauthorized/HTTPForbidden."""
        bearer = request.headers.get("Authorization", "")
        if not hmac.compare_digest(bearer.encode(), f"Bearer {self._agent_key}".encode()):
            raise web.HTTPUnauthorized(text="agent key required")
        node = node_of_address(self.swarm_view.tasks, self.swarm.agent_service, request.remote or "")
        if node is None:
            raise web.HTTPForbidden(text=f"{request.remote} is no task of {self.swarm.agent_service}")
        return node

    async def _agent_tasks(self, request: web.Request) -> web.Response:
        """GET /v1/swarm/tasks: the meshed tasks the swarm placed on the calling agent's node."""
        node = self._agent_node(request)
        out = []
        for wl in build_workloads([t.container for t in tasks_on_node(self.swarm_view.tasks, node)]):
            c = wl.container
            out.append({"container": c.id, "name": c.name, "labels": c.labels, "running": c.running,
                        "error": str(wl.error) if wl.error else None,
                        "recreate": sidecar_name(c) in self.orphans})
        return web.json_response({"node": node, "tasks": out,
                                  "restart_gateway": GATEWAY_PREFIX + node in self.orphans})

    async def _agent_sidecar(self, request: web.Request) -> web.Response:
        """POST /v1/swarm/sidecars {"container": id}: the environment (with a one-time bootstrap
        token) of the sidecar the calling agent is about to start for a task on its node."""
        node = self._agent_node(request)
        try:
            body = await request.json()
            container = str(body["container"])
        except (ValueError, KeyError, TypeError):
            raise web.HTTPBadRequest(text='body: {"container": "<task container id>"}') from None
        task = self.swarm_view.task_by_container(container)
        if task is None or task.node_id != node or not task.container.running:
            raise web.HTTPForbidden(text="no running task with that container on the agent's node")
        wl = build_workloads([task.container])
        if not wl or wl[0].spec is None:
            raise web.HTTPConflict(text=str(wl[0].error) if wl else "the task is not meshed")
        name = sidecar_name(task.container)
        token = self.pki.issue_token("sidecar", name, task.container.id)
        self.vouched[name] = task.container.id
        self.orphans.discard(name)
        env = build_sidecar_env(wl[0], name, self.swarm.control_host, self.settings.trust_domain,
                                bundle_pem=self.pki.ca.bundle_pem.decode("ascii"))
        env.update(self.settings.limits)   # meshcore.limits set on the control plane
        log.info("sidecar_vouched", sidecar=name, node=node, service=wl[0].spec.service)
        # The token apart from the environment: the agent copies it into the sidecar as a file.
        return web.json_response({"name": name, "env": env, "token": token})

    async def _agent_gateway(self, request: web.Request) -> web.Response:
        """POST /v1/swarm/gateway: the environment (with a one-time bootstrap token) of the gateway
        the calling agent runs in its own task (its node's published gateway port)."""
        node = self._agent_node(request)
        name = GATEWAY_PREFIX + node
        st = self.settings
        env = {"MESH_CONTROL_URL": f"wss://{self.swarm.control_host}:{CONTROL_PORT}{CONTROL_PATH}",
               "MESH_GATEWAY_PORT": str(st.gateway_port), "MESH_GATEWAY_HTTPS_PORT": str(st.gateway_https_port),
               "MESH_GATEWAY_HOSTS": ",".join(st.gateway_hosts), "MESH_GATEWAY_BIND": "0.0.0.0",
               "MESH_NODE": name, "MESH_IDENTITY": self.pki.gateway_identity,
               "MESH_BOOTSTRAP_TOKEN": self.pki.issue_token("gateway", name, ""),
               "MESH_CA_BUNDLE": self.pki.ca.bundle_pem.decode("ascii"), **st.limits}
        self.orphans.discard(name)
        log.info("gateway_vouched", gateway=name, node=node)
        return web.json_response({"name": name, "env": env})

    async def run(self) -> None:
        """Serve the control plane and the agents' API; list the swarm every POLL_S."""
        app = web.Application()
        app.router.add_get("/v1/swarm/tasks", self._agent_tasks)
        app.router.add_post("/v1/swarm/sidecars", self._agent_sidecar)
        app.router.add_post("/v1/swarm/gateway", self._agent_gateway)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        self.pki.control_tls.ensure(self.own_ips)
        await web.TCPSite(runner, "0.0.0.0", AGENT_PORT, reuse_address=True,
                          ssl_context=self.pki.control_tls.front).start()
        # The admin API (its own token check) for the agents' relays on every node (meshctl --api).
        admin = web.AppRunner(self._admin_app(), access_log=None)
        await admin.setup()
        await web.TCPSite(admin, "0.0.0.0", ADMIN_TLS_PORT, reuse_address=True,
                          ssl_context=self.pki.control_tls.front).start()

        async def poll() -> None:
            while True:
                await asyncio.sleep(POLL_S)
                self.trigger()

        poller = asyncio.ensure_future(poll())
        try:
            await super().run()
        finally:
            poller.cancel()
            await runner.cleanup()
            await admin.cleanup()


def swarm_status(view: SwarmView, nodes: dict, agent_service: str) -> dict:
    """Per swarm node: role, state, whether an agent task runs there, its sidecars and their state."""
    out = []
    by_container = {n.container: n for n in nodes.values() if n.kind == "sidecar"}
    for node in view.nodes:
        here = tasks_on_node(view.tasks, node.id)
        sidecars = []
        for wl in build_workloads([t.container for t in here]):
            conn = by_container.get(wl.container.id)
            sidecars.append({"task": wl.container.name, "service": wl.spec.service if wl.spec else None,
                             "connected": bool(conn and conn.connected),
                             "acked_version": conn.acked_version if conn else None})
        gateway = nodes.get(GATEWAY_PREFIX + node.id)
        out.append({"id": node.id, "hostname": node.hostname, "role": node.role, "state": node.state,
                    "leader": node.leader, "gateway_connected": bool(gateway and gateway.connected),
                    "agent": any(t.service == agent_service and t.container.running for t in here),
                    "sidecars": sidecars})
    return {"nodes": out}


def settings_from_env(env: dict[str, str] | None = None) -> SwarmSettings:
    """SwarmSettings from this process's environment."""
    return SwarmSettings.from_env(dict(os.environ if env is None else env))
