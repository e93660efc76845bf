"""meshd's telemetry hub: scrape every node's /metrics, keep rolling windows, raise events, adapt policy.

Every SCRAPE_INTERVAL_S (2 s) meshd (host network namespace) GETs `/metrics` from each connected
sidecar at `<app container IP on a mesh network>:15020` and from the gateway at 127.0.0.1:15021,
at most CONCURRENCY at a time, each within SCRAPE_TIMEOUT_S, at most MAX_TARGETS targets and
MAX_BODY bytes each. The math is meshcore's (pure: promtext, flowstats, alarms, adaptive, canary);
this module is the I/O around it. A node whose text has not changed is not parsed again, and one
that stays unchanged (idle) is scraped every QUIET_EVERY ticks only (`scrape_due`).

The adaptive policy (meshcore.adaptive.decide_adaptive_policy) acts through meshd's normal path:
`on_adaptive_policy(service, overrides)` keeps `policy_overrides[service]`, persists it, and asks
meshd to republish; meshd's `_publish_config` lays the overrides over the typed fields of the
service's policy with `apply_overrides(config)` (never loosening them), so the change reaches every
sidecar as a new snapshot version, ACKed like any other.

Environment: MESH_TIGHTEN_ERROR_RATE (default 0.4; 0 or off disables the loop),
MESH_TIGHTEN_RECOVERY_S (default 60), MESH_TIGHTEN_MIN_REQUESTS (default 20).

Admin API (added by `add_routes`, on meshd's 127.0.0.1:15014): GET /v1/stat, /v1/compare, /v1/graph,
/v1/events, /v1/prometheus/targets, and the dashboard (meshd/dashboard.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import time
import zlib
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import aiohttp
import structlog
from aiohttp import web

from meshcore.adaptive import (
    AdaptiveConfig, AdaptiveState, OutlierOverrides, decide_adaptive_policy, decode_overrides, encode_overrides,
    tighten_policy,
)
from meshcore.alarms import AlarmState, LatencyConfig, SpikeConfig, detect_error_spike, detect_latency_jump
from meshcore.canary import compare_versions
from meshcore.durations import parse_duration
from meshcore.flowstats import (
    Stats, Window, by_edge, by_service, by_service_version, health_by_service, health_by_service_version,
    summarize,
)
from meshcore.promtext import Scrape, parse_scrape, scrape_delta
from meshcore.snapshot import MeshConfig, ServiceNameError, build_workloads, resolve_or_keep

from .events import EventLog
from .store import Store

log = structlog.get_logger("meshd.telemetry")
# The control loop acts on a service failing at least this share of requests (the worse of its
# callers' and its own view). Below it retries absorb most failures (3 retries at 30% give 99.2%),
# and a tighter ejection would make a mostly working service unavailable.
DEFAULT_TIGHTEN_ERROR_RATE = 0.4

SIDECAR_METRICS_PORT = 15020
GATEWAY_METRICS_ADDRESS = "127.0.0.1:15021"
SCRAPE_INTERVAL_S = 2.0
SCRAPE_TIMEOUT_S = 1.5
CONCURRENCY = 16
MAX_TARGETS = 512
MAX_BODY = 4 * 1024 * 1024
HORIZON_S = 300.0            # the longest window any query may ask for
DEFAULT_WINDOW_S = 60.0      # /v1/stat, /v1/compare, /v1/graph default
DETECT_WINDOW_S = 10.0       # anomaly detection and the adaptive loop look at the last 10 s
EJECTION_COOLDOWN_S = 10.0   # at most one ejection event per (service, version) per this
MAX_ALARMS = 2000
# A node whose text has not changed for QUIET_AFTER scrapes in a row (idle) is scraped on every
# QUIET_EVERY-th tick only, in a slot of its own: at 100 idle sidecars that is a third of the
# scrapes, and a node's first requests after a quiet spell are seen at most 6 s late.
QUIET_AFTER, QUIET_EVERY = 5, 3
OVERRIDES_KEY = "telemetry.adaptive_overrides"


def scrape_due(quiet: int, tick: int, slot: int, quiet_after: int = QUIET_AFTER,
               quiet_every: int = QUIET_EVERY) -> bool:
    """Whether to scrape a node on this tick: always while it changes, else on its slot of every
    `quiet_every` ticks once it has been unchanged `quiet_after` times in a row."""
    return quiet < quiet_after or (tick + slot) % quiet_every == 0


@dataclass(frozen=True)
class Target:
    """One node to scrape."""

    address: str        # host:port
    node: str
    kind: str           # "sidecar" | "gateway"
    service: str
    version: str
    namespace: str

    @property
    def url(self) -> str:
        return f"http://{self.address}/metrics"


def meshd_targets(view, nodes: list[dict], gateway_address: str = GATEWAY_METRICS_ADDRESS,
                  max_targets: int = MAX_TARGETS) -> list[Target]:
    """The scrape targets from meshd's Docker view and the hub's nodes: connected ones only.

    A sidecar is reached at its app container's IPv4 on a mesh network (one meshd has a bridge
    gateway on: meshd is in the host namespace, so that address routes), else on any of its networks.
    """
    out: list[Target] = []
    if view is not None:
        specs = {wl.container.id: wl.spec for wl in build_workloads(view.apps) if wl.spec is not None}
        apps = {app.id: app for app in view.apps}
        mesh_networks = sorted(getattr(view, "network_gateways", {}) or {})
        for node in nodes:
            if node.get("kind") != "sidecar" or not node.get("connected"):
                continue
            app = apps.get(node.get("container") or "")
            if app is None or not app.running:
                continue
            ip = next((app.networks[n] for n in mesh_networks if app.networks.get(n)), None)
            ip = ip or next((v for _, v in sorted(app.networks.items()) if v), None)
            if not ip:
                continue
            spec = specs.get(app.id)
            out.append(Target(address=f"{ip}:{SIDECAR_METRICS_PORT}", node=str(node.get("node")), kind="sidecar",
                              service=spec.service if spec else "unknown", version=spec.version if spec else "unknown",
                              namespace=spec.namespace if spec else "default"))
    for node in nodes:
        if node.get("kind") == "gateway" and node.get("connected"):
            out.append(Target(address=gateway_address, node=str(node.get("node")), kind="gateway",
                              service="gateway", version="", namespace="mesh"))
            break
    out.sort(key=lambda t: (t.kind != "gateway", t.service, t.version, t.node))
    return out[:max_targets]


def apply_policy_overrides(config: MeshConfig, overrides: dict[str, OutlierOverrides]) -> MeshConfig:
    """`config` with each service's adaptive overrides laid over its typed policy (pure)."""
    if not overrides:
        return config
    services = dict(config.services)
    changed = False
    for name, ov in overrides.items():
        svc = services.get(name)
        if svc is None:
            continue
        merged = tighten_policy(svc.policy, ov)
        if merged is not svc.policy:
            services[name] = dataclasses.replace(svc, policy=merged)
            changed = True
    return dataclasses.replace(config, services=services) if changed else config


def _env_float(env: dict, name: str, default: float) -> float | None:
    raw = (env.get(name) or "").strip().lower()
    if not raw:
        return default
    if raw in ("off", "false", "no", "none"):
        return None
    try:
        return float(raw)
    except ValueError:
        log.warning("bad_setting", name=name, value=raw, using=default)
        return default


def adaptive_config_from_env(env: dict | None = None) -> AdaptiveConfig | None:
    """The control loop's settings; None when MESH_TIGHTEN_ERROR_RATE is 0 or off."""
    env = os.environ if env is None else env
    rate = _env_float(env, "MESH_TIGHTEN_ERROR_RATE", DEFAULT_TIGHTEN_ERROR_RATE)
    if rate is None or rate <= 0:
        return None
    recovery = _env_float(env, "MESH_TIGHTEN_RECOVERY_S", 60.0) or 60.0
    minimum = _env_float(env, "MESH_TIGHTEN_MIN_REQUESTS", 20) or 20
    return AdaptiveConfig(threshold=min(rate, 1.0), min_requests=int(minimum), recovery_s=recovery)


@dataclass
class TargetHealth:
    up: bool = False
    error: str | None = None
    last_ok: float | None = None     # wall clock
    duration_ms: float | None = None


class TelemetryHub:
    """Scrapes, windows, alarms, events and the adaptive policy; everything meshd's admin API shows."""

    def __init__(self, store: Store | None, targets: Callable[[], list[Target]],
                 republish: Callable[[], Awaitable[Any]] | None = None,
                 nodes: Callable[[], list[dict]] | None = None, *,
                 adaptive: AdaptiveConfig | None = AdaptiveConfig(),
                 interval_s: float = SCRAPE_INTERVAL_S, timeout_s: float = SCRAPE_TIMEOUT_S,
                 concurrency: int = CONCURRENCY, max_targets: int = MAX_TARGETS,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 spike: SpikeConfig = SpikeConfig(), latency: LatencyConfig = LatencyConfig()):
        self.store = store
        self.targets = targets
        self.republish = republish
        self.nodes = nodes
        self.adaptive = adaptive
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.concurrency = concurrency
        self.max_targets = max_targets
        self.clock = clock
        self.wall = wall
        self.spike_cfg = spike
        self.latency_cfg = latency
        self.window = Window(horizon_s=HORIZON_S, resolution_s=interval_s)
        self.events = EventLog(store, clock=wall)
        self.health: dict[str, TargetHealth] = {}
        self.last_targets: list[Target] = []
        self.last_scrape: float | None = None     # wall clock
        self._prev: dict[str, tuple[float, Scrape]] = {}
        self._prev_digest: dict[str, bytes] = {}   # of each node's last text: unchanged ones are not parsed
        self._quiet: dict[str, int] = {}           # scrapes in a row with the same text, per node
        self._tick = 0
        # Wall clock when this meshd began: nodes started since then counted nothing from before it.
        self.watched_since: float | None = wall()
        self._births: set[tuple[str, float]] = set()   # (address, node start time) already counted
        self._spikes: dict[tuple, AlarmState] = {}
        self._latency: dict[tuple, AlarmState] = {}
        self._adaptive: dict[str, AdaptiveState] = {}
        self.adaptive_reasons: dict[str, str] = {}
        self._ejection_at: dict[tuple, float] = {}
        self._nacks: dict[str, tuple] = {}
        self._certs: dict[tuple, float] = {}
        self._task: asyncio.Task | None = None
        self._republish_task: asyncio.Task | None = None
        self._republish_again = False
        self._session: aiohttp.ClientSession | None = None
        # service -> overrides laid over its policy by meshd's snapshot build (apply_overrides)
        self.policy_overrides: dict[str, OutlierOverrides] = {}
        saved = (store.get(OVERRIDES_KEY, {}) if store is not None else {}) or {}
        for service, raw in saved.items():
            ov = decode_overrides(raw)
            if ov is None:
                log.warning("adaptive_overrides_dropped", service=service)  # e.g. an older meshd's labels
                continue
            self.policy_overrides[service] = ov
            # Still tight after a restart: the loop goes on from there and relaxes when it is time.
            self._adaptive[service] = AdaptiveState(mode="tight", changed_at=clock())

    @classmethod
    def for_meshd(cls, meshd) -> "TelemetryHub":
        """Wired to a Meshd: its Docker view and hub for targets and NACKs, its republish, its store."""
        return cls(meshd.store, targets=lambda: meshd_targets(meshd.view, meshd.hub.status()),
                   republish=meshd.republish, nodes=meshd.hub.status, adaptive=adaptive_config_from_env())

    # ---- meshd's snapshot build ------------------------------------------------------------

    def apply_overrides(self, config: MeshConfig) -> MeshConfig:
        """`config` with the adaptive policy overrides merged (meshd's `_publish_config` calls this)."""
        return apply_policy_overrides(config, self.policy_overrides)

    def on_adaptive_policy(self, service: str, overrides: OutlierOverrides | None) -> None:
        """Set (or with None, clear) a service's policy overrides and have meshd republish."""
        if overrides is not None:
            self.policy_overrides[service] = overrides
        elif self.policy_overrides.pop(service, None) is None:
            return
        if self.store is not None:
            self.store.put(OVERRIDES_KEY, {s: encode_overrides(ov) for s, ov in self.policy_overrides.items()})
        self._schedule_republish()

    def _schedule_republish(self) -> None:
        if self.republish is None:
            return
        if self._republish_task is not None and not self._republish_task.done():
            self._republish_again = True
            return
        try:
            self._republish_task = asyncio.get_running_loop().create_task(self._republish())
        except RuntimeError:
            pass  # no loop (a pure test): meshd's next rebuild carries the overrides anyway

    async def _republish(self) -> None:
        while True:
            self._republish_again = False
            try:
                version = await self.republish()
                log.info("adaptive_policy_published", version=version)
            except Exception:  # noqa: BLE001 - the next rebuild (30 s resync at worst) carries it
                log.exception("adaptive_policy_publish_failed")
            if not self._republish_again:
                return

    # ---- hooks -----------------------------------------------------------------------------

    def on_cert_near_expiry(self, subject: str, not_after: float, now: float | None = None) -> None:
        """Record that `subject`'s certificate expires at `not_after` (wall clock); once per cert."""
        key = (subject, round(not_after))
        if key in self._certs:
            return
        if len(self._certs) >= 1000:
            self._certs.pop(next(iter(self._certs)))
        self._certs[key] = not_after
        left = not_after - (self.wall() if now is None else now)
        self.events.add("cert_near_expiry", f"certificate of {subject} expires in {max(left, 0) / 3600:.1f} h",
                        subject=subject, not_after=not_after)

    # ---- the loop --------------------------------------------------------------------------

    def start(self) -> asyncio.Task:
        """Start the scrape loop on the running loop (idempotent)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self.run())
        return self._task

    async def stop(self) -> None:
        """Stop the scrape loop and close the HTTP session."""
        for task in (self._task, self._republish_task):
            if task is not None and not task.done():
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, Exception):  # noqa: BLE001
                    pass
        self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def run(self) -> None:
        """Scrape every `interval_s` until cancelled."""
        while True:
            started = self.clock()
            try:
                await self.scrape_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - one bad tick must not stop telemetry
                log.exception("telemetry_tick_failed")
            await asyncio.sleep(max(0.05, self.interval_s - (self.clock() - started)))

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout_s, connect=min(0.5, self.timeout_s)),
                connector=aiohttp.TCPConnector(limit=self.concurrency, force_close=True),
                headers={"Accept": "text/plain;version=0.0.4"}, trust_env=False)
        return self._session

    async def _fetch(self, target: Target, sem: asyncio.Semaphore) -> tuple[Target, str | None, str | None, float]:
        async with sem:
            start = time.perf_counter()
            try:
                async with self._client().get(target.url, allow_redirects=False) as resp:
                    if resp.status != 200:
                        return target, None, f"HTTP {resp.status}", 0.0
                    chunks, size = [], 0
                    async for chunk in resp.content.iter_chunked(64 * 1024):
                        size += len(chunk)
                        if size > MAX_BODY:
                            return target, None, f"body over {MAX_BODY} bytes", 0.0
                        chunks.append(chunk)
                return target, b"".join(chunks).decode("utf-8", "replace"), None, (time.perf_counter() - start) * 1000
            except asyncio.TimeoutError:
                return target, None, f"timeout after {self.timeout_s:g} s", 0.0
            except (aiohttp.ClientError, OSError) as exc:
                return target, None, str(exc) or type(exc).__name__, 0.0

    async def scrape_once(self) -> None:
        """One tick: scrape all targets, feed the window, run detection and the control loop."""
        try:
            targets = list(self.targets())[: self.max_targets]
        except Exception:  # noqa: BLE001
            log.exception("telemetry_targets_failed")
            targets = []
        self.last_targets = targets
        self._tick += 1
        due = [t for t in targets if scrape_due(self._quiet.get(t.address, 0), self._tick,
                                                zlib.crc32(t.address.encode()))]
        sem = asyncio.Semaphore(self.concurrency)
        results = await asyncio.gather(*(self._fetch(t, sem) for t in due)) if due else []
        now, wall = self.clock(), self.wall()
        ejections: dict[tuple[str, str], float] = {}
        egress: dict[tuple[str, str], float] = {}
        for target, text, error, ms in results:
            health = self.health.setdefault(target.address, TargetHealth())
            if text is None:
                health.up, health.error = False, error
                continue
            health.up, health.error, health.last_ok, health.duration_ms = True, None, wall, round(ms, 1)
            delta = self.ingest(target.address, text, now)
            for key, n in delta.ejections.items():
                ejections[key] = ejections.get(key, 0.0) + n
            for key, n in delta.egress_blocked.items():   # egress control (sidecar.egress)
                egress[key] = egress.get(key, 0.0) + n
        live = {t.address for t in targets}
        for gone in [a for a in self._prev if a not in live]:
            self._prev.pop(gone, None)
            self._prev_digest.pop(gone, None)
            self._quiet.pop(gone, None)
        for gone in [a for a in self.health if a not in live]:
            self.health.pop(gone, None)
        self.last_scrape = wall
        self._ejection_events(ejections, now)
        self._egress_events(egress, now)
        self._nack_events()
        self.evaluate(now)

    def ingest(self, address: str, text: str, now: float) -> Scrape:
        """Feed one node's exposition text scraped at `now`; returns the increase since its last one."""
        prev = self._prev.get(address)
        digest = hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=16).digest()
        if prev is not None and self._prev_digest.get(address) == digest:
            # Nothing changed on the node (an idle one): no parse, nothing happened since.
            self._prev[address] = (now, prev[1])
            self._quiet[address] = self._quiet.get(address, 0) + 1
            return Scrape()
        self._prev_digest[address] = digest
        self._quiet[address] = 0
        cur = parse_scrape(text)
        # A node first seen since it started (not one coming back after its target dropped out)
        # is counted whole when it started after this meshd did: its first requests, served before
        # meshd's first scrape of it, are this run's, not an old total to take as a baseline.
        born = (address, cur.started) if cur.started is not None else None
        since = self.watched_since if prev is None and born not in self._births else None
        delta = scrape_delta(prev[1] if prev else None, cur, watched_since=since)
        if born is not None:
            if len(self._births) >= 4 * self.max_targets:
                self._births.clear()
            self._births.add(born)
        self._prev[address] = (now, cur)
        if not delta.empty():
            self.window.add(now, delta, since=prev[0] if prev else now)
        return delta

    # ---- detection -------------------------------------------------------------------------

    def evaluate(self, now: float) -> None:
        """Alarms per (service, version), the adaptive loop per service; events on every edge."""
        flows = self.window.select(now, DETECT_WINDOW_S)
        span = self.window.span(now, DETECT_WINDOW_S)
        per_version = {k: summarize(a, span) for k, a in health_by_service_version(flows).items()
                       if k[0] != "unknown"}
        for key in set(per_version) | {k for k, s in self._spikes.items() if s.active} \
                | {k for k, s in self._latency.items() if s.active or k in per_version}:
            stats = per_version.get(key) or Stats(span_s=span)
            what = f"{key[0]} {key[1]}"
            state, alarm = detect_error_spike(self._spikes.get(key, AlarmState()), stats, now, what, self.spike_cfg)
            self._spikes[key] = state
            if alarm:
                self.events.add(alarm.kind, alarm.message, key[0], key[1], value=alarm.value)
                log.warning("telemetry_alarm", kind=alarm.kind, message=alarm.message)
            state, alarm = detect_latency_jump(self._latency.get(key, AlarmState()), stats, now, what,
                                               self.latency_cfg)
            self._latency[key] = state
            if alarm:
                self.events.add(alarm.kind, alarm.message, key[0], key[1], value=alarm.value)
                log.warning("telemetry_alarm", kind=alarm.kind, message=alarm.message)
        for states in (self._spikes, self._latency):
            if len(states) > MAX_ALARMS:
                for k in [k for k, s in states.items() if not s.active and k not in per_version]:
                    states.pop(k, None)
        if self.adaptive is None:
            return
        per_service = {k[0]: summarize(a, span) for k, a in health_by_service(flows).items()
                       if k[0] not in ("unknown", "")}
        for service in set(per_service) | {s for s, st in self._adaptive.items() if st.mode == "tight"}:
            stats = per_service.get(service) or Stats(span_s=span)
            state, action, reason = decide_adaptive_policy(self._adaptive.get(service, AdaptiveState()), stats, now,
                                                           self.adaptive)
            self._adaptive[service] = state
            self.adaptive_reasons[service] = reason
            if action is not None:
                self.on_adaptive_policy(service, action.overrides)
                kind = "adaptive_tighten" if action.kind == "tighten" else "adaptive_relax"
                overrides = encode_overrides(action.overrides) if action.overrides is not None else None
                self.events.add(kind, f"{service}: {reason}", service, None, overrides=overrides,
                                error_rate=stats.error_rate, requests=int(stats.requests))
                log.warning("adaptive_policy", service=service, action=action.kind, reason=reason)
        if len(self._adaptive) > MAX_ALARMS:
            for s in [s for s, st in self._adaptive.items() if st.mode != "tight" and s not in per_service]:
                self._adaptive.pop(s, None)
                self.adaptive_reasons.pop(s, None)

    def _ejection_events(self, ejections: dict[tuple[str, str], float], now: float) -> None:
        for (service, version), n in ejections.items():
            key = (service, version)
            if now - self._ejection_at.get(key, -1e18) < EJECTION_COOLDOWN_S:
                continue
            self._ejection_at[key] = now
            what = f"{service} {version}".strip()
            self.events.add("ejection", f"{what}: {int(n)} endpoint ejection{'s' if n != 1 else ''} by outlier "
                            "detection", service, version or None, count=n)
        if len(self._ejection_at) > MAX_ALARMS:
            self._ejection_at.clear()

    def _egress_events(self, blocked: dict[tuple[str, str], float], now: float) -> None:
        """`egress_blocked`: calls a sidecar's registry-only egress control refused since the last scrape."""
        for (service, destination), n in blocked.items():
            key = ("egress", service, destination)
            if now - self._ejection_at.get(key, -1e18) < EJECTION_COOLDOWN_S:
                continue
            self._ejection_at[key] = now
            self.events.add("egress_blocked", f"{service}: {int(n)} call{'s' if n != 1 else ''} to {destination} "
                            "blocked (registry-only egress; list it in the service's mesh.egress)", service, None,
                            destination=destination, count=n)

    def _nack_events(self) -> None:
        if self.nodes is None:
            return
        try:
            nodes = self.nodes()
        except Exception:  # noqa: BLE001
            return
        seen = set()
        service_of = {t.node: t.service for t in self.last_targets}
        for node in nodes:
            name = str(node.get("node"))
            seen.add(name)
            mark = (node.get("nacked_version"), node.get("nack_reason"))
            old = self._nacks.get(name)
            self._nacks[name] = mark
            if mark[0] is not None and mark != old:
                self.events.add("nack", f"{name} refused snapshot version {mark[0]}: {mark[1]}",
                                node.get("service") or service_of.get(name), None, node=name,
                                version_refused=mark[0])
        for gone in [n for n in self._nacks if n not in seen]:
            self._nacks.pop(gone, None)

    # ---- queries (the admin API bodies) -----------------------------------------------------

    def _targets_summary(self) -> dict:
        up = sum(1 for t in self.last_targets if self.health.get(t.address, TargetHealth()).up)
        return {"total": len(self.last_targets), "up": up,
                "down": [{"address": t.address, "node": t.node, "error": self.health[t.address].error}
                         for t in self.last_targets
                         if t.address in self.health and not self.health[t.address].up][:50]}

    def _known_services(self) -> dict[str, set[str]]:
        known: dict[str, set[str]] = {}
        for t in self.last_targets:
            if t.kind == "sidecar":
                known.setdefault(t.service, set()).add(t.version)
        return known

    def stat(self, window_s: float = DEFAULT_WINDOW_S, now: float | None = None) -> dict:
        """GET /v1/stat: RED figures per service and version, per service, per edge."""
        now = self.clock() if now is None else now
        flows = self.window.select(now, window_s)
        span = self.window.span(now, window_s)
        per_version = {k: summarize(a, span) for k, a in by_service_version(flows).items()}
        for service, versions in self._known_services().items():
            for v in versions:
                per_version.setdefault((service, v), Stats(span_s=span))
        per_service = {k[0]: summarize(a, span) for k, a in by_service(flows).items()}
        for service, _ in per_version:
            per_service.setdefault(service, Stats(span_s=span))
        edges = {k: summarize(a, span) for k, a in by_edge(flows).items()}
        return {
            "window_s": window_s,
            "scraped_at": self.last_scrape,
            "targets": self._targets_summary(),
            "services": [{"service": s, "version": v, **st.to_dict()} for (s, v), st in sorted(per_version.items())],
            "totals": [{"service": s, **st.to_dict(),
                        "adaptive": self._adaptive_view(s)} for s, st in sorted(per_service.items())],
            "edges": [{"source": a, "destination": b, **st.to_dict()} for (a, b), st in sorted(edges.items())],
        }

    def _adaptive_view(self, service: str) -> dict | None:
        state = self._adaptive.get(service)
        if state is None and service not in self.policy_overrides:
            return None
        ov = self.policy_overrides.get(service)
        return {"mode": state.mode if state else "tight", "overrides": encode_overrides(ov) if ov else None,
                "reason": self.adaptive_reasons.get(service)}

    def compare(self, service: str, a: str, b: str, window_s: float = DEFAULT_WINDOW_S,
                now: float | None = None) -> dict:
        """GET /v1/compare: two versions of a service side by side, and the verdict."""
        now = self.clock() if now is None else now
        flows = self.window.select(now, window_s)
        span = self.window.span(now, window_s)
        groups = by_service_version(flows)
        sa, sb = summarize(groups.get((service, a)), span), summarize(groups.get((service, b)), span)
        verdict = compare_versions(sa, sb, a, b)
        return {"service": service, "window_s": window_s,
                "a": {"version": a, **sa.to_dict()}, "b": {"version": b, **sb.to_dict()},
                "verdict": verdict.text, "significant": verdict.significant, "findings": list(verdict.findings)}

    def graph(self, window_s: float = DEFAULT_WINDOW_S, now: float | None = None) -> dict:
        """GET /v1/graph: services and callers as nodes, calls as edges, with rates and error rates."""
        now = self.clock() if now is None else now
        flows = self.window.select(now, window_s)
        span = self.window.span(now, window_s)
        per_version = {k: summarize(a, span) for k, a in by_service_version(flows).items()}
        per_service = {k[0]: summarize(a, span) for k, a in by_service(flows).items()}
        edges = {k: summarize(a, span) for k, a in by_edge(flows).items()}
        known = self._known_services()
        names = set(known) | set(per_service) | {s for s, _ in edges} | {d for _, d in edges}
        nodes = []
        for name in sorted(names):
            kind = "gateway" if name == "gateway" else ("service" if name in known or name in per_service
                                                          else "external")
            if name == "unknown":
                kind = "external"
            st = per_service.get(name) or Stats(span_s=span)
            versions = sorted(set(known.get(name, ())) | {v for (s, v) in per_version if s == name})
            nodes.append({"id": name, "kind": kind, **st.to_dict(),
                          "versions": [{"version": v, **(per_version.get((name, v)) or Stats(span_s=span)).to_dict()}
                                       for v in versions],
                          "adaptive": self._adaptive_view(name)})
        return {"window_s": window_s, "nodes": nodes,
                "edges": [{"source": a, "destination": b, **st.to_dict()} for (a, b), st in sorted(edges.items())]}

    def prometheus_targets(self) -> list[dict]:
        """GET /v1/prometheus/targets: Prometheus HTTP service discovery (http_sd) groups."""
        try:
            targets = list(self.targets())[: self.max_targets]
        except Exception:  # noqa: BLE001
            targets = self.last_targets
        return [{"targets": [t.address],
                 "labels": {"service": t.service, "version": t.version, "namespace": t.namespace, "node": t.node,
                            "kind": t.kind, "job": "meshd-gateway" if t.kind == "gateway" else "meshd-sidecars"}}
                for t in targets]


# ---- admin API --------------------------------------------------------------------------------

def _window_param(req: web.Request) -> float:
    raw = req.query.get("window", "")
    if not raw:
        return DEFAULT_WINDOW_S
    try:
        value = float(raw)
    except ValueError:
        try:
            value = parse_duration(raw)
        except ValueError:
            raise ValueError(f"query parameter window: {raw!r} is not seconds (like 60) or a duration (like 5m)")
    if not 1 <= value <= HORIZON_S:
        raise ValueError(f"query parameter window: {raw} is outside 1..{HORIZON_S:.0f} seconds")
    return value


def parse_since(raw: str, now: float) -> float:
    """`since` of /v1/events: epoch seconds (`1700000000.5`) or a duration back from now (`10m`)."""
    try:
        return float(raw)
    except ValueError:
        pass
    try:
        return now - parse_duration(raw)
    except ValueError:
        raise ValueError(f"query parameter since: {raw!r} is not epoch seconds or a duration like 10m") from None


def add_routes(app: web.Application, hub: TelemetryHub, resolve: Callable[[str], str] = str) -> None:
    """Telemetry endpoints and the dashboard on meshd's admin app; stops the scraper with the app.
    `resolve(name)` gives the snapshot key, the series' service label, that a user's name means
    (`web`, `web.shop`), or raises ServiceNameError."""
    from .dashboard import add_routes as add_dashboard_routes

    def bad(message: str) -> web.Response:
        return web.json_response({"error": message}, status=400)

    def windowed(answer):
        """A GET handler answering `answer(req, window)`, or 400 naming a bad ?window."""
        async def handler(req: web.Request) -> web.Response:
            try:
                window = _window_param(req)
            except ValueError as exc:
                return bad(str(exc))
            return answer(req, window)
        return handler

    def compare_versions(req: web.Request, window: float) -> web.Response:
        service, a, b = req.query.get("service"), req.query.get("a"), req.query.get("b")
        if not service or not a or not b:
            return bad("query parameters service, a and b are required (e.g. ?service=catalog&a=v1&b=v2)")
        try:
            service = resolve_or_keep(resolve, service)   # a name of no service now: its past series
        except ServiceNameError as exc:   # ambiguous
            return bad(str(exc))
        return web.json_response(hub.compare(service, a, b, window))

    stat = windowed(lambda req, window: web.json_response(hub.stat(window)))
    compare = windowed(compare_versions)
    graph = windowed(lambda req, window: web.json_response(hub.graph(window)))

    async def events(req: web.Request) -> web.Response:
        since = after_id = None
        try:
            if req.query.get("since"):
                since = parse_since(req.query["since"], hub.wall())
            if req.query.get("after_id"):
                after_id = int(req.query["after_id"])
            limit = int(req.query.get("limit", "1000"))
        except ValueError as exc:
            return bad(str(exc))
        return web.json_response({"now": round(hub.wall(), 3),
                                  "events": hub.events.since(since, after_id, max(0, min(limit, 1000)))})

    async def prometheus_targets(_req: web.Request) -> web.Response:
        return web.json_response(hub.prometheus_targets())

    async def stop(_app: web.Application) -> None:
        await hub.stop()

    app.router.add_get("/v1/stat", stat)
    app.router.add_get("/v1/compare", compare)
    app.router.add_get("/v1/graph", graph)
    app.router.add_get("/v1/events", events)
    app.router.add_get("/v1/prometheus/targets", prometheus_targets)
    app.on_cleanup.append(stop)
    add_dashboard_routes(app)
