"""meshd's run loop: Docker watch -> rebuild -> sidecars, gateway, discovery, versioned push."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import aiohttp
import docker
import structlog
from aiohttp import web

from meshcore.labels import DEFAULT_TRUST_DOMAIN, wants_hold
from meshcore.protocol import CONTROL_PATH, CONTROL_PORT
from meshcore.snapshot import (
    MeshConfig, Snapshot, assign_owners, build_config, build_workloads, encode_snapshot, resolve_service,
    service_key,
)
from meshcore.telemetry_settings import TelemetrySettings
from meshcore.egress import EGRESS_ALLOW_ANY, EgressError, decode_egress_mode
from meshcore.limits import limits_env, limits_from_env

from . import __version__
from .control import Hub, dumps
from .discovery import Discovery
from .events import first_in_window
from .docker_adapter import GATEWAY_NAME, DockerAdapter, DockerView, sidecar_name
from . import hold
from .parallel import run_bounded
from .problems import Problems
from .plan import build_sidecar_env, control_host_for, plan_sidecars
from .rules_api import RulesBook, add_routes as add_rules_routes
from .auth import NodeAuthenticator
from .pki import Pki
from .security_api import (
    PolicyBook, add_cert_routes, add_policy_routes, admin_auth_middleware, load_or_create_admin_token,
)
from .store import Store
from .metrics_hub import TelemetryHub, add_routes as add_telemetry_routes  # observability
from .traces import (
    MAX_BODY as OTLP_MAX_BODY, SettingsBook, TraceStore, add_receiver, add_routes as add_trace_routes,
    settings_from_env,
)

log = structlog.get_logger("meshd")

ADMIN_PORT = 15014
SIDECAR_ADMIN_PORT = 15020
DEBOUNCE_S = 0.15      # events come in bursts (compose up starts many containers at once)
RESYNC_S = 30.0        # level-triggered safety net: a full re-list even without events
DRAIN_FORGET_S = 120.0  # a container that outlives a stop signal this long is serving again
UNCONNECTED_GRACE_S = 10.0  # a sidecar running this long without a control connection is reported
MAX_REASON_QUERIES = 32     # admin ports asked per status call, at most (1 s each, concurrently)
HOLD_POLL_S = 0.2      # how often held apps' sidecars are asked whether they are ready
OWNERS_KEY = "service_owners"  # store key: service name -> the project holding it bare
RETRY_S = 5.0          # a failed step of a rebuild (listener, sidecar, mDNS) is tried again after this
STOP_SIGNALS = {"15", "2", "3", "9", "SIGTERM", "SIGINT", "SIGQUIT", "SIGKILL"}


def docker_time(value: str) -> float:
    """Seconds since the epoch of Docker's RFC 3339 time with nanoseconds; 0.0 when unreadable."""
    head, _, frac = value.rstrip("Z").partition(".")
    try:
        base = datetime.strptime(head, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc).timestamp()
    except ValueError:
        return 0.0
    return base + (float(f"0.{frac}") if frac.isdigit() else 0.0)


async def sidecar_ready(ip: str, timeout: float = 0.5) -> bool:
    """The sidecar at `ip` answers 200 on /healthz/ready (config, listeners and certificate)."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
            async with session.get(f"http://{ip}:{SIDECAR_ADMIN_PORT}/healthz/ready") as resp:
                return resp.status == 200
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return False


async def read_control_error(ip: str, timeout: float = 1.0) -> str:
    """A sidecar's own account of its control channel (GET /config on its admin port)."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
            async with session.get(f"http://{ip}:{SIDECAR_ADMIN_PORT}/config") as resp:
                body = await resp.json(content_type=None)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        return f"its admin port did not answer ({type(exc).__name__})"
    if body.get("control_connected"):
        return "connected just now"
    return body.get("control_last_error") or "not connected yet (no error reported)"


def is_stop_signal(event: dict) -> bool:
    """A Docker `kill` event whose signal ends the container (not, say, SIGHUP for a reload)."""
    if event.get("Action") != "kill":
        return False
    return str((event.get("Actor") or {}).get("Attributes", {}).get("signal", "")) in STOP_SIGNALS


@dataclass
class Settings:
    """meshd's settings, from the environment (see README)."""

    image: str = "meshd:latest"
    state_dir: str = "/var/lib/meshd"
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    gateway_port: int = 8080
    gateway_bind: str = "0.0.0.0"
    manage_gateway: bool = True
    admin_host: str = "127.0.0.1"
    cert_ttl: str = "24h"                  # MESH_CERT_TTL: workload certificate lifetime
    gateway_https_port: int = 8443
    gateway_hosts: tuple[str, ...] = ("localhost",)
    gateway_cert: str = ""                 # MESH_GATEWAY_CERT/KEY: user-supplied HTTPS certificate files
    gateway_key: str = ""
    jwks_file: str = ""                    # MESH_JWKS_FILE (host path, mounted read-only) or MESH_JWKS_URL
    jwks_url: str = ""
    telemetry: TelemetrySettings = TelemetrySettings()  # MESH_TRACE_SAMPLING, MESH_OTLP_ENDPOINT, MESH_ACCESS_LOG
    egress_mode: str = EGRESS_ALLOW_ANY    # MESH_EGRESS: allow-any | registry-only (meshcore.egress)
    limits: dict[str, str] = field(default_factory=dict)  # MESH_MAX_HEADERS...: handed to nodes

    @classmethod
    def from_env(cls) -> "Settings":
        """Settings from MESH_* / MESHD_* variables."""
        env = os.environ
        return cls(
            image=env.get("MESH_IMAGE", cls.image),
            state_dir=env.get("MESHD_STATE_DIR", cls.state_dir),
            trust_domain=env.get("MESH_TRUST_DOMAIN", cls.trust_domain),
            gateway_port=int(env.get("MESH_GATEWAY_PORT", cls.gateway_port)),
            gateway_bind=env.get("MESH_GATEWAY_BIND", cls.gateway_bind),
            manage_gateway=env.get("MESHD_GATEWAY", "true").lower() not in ("0", "false", "no", "off"),
            admin_host=env.get("MESHD_ADMIN_HOST", cls.admin_host),
            cert_ttl=env.get("MESH_CERT_TTL", cls.cert_ttl) or cls.cert_ttl,
            gateway_https_port=int(env.get("MESH_GATEWAY_HTTPS_PORT", cls.gateway_https_port)),
            gateway_hosts=tuple(h.strip() for h in env.get("MESH_GATEWAY_HOSTS", "localhost").split(",")
                                if h.strip()) or ("localhost",),
            gateway_cert=env.get("MESH_GATEWAY_CERT", ""), gateway_key=env.get("MESH_GATEWAY_KEY", ""),
            jwks_file=env.get("MESH_JWKS_FILE", ""), jwks_url=env.get("MESH_JWKS_URL", ""),
            telemetry=settings_from_env(dict(env)),
            egress_mode=egress_mode_from_env(env),
            limits=checked_limits_env(env),
        )


def checked_limits_env(env) -> dict[str, str]:
    """The limit variables (meshcore.limits) set for meshd, checked, to pass to the nodes it creates."""
    limits_from_env(env)   # raises LimitError naming a bad variable
    return limits_env(env)


def egress_mode_from_env(env) -> str:
    """MESH_EGRESS (default allow-any); a bad value raises EgressError naming the variable."""
    try:
        return decode_egress_mode(env.get("MESH_EGRESS") or EGRESS_ALLOW_ANY)
    except EgressError as exc:
        raise EgressError(f"MESH_EGRESS: {exc}") from None


def config_digest(config: MeshConfig) -> str:
    """A stable digest of a config's contents (the version moves only when this changes)."""
    body = encode_snapshot(Snapshot(version=0, config=config))
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


# Just started, meshd knows its nodes' endpoints only as their mDNS answers come in (usually within a
# second). Until every running sidecar's instance has answered, a snapshot would tell every node that
# those services have no endpoints (503 `NH`) although the nodes' last config still has them: it is
# held back, this long at most, and the nodes keep serving their last config meanwhile.
DISCOVERY_WARMUP_S = 5.0


def hold_for_discovery(expected: set[str], announced: set[str], elapsed: float,
                       warmup: float = DISCOVERY_WARMUP_S) -> float | None:
    """Seconds to hold the first snapshots back (None: publish): while `elapsed` (since meshd started)
    is under `warmup` and some `expected` instance (an app whose sidecar runs) is not `announced`."""
    if elapsed >= warmup or expected <= announced:
        return None
    return warmup - elapsed


class NoBridge(RuntimeError):
    """A meshed container on no bridge network: no address of this host for its sidecar to dial."""


class Meshd:
    """The control plane process."""

    def __init__(self, settings: Settings, client: docker.DockerClient | None = None):
        self.settings = settings
        self.docker = DockerAdapter(client or docker.from_env(), settings.image)
        self.store = Store(os.path.join(settings.state_dir, "state.db"))
        self.pki = Pki(settings.state_dir, settings.trust_domain, self.store, settings.cert_ttl,
                       env=dict(os.environ), gateway_hosts=settings.gateway_hosts)
        self.admin_token = load_or_create_admin_token(settings.state_dir)
        self.policies = PolicyBook(self.store)
        self.hub = Hub(on_hello_version=self._on_hello_version, on_refused=self._refused,
                       auth=NodeAuthenticator(self.pki, self.docker.client, on_identity_lost=self._identity_lost))
        self._recreated: dict[str, float] = {}
        self._refusals: dict[tuple, float] = {}   # (peer, node, reason) -> when last made an event
        self.discovery = Discovery(on_change=self.trigger)
        self.view: DockerView | None = None
        self.view_listed_at = 0.0   # wall time the listing of `view` began
        self.label_errors: list = []
        self.started = time.time()
        self._started_mono = time.monotonic()
        self._warming = True        # until the first snapshot is published (hold_for_discovery)
        self._dirty = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._control_sites: dict[str, web.TCPSite] = {}
        self._stop = asyncio.Event()
        self.rules = RulesBook(self.store)
        # Which project holds each shared service name bare (meshcore.snapshot.assign_owners): kept
        # across restarts so that a key never changes under a running service.
        self.owners: dict[str, str] = dict(self.store.get(OWNERS_KEY, {}) or {})
        self.draining: dict[str, float] = {}  # container id -> when it was sent a stop signal
        self.telemetry = TelemetryHub.for_meshd(self)  # observability
        self.traces = TraceStore()
        self.telemetry_settings = SettingsBook(self.store, settings.telemetry)
        self._rebuild_lock = asyncio.Lock()
        self.problems = Problems(on_change=self._problem_event)
        self.holds = hold.Holds(self.store)
        self._retry: asyncio.TimerHandle | None = None
        self._version = int(self.store.get("snapshot_version", 0))
        self._digest = self.store.get("snapshot_digest", "")

    # ---- triggers ------------------------------------------------------------------------

    def trigger(self) -> None:
        """Ask for a full rebuild (debounced); safe from any thread."""
        if self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._dirty.set)

    def _on_hello_version(self, last_version: int) -> None:
        # A node that holds a newer version than ours (state lost) must still see versions go up.
        if last_version > self._version:
            self._version = last_version
            self._digest = ""
            self.trigger()

    def _identity_lost(self, node: str) -> None:
        """A node of ours lost its key and its token is spent: recreate it (at most once a minute)."""
        now = time.time()
        if now - self._recreated.get(node, 0.0) < 60.0:
            return
        self._recreated[node] = now
        name = GATEWAY_NAME if node == "gateway" else node
        log.warning("node_identity_lost", node=node, action="recreate with a new bootstrap token")

        def remove() -> None:
            try:
                self.docker.remove(name)
            except docker.errors.APIError as exc:
                log.warning("node_recreate_failed", node=node, error=str(exc))
            self.trigger()

        threading.Thread(target=remove, name=f"recreate-{node}", daemon=True).start()

    def _refused(self, hello, peer: str, exc) -> None:
        """A refused hello (a replayed token, a rogue node) as a `node_refused` event, one a minute
        per peer, node and reason; the reasons name no secret (meshcore.bootstrap)."""
        if not first_in_window(self._refusals, (peer, hello.node, exc.reason), time.monotonic()):
            return
        self.telemetry.events.add("node_refused", f"{hello.kind} {hello.node[:100]!r} from {peer or '?'} refused "
                                  f"({exc.code}): {exc.reason}", code=exc.code, peer=peer, node=hello.node[:100])

    def _problem_event(self, what: str, problem) -> None:
        """One event when a part of the mesh starts failing and one when it works again."""
        if what == "problem":
            message = f"{problem.kind} {problem.subject}: {problem.message}"
        else:
            message = f"{problem.kind} {problem.subject}: works again after {problem.attempts} attempt(s)"
        self.telemetry.events.add(what, message, kind_of=problem.kind, subject=problem.subject)

    def _watch_events(self) -> None:
        """Blocking: every Docker container event triggers a rebuild (level-triggered)."""
        while not self._stop.is_set():
            try:
                for event in self.docker.client.events(decode=True, filters={"type": "container"}):
                    self._hold_at_start(event)
                    if self._loop is not None:
                        self._loop.call_soon_threadsafe(self.note_event, event)
            except Exception as exc:  # the engine restarted or the socket dropped: reconnect
                log.warning("docker_events_lost", error=str(exc))
                time.sleep(1.0)

    def _hold_at_start(self, event: dict) -> None:
        """In the event thread, at once: pause a meshed app that just started (meshd.hold)."""
        if event.get("Action") != "start":
            return
        actor = event.get("Actor") or {}
        cid = actor.get("ID") or event.get("id") or ""
        if not cid or not wants_hold(actor.get("Attributes") or {}):
            return
        if self.docker.set_paused(cid, True) and self._loop is not None:
            now = time.time()
            self._loop.call_soon_threadsafe(self.holds.add, cid, now)
            # how long the app ran unheld: calls it made in that time left without the mesh
            after_ms = round((now - int(event.get("timeNano") or 0) / 1e9) * 1000) if event.get("timeNano") else None
            log.info("app_held", container=(actor.get("Attributes") or {}).get("name", cid[:12]),
                     reason="until its sidecar is ready", paused_after_start_ms=after_ms)

    async def _release_holds(self) -> None:
        """Unpause each held app once its sidecar is ready (or after HOLD_MAX_S), every 0.2 s."""
        while True:
            await asyncio.sleep(HOLD_POLL_S)
            if not self.holds.since or self.view is None:
                continue
            try:
                await self._release_ready_holds()
            except Exception:  # noqa: BLE001 - the loop must outlive any one failure: apps stay paused
                log.exception("hold_release_failed")

    async def _release_ready_holds(self) -> None:
        """One pass of _release_holds over the current holds, every held app asked at once (a
        `--scale web=100` holds 100 apps: one by one, a pass outlasted HOLD_MAX_S)."""
        apps = {app.id: app for app in self.view.apps}
        specs = {wl.container.id: wl.spec for wl in build_workloads(self.view.apps)}
        # Only a listing begun after the hold says what the app is now: an older one may still show
        # it stopped (`compose start` of a stopped app).
        fresh = {cid: apps.get(cid) if self.view_listed_at >= since else None
                 for cid, since in self.holds.since.items()}

        async def ready(app) -> bool:
            ip = None if app is None else self.view.mesh_address(app)
            return ip is not None and await sidecar_ready(ip)

        answers = await asyncio.gather(*(ready(app) for app in fresh.values()))
        for (cid, app), is_ready in zip(fresh.items(), answers):
            since = self.holds.since.get(cid)
            if since is None:
                continue
            spec = specs.get(cid)
            verdict = hold.decide(since, time.time(), listed=app is not None,
                                  running=app is not None and app.running,
                                  wants_hold=spec is not None and spec.hold, ready=is_ready)
            if verdict is None:
                continue
            if verdict != hold.FORGET:
                await asyncio.get_running_loop().run_in_executor(None, self.docker.set_paused, cid, False)
            self.holds.drop(cid)
            name = app.name if app is not None else cid[:12]
            if verdict == hold.TIMEOUT:
                self.problems.fail("hold", name, f"its sidecar was not ready after {hold.HOLD_MAX_S:.0f} s: "
                                   "released unmeshed", time.time())
            elif verdict == hold.RELEASE:
                self.problems.ok("hold", name)
                log.info("app_released", container=name, held_s=round(time.time() - since, 2))

    def note_event(self, event: dict) -> None:
        """On the loop: remember stop signals (draining) and ask for a rebuild."""
        cid = event.get("id") or (event.get("Actor") or {}).get("ID", "")
        if is_stop_signal(event):
            # `docker stop` sends SIGTERM before the app goes: withdraw its endpoint now, while it
            # still finishes in-flight requests, not after its network namespace is gone.
            self.draining[cid] = time.monotonic()
        elif event.get("Action") == "start":
            self.draining.pop(cid, None)  # `docker restart` keeps the id: it is serving again
        self._dirty.set()

    # ---- the rebuild ---------------------------------------------------------------------

    async def rebuild(self) -> None:
        """List Docker, reconcile sidecars and gateway, refresh discovery, publish a new snapshot."""
        async with self._rebuild_lock:
            await self._rebuild()

    async def republish(self) -> int:
        """Rebuild the config from the last Docker view (after a rules change); the new version."""
        async with self._rebuild_lock:
            if self.view is None:
                await self._rebuild()
            else:
                self._publish_config(build_workloads(self.view.apps))
        return self._version

    def versions_of(self, service: str) -> set[str] | None:
        """The versions of a mesh service (a snapshot key) among meshed containers; None when there
        is no such service."""
        if self.view is None:
            return None
        found = [wl.spec.version for wl in build_workloads(self.view.apps)
                 if wl.spec is not None and service_key(wl.spec.service, wl.spec.namespace, self.owners) == service]
        return set(found) if found else None

    def resolve_service(self, name: str) -> str:
        """The snapshot key of a service a user named (`web`, `web.shop`); ServiceNameError when
        it is ambiguous or unknown (meshcore.snapshot.resolve_service)."""
        latest = self.hub.latest
        return resolve_service(latest.config.services, name) if latest is not None else name

    def _publish_config(self, workloads, sidecars_up: set[str] | None = None) -> None:
        announcements = [a for a in self.discovery.announcements() if a.instance not in self.draining]
        if self._warming and sidecars_up is not None:
            expected = {wl.container.id for wl in workloads if wl.spec is not None and wl.container.running
                        and sidecar_name(wl.container) in sidecars_up and wl.container.id not in self.draining}
            announced = {a.instance for a in announcements}
            wait = hold_for_discovery(expected, announced, time.monotonic() - self._started_mono)
            if wait is not None:
                log.info("snapshot_held", reason="waiting for mDNS answers of running sidecars",
                         missing=len(expected - announced), seconds_left=round(wait, 1))
                asyncio.get_running_loop().call_later(wait, self.trigger)   # answers trigger one sooner
                return
        self._warming = False
        owners = assign_owners(self.owners, workloads)
        if owners != self.owners:
            self.owners = owners
            self.store.put(OWNERS_KEY, owners)
        config, errors = build_config(workloads, announcements, self.settings.trust_domain,
                                      rules=self.rules.rules, policies=self.policies.policy,
                                      telemetry=self.telemetry_settings.settings,
                                      egress_mode=self.settings.egress_mode, owners=owners)
        self.label_errors = errors
        config = self.telemetry.apply_overrides(config)  # adaptive policy overrides (observability)
        self._publish(config)

    async def _rebuild(self) -> None:
        loop = asyncio.get_running_loop()
        listed_at = time.time()
        try:
            view = await loop.run_in_executor(None, self.docker.list_view)
        except Exception as exc:  # a slow or restarting engine: keep serving the last view, retry
            self.problems.fail("docker_list", "docker", f"{type(exc).__name__}: {exc}", time.time())
            raise
        self.problems.ok("docker_list", "docker")
        self.view, self.view_listed_at = view, listed_at
        running = {app.id for app in view.apps if app.running}
        horizon = time.monotonic() - DRAIN_FORGET_S
        for cid in [c for c, at in self.draining.items() if c not in running or at < horizon]:
            del self.draining[cid]
        # meshd's control certificate names every address sidecars dial (before any is created).
        self.pki.control_tls.ensure(list(view.network_gateways.values()))
        workloads = build_workloads(view.apps)
        plan = plan_sidecars(workloads, view.sidecars, view.image_id)
        # Each step below fails alone: the failure is a problem (status, events) retried next time.
        # Removals, then creations, a few at a time (run_bounded): one by one, a `compose down` of 100
        # waited on each sidecar's death in turn.
        async def remove(sc) -> None:
            log.info("sidecar_remove", sidecar=sc.name, reason="app gone, stopped, stale or duplicate")
            await self._step("sidecar_remove", sc.name, loop.run_in_executor(None, self.docker.remove, sc.id))
            # Its control connection goes with it, before a replacement of the same name connects: a
            # sidecar in a vanished namespace sends no FIN and would look connected (and ACKed) until
            # heartbeats fail, in place of the new one.
            if sc.name in self.hub.nodes:
                await self.hub.drop(sc.name)

        async def create(wl) -> None:
            await self._step("sidecar_create", sidecar_name(wl.container), self._create_sidecar(wl, view))

        await run_bounded([functools.partial(remove, sc) for sc in plan.remove])
        await run_bounded([functools.partial(create, wl) for wl in plan.create])
        self.problems.keep_only("sidecar_create", {sidecar_name(wl.container) for wl in workloads})
        self.problems.keep_only("sidecar_remove", {sc.name for sc in view.sidecars})
        # A hold that timed out stays a problem until the app's sidecar connects (or the app goes).
        connected = {name for name, node in self.hub.nodes.items() if node.connected}
        self.problems.keep_only("hold", {wl.container.name for wl in workloads if wl.container.running
                                         and sidecar_name(wl.container) not in connected})
        await self._step("gateway", GATEWAY_NAME, self._apply_gateway(view))
        await self._apply_listeners(list(view.network_gateways.values()))
        failed = await self.discovery.apply_interfaces(list(view.network_gateways.values()))
        for addr in view.network_gateways.values():
            if addr in failed:
                self.problems.fail("mdns_browse", addr, failed[addr], time.time())
            else:
                self.problems.ok("mdns_browse", addr)
        self.problems.keep_only("mdns_browse", set(view.network_gateways.values()))
        if failed:
            self._retry_later()
        self.discovery.prune({app.id for app in view.apps})
        created = {sidecar_name(wl.container) for wl in plan.create}
        await self._prune_nodes(view, {sc.name for sc in plan.remove} - created, created)
        known = {(e.container, e.label, e.message) for e in self.label_errors}
        self._publish_config(workloads, {sc.name for sc in view.sidecars if sc.running})
        for err in self.label_errors:
            if (err.container, err.label, err.message) not in known:
                log.warning("label_error", container=err.container, label=err.label, error=err.message)

    async def _step(self, kind: str, subject: str, work) -> bool:
        """Await one step of a rebuild; a failure is logged and kept as a problem, not raised."""
        try:
            await work
        except Exception as exc:  # noqa: BLE001 - one container or address must not stop the rest
            log.warning(f"{kind}_failed", subject=subject, error=str(exc) or type(exc).__name__)
            self.problems.fail(kind, subject, f"{type(exc).__name__}: {exc}", time.time())
            self._retry_later()
            return False
        self.problems.ok(kind, subject)
        return True

    def _retry_later(self, delay: float = RETRY_S) -> None:
        """Another rebuild after `delay` (failed steps are retried; events may never come)."""
        if self._retry is None or self._retry.cancelled():
            def fire() -> None:
                self._retry = None
                self.trigger()
            self._retry = asyncio.get_running_loop().call_later(delay, fire)

    async def _create_sidecar(self, wl, view: DockerView) -> None:
        host = control_host_for(wl.container, view.network_gateways)
        if host is None:
            raise NoBridge("the container is on no bridge network meshd can reach "
                           f"(networks: {', '.join(sorted(wl.container.networks)) or 'none'})")
        name = sidecar_name(wl.container)
        token = self.pki.issue_token("sidecar", name, wl.container.id)
        env = build_sidecar_env(wl, name, host, self.settings.trust_domain,
                                bundle_pem=self.pki.ca.bundle_pem.decode("ascii"))
        env.update(self.settings.limits)   # meshcore.limits set on meshd
        log.info("sidecar_create", app=wl.container.name, sidecar=name, service=wl.spec.service,
                 control=host)
        cid = await asyncio.get_running_loop().run_in_executor(
            None, lambda: self.docker.create_sidecar(wl.container, env, token=token))
        self.pki.set_node_container(name, cid)

    def _publish(self, config: MeshConfig) -> None:
        digest = config_digest(config)
        if digest == self._digest and self.hub.latest is not None:
            return
        if digest != self._digest:
            self._version += 1
            self._digest = digest
            self.store.put("snapshot_version", self._version)
            self.store.put("snapshot_digest", digest)
        self.hub.publish(Snapshot(version=self._version, config=config))
        log.info("snapshot_published", version=self._version, services=len(config.services),
                 endpoints=sum(len(e) for e in config.endpoints.values()))

    async def _prune_nodes(self, view: DockerView, removed: set[str], created: set[str]) -> None:
        live = ({sc.name for sc in view.sidecars if sc.running} - removed) | created
        live |= {GATEWAY_NAME, "gateway"}
        for name in [n for n in self.hub.nodes if n not in live]:
            await self.hub.drop(name)

    async def _apply_gateway(self, view: DockerView) -> None:
        if not self.settings.manage_gateway:
            return
        gw = view.gateway
        if gw is not None and gw.running and (not view.image_id or gw.image == view.image_id) \
                and not gw.token_in_env:   # one made by an older meshd is replaced: see meshd.plan
            return
        st = self.settings
        env = {"MESH_CONTROL_URL": f"wss://127.0.0.1:{CONTROL_PORT}{CONTROL_PATH}",
               "MESH_GATEWAY_PORT": str(st.gateway_port),
               "MESH_GATEWAY_HTTPS_PORT": str(st.gateway_https_port),
               "MESH_GATEWAY_HOSTS": ",".join(st.gateway_hosts),
               "MESH_GATEWAY_BIND": st.gateway_bind,
               "MESH_NODE": "gateway",
               "MESH_IDENTITY": self.pki.gateway_identity,
               "MESH_CA_BUNDLE": self.pki.ca.bundle_pem.decode("ascii"), **st.limits}
        mounts = []
        # Host paths (the Docker daemon resolves bind mounts on the host), mounted read-only as is.
        for name, path in (("MESH_GATEWAY_CERT", st.gateway_cert), ("MESH_GATEWAY_KEY", st.gateway_key),
                           ("MESH_JWKS_FILE", st.jwks_file)):
            if path:
                env[name] = path
                mounts.append(f"{path}:{path}:ro")
        if st.jwks_url:
            env["MESH_JWKS_URL"] = st.jwks_url
        log.info("gateway_create", port=st.gateway_port, https_port=st.gateway_https_port)
        token = self.pki.issue_token("gateway", "gateway", "")
        try:
            cid = await asyncio.get_running_loop().run_in_executor(
                None, lambda: self.docker.create_gateway(env, volumes=mounts, token=token))
            self.pki.set_node_container("gateway", cid)
        except docker.errors.APIError as exc:
            log.warning("gateway_create_failed", error=str(exc))

    async def _apply_listeners(self, addresses: list[str]) -> None:
        """Serve the control channel on loopback and on each mesh bridge's gateway address."""
        wanted = set(addresses) | {"127.0.0.1"}
        for addr in set(self._control_sites) - wanted:
            await self._control_sites.pop(addr).stop()
            log.info("control_listener_closed", address=addr)
        self.problems.keep_only("control_listen", wanted)
        for addr in sorted(wanted - set(self._control_sites)):
            site = web.TCPSite(self._control_runner, addr, CONTROL_PORT, reuse_address=True,
                               ssl_context=self.pki.control_tls.front)
            if await self._step("control_listen", addr, site.start()):
                self._control_sites[addr] = site
                log.info("control_listening", address=addr, port=CONTROL_PORT)

    # ---- admin API -----------------------------------------------------------------------

    def status(self) -> dict:
        """The body of GET /v1/status."""
        view = self.view
        sidecars = []
        if view is not None:
            by_app = {sc.labels.get("mesh.sidecar.for"): sc for sc in view.sidecars}
            for app in view.apps:
                sc = by_app.get(app.id)
                node = self.hub.nodes.get(sc.name) if sc else None
                sidecars.append({"app": app.name, "sidecar": sc.name if sc else None,
                                 "state": ("running" if sc.running else "stopped") if sc else "missing",
                                 "connected": bool(node and node.connected),
                                 "acked_version": node.acked_version if node else None})
        nodes = self.hub.status()
        service_of = {}
        if view is not None:
            for wl in build_workloads(view.apps):
                if wl.spec is not None:
                    service_of[wl.container.id] = service_key(wl.spec.service, wl.spec.namespace, self.owners)
        for n in nodes:
            n["service"] = "gateway" if n["kind"] == "gateway" else service_of.get(n["container"])
        return {
            "meshd": {"version": __version__, "uptime_s": round(time.time() - self.started, 1),
                      "snapshot_version": self.hub.latest.version if self.hub.latest else None},
            "nodes": nodes,
            "label_errors": [{"container": e.container, "label": e.label, "message": e.message}
                             for e in self.label_errors],
            "mtls": {name: svc.mtls for name, svc in self.hub.latest.config.services.items()}
            if self.hub.latest else {},
            "sidecars": sidecars,
            "problems": self.problems.describe(),
        }

    async def unconnected_reasons(self, status: dict, grace_s: float = UNCONNECTED_GRACE_S) -> None:
        """Add to `status` why each running sidecar has not connected (its own last control error,
        read from its admin port), once it has run for `grace_s`: the sidecar knows, meshd does not."""
        view = self.view
        if view is None:
            return
        apps = {app.name: app for app in view.apps}
        started = {sc.name: sc.started_at for sc in view.sidecars}
        now = time.time()
        checks = []
        for entry in status["sidecars"]:
            app = apps.get(entry["app"])
            if entry["state"] != "running" or entry["connected"] or app is None:
                continue
            if now - docker_time(started.get(entry["sidecar"], "")) < grace_s:
                continue
            checks.append((entry, view.mesh_address(app)))

        async def ask(entry: dict, ip: str | None) -> None:
            entry["control_error"] = ("no address of its app on a mesh network" if ip is None
                                      else await read_control_error(ip))

        await asyncio.gather(*(ask(e, ip) for e, ip in checks[:MAX_REASON_QUERIES]))
        status["unconnected"] = [e["sidecar"] for e, _ in checks]

    def services(self) -> dict:
        """The body of GET /v1/services."""
        latest = self.hub.latest
        out = []
        health: dict[str, list[dict]] = {}
        if self.view is not None:
            for wl in build_workloads(self.view.apps):
                if wl.spec is not None and wl.container.running:
                    health.setdefault(service_key(wl.spec.service, wl.spec.namespace, self.owners), []).append(
                        {"container": wl.container.name, "version": wl.spec.version,
                         "health": wl.container.health or "none", "serving": wl.container.serving})
        if latest is not None:
            for name, svc in latest.config.services.items():
                eps = latest.config.endpoints.get(name, ())
                versions: dict[str, int] = {}
                for ep in eps:
                    versions[ep.version] = versions.get(ep.version, 0) + 1
                out.append({"name": name, "namespace": svc.namespace, "protocol": svc.protocol,
                            "port": svc.port, "identity": svc.identity, "aliases": list(svc.aliases),
                            "mtls": svc.mtls, "allow": list(svc.allow) if svc.allow is not None else None,
                            "versions": versions, "instances": health.get(name, []),
                            "endpoints": [{"instance": e.instance, "address": e.address, "port": e.port,
                                           "version": e.version} for e in eps]})
        return {"services": out}

    def _admin_app(self) -> web.Application:
        app = web.Application(middlewares=[admin_auth_middleware(self.admin_token)])

        async def status(_req):
            body = self.status()
            await self.unconnected_reasons(body)
            return web.json_response(body, dumps=dumps)

        async def services(_req):
            return web.json_response(self.services(), dumps=dumps)

        async def snapshot(_req):
            if self.hub.latest is None:
                return web.json_response({"error": "no snapshot yet"}, status=503)
            return web.json_response(encode_snapshot(self.hub.latest), dumps=dumps)

        async def ack_latency(req):
            try:
                version = int(req.query.get("version", self.hub.latest.version if self.hub.latest else 0))
            except ValueError:
                return web.json_response({"error": "query parameter version: not a number"}, status=400)
            return web.json_response({"version": version, "acks": self.hub.ack_latency(version)})

        app.router.add_get("/v1/status", status)
        app.router.add_get("/v1/services", services)
        app.router.add_get("/v1/snapshot", snapshot)
        app.router.add_get("/v1/acks", ack_latency)
        add_rules_routes(app, self.rules, self.versions_of, self.republish, self.resolve_service)
        add_telemetry_routes(app, self.telemetry, self.resolve_service)  # observability (also /dashboard)
        add_trace_routes(app, self.traces, self.telemetry_settings, self.republish)
        add_policy_routes(app, self.policies, self.republish, self.resolve_service)
        add_cert_routes(app, self.pki, self.hub)
        return app

    # ---- run -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until cancelled."""
        self._loop = asyncio.get_running_loop()
        control = web.Application(client_max_size=OTLP_MAX_BODY)
        control.router.add_get(CONTROL_PATH, self.hub.handle)
        add_receiver(control, self.traces, self.settings.trust_domain)  # spans from mesh members
        self._control_runner = web.AppRunner(control, access_log=None)
        await self._control_runner.setup()
        admin_runner = web.AppRunner(self._admin_app(), access_log=None)
        await admin_runner.setup()
        await web.TCPSite(admin_runner, self.settings.admin_host, ADMIN_PORT, reuse_address=True).start()
        self.pki.control_tls.ensure([])
        await self._apply_listeners([])
        self.telemetry.start()  # scraper; stopped by admin_runner.cleanup()
        threading.Thread(target=self._watch_events, name="docker-events", daemon=True).start()
        releaser = asyncio.ensure_future(self._release_holds())
        resumer = asyncio.ensure_future(self.pki.resume_root_rotation(self.hub))
        log.info("meshd_started", version=__version__, snapshot_version=self._version,
                 admin=f"{self.settings.admin_host}:{ADMIN_PORT}")
        self._dirty.set()
        loop = self._loop
        main = asyncio.current_task()
        # meshd is PID 1 in its container: without a handler SIGTERM would be ignored until
        # Docker's kill timeout. Sidecars and the gateway keep serving while meshd is away.
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, main.cancel)
        try:
            while True:
                try:
                    await asyncio.wait_for(self._dirty.wait(), timeout=RESYNC_S)
                except asyncio.TimeoutError:
                    pass
                await asyncio.sleep(DEBOUNCE_S)
                self._dirty.clear()
                try:
                    await self.rebuild()
                except Exception:
                    log.exception("rebuild_failed")
                    await asyncio.sleep(1.0)
                    self._dirty.set()
        except asyncio.CancelledError:
            log.info("meshd_stopping")
        finally:
            releaser.cancel()
            resumer.cancel()
            self._stop.set()
            await self.discovery.close()
            await self.hub.close_all()
            await admin_runner.cleanup()
            await self._control_runner.cleanup()
