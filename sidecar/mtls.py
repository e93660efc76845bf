"""The inbound's zero-trust side: the mTLS listener (strict or permissive) and authorization.

`start_mesh_inbound` accepts on 15006 and looks at the first byte of each connection without reading
it (MSG_PEEK): 0x16 is a TLS handshake record, served with the node's mTLS context (client
certificate required, TLS 1.3 only); anything else is plaintext, served only when the service's
snapshot says `mtls: permissive` (a migration aid, like Istio's PERMISSIVE PeerAuthentication), and
closed otherwise (STRICT, the default). The mode is read per connection, so a label change applies
without restarting the listener.

`Authorizer` holds the snapshot's policies and the service's `mesh.allow`, and decides per request
(`meshcore.authz.decide`) on the caller's verified identity.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any, Callable

import structlog

from meshcore.authz import DEFAULT_POLICY, Decision, Policy, decide, source_name
from meshcore.snapshot import Snapshot, qualified_index

from .proxy import (
    ProxyState, _Downstream, _Listener, _TcpDownstream, build_inbound_stack, server_ssl_context,
)
from .routing import local_cluster

log = structlog.get_logger("sidecar.mtls")

TLS_HANDSHAKE = 0x16
FIRST_BYTE_TIMEOUT_S = 30.0
HANDSHAKE_TIMEOUT_S = 10.0


MEMO_MAX = 4096  # remembered decisions per inbound (distinct caller, method, target)


class Authorizer:
    """The authorization decision of one inbound (`ProxyState.authz`), on the caller's verified
    SPIFFE ID: policies name services by snapshot key (`web`, or `web.shop` for a name several
    projects use), so the ID is mapped to its service's key."""

    def __init__(self, service: str, namespace: str | None = None):
        self.home = (service, namespace)
        self.service = service          # this node's snapshot key, the rules' destination
        self.policy: Policy = DEFAULT_POLICY
        self.allow: tuple[str, ...] | None = None
        self.mtls = "strict"
        self.denied = 0
        self.callers: dict[str, str] = {}   # verified SPIFFE ID -> snapshot key of its service
        # decide() is a pure function of the policy and the request's (source, method, path): its
        # answers are kept until the next snapshot, a bounded number of them.
        self._memo: dict[tuple, Decision] = {}
        # the keys of _memo whose decision allows: the data path tests membership in C and calls
        # check_request only for the others (a Python call per request saved)
        self.allowed: set[tuple] = set()

    def update(self, snapshot: Snapshot) -> None:
        cfg = snapshot.config
        self.policy = cfg.policies
        own = qualified_index(cfg.services).get(self.home) if self.home[1] else None
        self.service = own or self.home[0]
        svc = cfg.services.get(self.service)
        self.allow = svc.allow if svc is not None else None
        self.mtls = svc.mtls if svc is not None else "strict"
        self.callers = {s.identity: key for key, s in cfg.services.items()}
        self._memo = {}
        self.allowed = set()

    def caller(self, identity: str | None) -> str | None:
        """The name rules know a verified caller by: its service's key, `gateway`, else the service
        of its SPIFFE ID; None for an unauthenticated caller."""
        if identity is None:
            return None
        return self.callers.get(identity) or source_name(identity)

    def check(self, identity: str | None, method: str, path: str) -> Decision:
        decision = decide(self.policy, self.caller(identity), self.service, method, path, self.allow)
        if not decision.allowed:
            self.denied += 1
        return decision

    def check_request(self, identity: str | None, method: bytes, target: bytes) -> Decision:
        """check() for a request line's method and target (query ignored), memoized."""
        key = (identity, method, target)
        decision = self._memo.get(key)
        if decision is None:
            path = target.split(b"?", 1)[0].decode("latin-1")
            decision = decide(self.policy, self.caller(identity), self.service, method.decode("latin-1"), path,
                              self.allow)
            memo = self._memo
            if len(memo) >= MEMO_MAX:
                memo.clear()
                self.allowed.clear()
            memo[key] = decision
            if decision.allowed:
                self.allowed.add(key)
        if not decision.allowed:
            self.denied += 1
        return decision


class MeshInbound:
    """A listening socket whose connections are classified (TLS or plaintext) before serving."""

    def __init__(self, sock: socket.socket, factory: Callable[[], asyncio.Protocol], ssl_ctx,
                 mode_of: Callable[[], str], stats: Any = None):
        self.sock = sock
        self.sockets = [sock]
        self.factory = factory
        self.ssl_ctx = ssl_ctx
        self.mode_of = mode_of
        self.stats = stats
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._accept_loop())
        self._pending: set[asyncio.Task] = set()
        self._closed = False

    def is_serving(self) -> bool:
        return not self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._task.cancel()
        for task in list(self._pending):
            task.cancel()
        self.sock.close()

    async def wait_closed(self) -> None:
        return None

    async def _accept_loop(self) -> None:
        while True:
            try:
                conn, _addr = await self._loop.sock_accept(self.sock)
            except asyncio.CancelledError:
                raise
            except OSError as exc:
                if self._closed:
                    return
                log.warning("inbound_accept_failed", error=str(exc))
                await asyncio.sleep(0.05)
                continue
            task = self._loop.create_task(self._serve(conn))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _peek(self, conn: socket.socket) -> bytes:
        fut = self._loop.create_future()
        fd = conn.fileno()

        def ready() -> None:
            if fut.done():
                return
            try:
                data = conn.recv(1, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                fut.set_exception(exc)
                return
            fut.set_result(data)

        self._loop.add_reader(fd, ready)
        try:
            return await fut
        finally:
            self._loop.remove_reader(fd)

    async def _serve(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        try:
            first = await asyncio.wait_for(self._peek(conn), FIRST_BYTE_TIMEOUT_S)
        except (asyncio.TimeoutError, OSError):
            conn.close()
            return
        if not first:
            conn.close()
            return
        try:
            if first[0] == TLS_HANDSHAKE:
                await self._loop.connect_accepted_socket(self.factory, conn, ssl=self.ssl_ctx,
                                                         ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S)
            elif self.mode_of() == "permissive":
                await self._loop.connect_accepted_socket(self.factory, conn)
            else:
                if self.stats is not None:
                    self.stats.refused.labels("inbound", "plaintext").inc()
                conn.close()
        except asyncio.CancelledError:
            conn.close()
            raise
        except Exception as exc:  # noqa: BLE001 - a failed handshake (no/bad certificate, wrong CA)
            if self.stats is not None:
                self.stats.refused.labels("inbound", "handshake").inc()
            log.debug("inbound handshake failed: %r", exc)
            conn.close()


class _AuthorizedTcpDownstream(_TcpDownstream):
    """A `tcp` service's inbound connection: authorized once, on the verified caller (no method/path,
    so only rules without --path/--method apply), before any byte is forwarded."""

    __slots__ = ("denied",)

    def connection_made(self, transport) -> None:
        self.denied = False
        authz = self.state.authz
        identify = getattr(self.state.tls, "inbound_peer", None)
        if authz is not None and identify is not None:
            identity, service = identify(transport.get_extra_info("ssl_object"))
            decision = authz.check(identity, "", "")
            if not decision.allowed:
                log.info("tcp_connection_denied", source=service, reason=decision.reason)
                self.transport = transport
                self.denied = True
                transport.abort()
                return
        super().connection_made(transport)

    def connection_lost(self, exc) -> None:
        if self.denied:
            self.closed = True
            return  # refused before it was counted
        super().connection_lost(exc)


def _listen(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def start_mesh_inbound(state: ProxyState, host: str, port: int, *, app_port: int, protocol: str = "http",
                             app_host: str = "127.0.0.1", mode_of: Callable[[], str] | None = None) -> MeshInbound:
    """The inbound listener (15006) with mTLS from `state.tls` (required) and per-connection mode."""
    tls = state.tls
    if tls is None:
        raise ValueError("start_mesh_inbound needs ProxyState(tls=...)")
    ctx = server_ssl_context(tls)
    if mode_of is None:
        authz = state.authz
        mode_of = (lambda: authz.mtls) if authz is not None else (lambda: "strict")
    if protocol == "tcp":
        stack = build_inbound_stack(state, app_port, protocol="tcp", app_host=app_host)
        cluster = local_cluster(state.service, state.version, app_port, "tcp", app_host)

        def factory() -> asyncio.Protocol:
            return _AuthorizedTcpDownstream(state, stack, cluster)
    else:
        stack = build_inbound_stack(state, app_port, protocol=protocol, app_host=app_host)
        listener = _Listener(None, 0.3, state.limits)

        def factory() -> asyncio.Protocol:
            return _Downstream(state, stack, listener)
    return MeshInbound(_listen(host, port), factory, ctx, mode_of, getattr(tls, "stats", None))
