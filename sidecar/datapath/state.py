"""What every listener of one node shares (`ProxyState`): the route table, pools, traffic state,
telemetry, and the dead-peer detectors."""

from __future__ import annotations

import asyncio
from random import random as _uniform  # not `import random`: ProxyState.random would shadow it (Cython)
from typing import TYPE_CHECKING, Any, Callable

from meshcore.snapshot import Snapshot

from ..dns import VipAllocator
from ..egress import EgressControl   # egress control
from ..guard import DEFAULT_LIMITS   # limits (meshcore.limits)
from ..mirror import MirrorSender
from ..routing import EMPTY_TABLE, RouteTable, build_route_table
from ..telemetry import Telemetry
from ..tracing import Tracing
from ..traffic import TrafficRegistry
from .peers import (
    ACK_SLACK_MS, DEAD_PEER_S, UNDELIVERED_AFTER_S, PeerProbe, TcpInfo, TcpInfoReader, TlsProvider, open_upstream,
    probe_peer, read_tcp_info,
)
from .batch import WriteBatch
from .pools import UpstreamPools
from .speedups import monotonic
from .wire import CONNECT_TIMEOUT_S, EJECT_S, POOL_IDLE_TIMEOUT_S, POOL_MAX_IDLE, log

if TYPE_CHECKING:
    from .exchange import Exchange
    from .upstream import _Upstream


def _mesh_keys(table: RouteTable) -> set:
    return {key for cluster in table.clusters.values() for key in cluster.keys}


class ProxyState:
    """What every listener of one node shares; `table` may be replaced at any time (atomic swap).

    Dead peers. A peer whose network namespace vanished sends no FIN or RST; requests written to it
    get no answer. Two detectors, for mesh exchanges (those with traffic state) that have no
    response byte yet:
    - a snapshot removes the endpoint: every exchange in flight to it is checked once its request
      is `undelivered_after` old; every connection to it is closed when its exchange ends.
    - meshd is silent (no snapshot): a request written on a reused pooled connection is checked once
      it is `dead_peer_after` old (a sweep every quarter of that, only while such requests wait).
    The check reads TCP_INFO (`tcp_info`): data unacknowledged and no ACK at all since the request
    was written, that long, means the request never reached the peer's application: the connection
    is reset (RST, nothing retransmitted) and the request retried on another endpoint like a connect
    failure (`should_retry` with connect-failure, not sent: any method; budget and attempts
    counted). Otherwise the request was delivered (or TCP_INFO is unreadable): it is left to finish,
    and `probe` makes the kernel probe the peer (keepalive); a peer that stops answering probes ends
    the connection with ETIMEDOUT after ~3 s: 503 UC, or retried when the policy retries a reset of
    a sent request (idempotent with reset in mesh.retries.on, or non-idempotent allowed). A slow but
    alive app is never cut: its kernel acknowledges the request and answers the probes.
    """

    def __init__(self, service: str, version: str = "v1", *, table: RouteTable | None = None,
                 telemetry: Telemetry | None = None, tls: TlsProvider | None = None,
                 connect_timeout: float = CONNECT_TIMEOUT_S, pool_max_idle: int = POOL_MAX_IDLE,
                 pool_idle_timeout: float = POOL_IDLE_TIMEOUT_S, eject_seconds: float = EJECT_S,
                 rand: Callable[[], float] = _uniform, tcp_info: TcpInfoReader = read_tcp_info,
                 probe: PeerProbe = probe_peer, undelivered_after: float = UNDELIVERED_AFTER_S,
                 dead_peer_after: float = DEAD_PEER_S):
        self.service = service
        self.version = version
        self.namespace: str | None = None   # the node's project: bare names resolve there first
        self.table: RouteTable = table if table is not None else EMPTY_TABLE
        self.host_index: dict = {}          # route_by_host: host_index(host_index_of)
        self.host_index_of: RouteTable | None = None
        self.telemetry = telemetry if telemetry is not None else Telemetry()
        self.tls = tls
        self.authz = None   # sidecar.mtls.Authorizer: the inbound's authorization decision, or None
        self.connect_timeout = connect_timeout
        self.random = rand
        self.in_flight: dict[tuple[str, int], int] = {}   # endpoint key -> requests/connections in flight
        self.pools = UpstreamPools(pool_max_idle, pool_idle_timeout)
        self.writes = WriteBatch()   # the listeners' writes, held to the end of a busy turn (batch.py)
        self.connect_failures = 0
        self.eject_seconds = eject_seconds
        self.ejected: dict[tuple[str, int], float] = {}   # endpoint key -> monotonic time it returns
        self.traffic = TrafficRegistry()    # per destination service: policy, rules, breaker, outlier...
        self.lanes: dict = {}               # service name -> _Lane of its traffic state (the Traffic layer)
        self.vips = VipAllocator()          # service virtual IPs, answered by the DNS proxy (sidecar.dns)
        self.mirrors = MirrorSender(self._mirror_connect, self._mirror_result)
        self.tracing = Tracing(service, version, registry=self.telemetry.registry)  # spans, access logs
        self.tcp_info = tcp_info                  # dead peers (see the class docstring)
        self.probe = probe
        self.undelivered_after = undelivered_after
        self.dead_peer_after = dead_peer_after
        self.undelivered_total = 0                # requests found undelivered to a silent peer (retried)
        self.probed_total = 0                     # delivered requests whose peer the kernel was set to probe
        self._watched: set[_Upstream] = set()     # reused connections whose request waits for an answer
        self._watchdog: asyncio.TimerHandle | None = None
        self.inbound_limiter = None         # mesh.ratelimit of this node's own service (limit_inbound)
        self.egress = EgressControl(service, self.telemetry.registry)   # egress control (sidecar.egress)
        self.limits = DEFAULT_LIMITS        # meshcore.limits of the listeners started after it is set
        if table is not None:
            self.traffic.apply(table)
            self._sync_local()
        pools = self.pools
        self.telemetry.watch_pool(lambda: pools.count)
        writes = self.writes
        self.telemetry.watch_writes(lambda: (writes.turns, writes.writes))

    def apply_snapshot(self, snapshot: Snapshot) -> RouteTable:
        """Build the route table of a snapshot and swap it in; returns it."""
        table = build_route_table(snapshot, self.vips.assign(snapshot.config.services),
                                  (self.service, self.namespace) if self.namespace else None)
        self.tracing.configure(snapshot.config.telemetry)
        self.egress.update(snapshot.config)   # egress control (sidecar.egress)
        old, self.table = self.table, table
        self.traffic.apply(table)
        self._sync_local()
        pools = self.pools
        if pools.idle or pools.live:
            gone = _mesh_keys(old) - _mesh_keys(table)
            if gone:
                if pools.idle:
                    pools.drop(gone)
                if pools.live:
                    self._gone_in_flight(gone)
        if self.ejected:
            now = monotonic()
            self.ejected = {k: t for k, t in self.ejected.items() if t > now}
        return table

    # -- dead peers (see the class docstring)

    def _gone_in_flight(self, gone: set) -> None:
        """Connections to endpoints that left the mesh: closed once their exchange ends; the kernel
        probes the peer of each one in flight; those without a response byte are checked for an
        undelivered request once it is `undelivered_after` old."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        now = monotonic()
        for key in gone:
            conns = self.pools.live.get(key)
            if not conns:
                continue
            for up in list(conns):
                up.doomed = True
                ex = up.exchange
                if ex is None or up.closed:
                    continue  # idle: closed by drop, or when released
                if not up.probing:
                    up.probing = True
                    if self.probe(up.transport):
                        self.probed_total += 1
                if up.got_bytes or ex.traffic is None or loop is None:
                    continue
                sent = up.sent_at or up.connected_at
                loop.call_later(max(0.0, sent + self.undelivered_after - now), self._check_gone, up, ex)

    def _check_gone(self, up: _Upstream, ex: Exchange) -> None:
        if up.exchange is not ex or up.got_bytes or up.closed:
            return
        info = self.tcp_info(up.transport)
        if info is not None and self._silent(info, up, monotonic()):
            log.info("withdrawn endpoint %s:%s never acknowledged a request: retried elsewhere", *up.key)
            ex.down._undelivered(ex, up)

    def _silent(self, info: TcpInfo, up: _Upstream, now: float) -> bool:
        """Data unacknowledged, and no ACK at all since the request was written: the peer's kernel
        has not received the (whole) request, so its application has not read it."""
        if info.unacked == 0:
            return False
        age_ms = (now - (up.sent_at or up.connected_at)) * 1000.0
        return info.last_ack_recv_ms + ACK_SLACK_MS >= age_ms

    def watch(self, up: _Upstream) -> None:
        """A request was just written on a reused pooled connection (of a mesh exchange)."""
        up.sent_at = monotonic()
        self._watched.add(up)
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().call_later(self._watch_every(), self._watch_sweep)

    def _watch_every(self) -> float:
        return max(0.01, min(0.25, self.dead_peer_after / 4))

    def _watch_sweep(self) -> None:
        self._watchdog = None
        now = monotonic()
        limit = self.dead_peer_after
        watched = self._watched
        for up in list(watched):
            ex = up.exchange
            if ex is None or up.got_bytes or up.closed or not up.sent_at or up.doomed:
                watched.discard(up)  # answered, finished, lost, or its endpoint left (_gone_in_flight)
                continue
            if now - up.sent_at < limit:
                continue
            watched.discard(up)
            info = self.tcp_info(up.transport)
            if info is not None and self._silent(info, up, now):
                key = up.key
                log.warning("dead peer %s:%s: request unacknowledged for %.1f s, retried elsewhere",
                            key[0], key[1], now - up.sent_at)
                if self.eject_seconds > 0:
                    self.ejected[key] = now + self.eject_seconds  # skipped by the balancer meanwhile
                self.pools.drop({key})                             # its idle connections are dead too
                ex.down._undelivered(ex, up)
            else:
                # Delivered (a slow app), acknowledged in part, or unknown: let the kernel probe the peer.
                if not up.probing:
                    up.probing = True
                    if self.probe(up.transport):
                        self.probed_total += 1
        if watched:
            self._watchdog = asyncio.get_running_loop().call_later(self._watch_every(), self._watch_sweep)

    def connect_failed(self, key: tuple[str, int]) -> None:
        """Passive outlier detection: skip an endpoint that failed a connect for `eject_seconds`."""
        self.connect_failures += 1
        if self.eject_seconds > 0:
            self.ejected[key] = monotonic() + self.eject_seconds

    def connect_succeeded(self, key: tuple[str, int]) -> None:
        if self.ejected:
            self.ejected.pop(key, None)

    def _sync_local(self) -> None:
        tr = self.local_traffic()
        self.inbound_limiter = tr.limiter if tr is not None else None

    def local_traffic(self):
        """The traffic state of this node's own service (its inbound policy), or None."""
        cluster = self.table.clusters.get(self.table.own or self.service)
        return self.traffic.of(cluster) if cluster is not None else None

    def _mirror_connect(self, key: tuple[str, int], factory: Callable, tag: tuple) -> Any:
        return open_upstream(self, tag[0], tag[1], key, factory)

    def _mirror_result(self, tag: tuple, status: int) -> None:
        cluster, index, source = tag
        self.telemetry.record_mirror(source, cluster.name, cluster.endpoints[index].version, status)

    def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self._watched.clear()
        self.pools.close()
        self.mirrors.close()
        self.tracing.close()

