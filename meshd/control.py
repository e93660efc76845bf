"""The control channel server: versioned snapshot push over websockets, ACK/NACK bookkeeping."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import structlog
from aiohttp import WSMsgType, web

from meshcore.protocol import (
    CLOSE_BAD_HELLO, CLOSE_FORBIDDEN, Ack, BundleAck, CsrRequest, Hello, Message, Nack, ProtocolError,
    SnapshotPush, decode_message, encode_message,
)
from meshcore.snapshot import Snapshot, encode_snapshot

log = structlog.get_logger("meshd.control")

HELLO_TIMEOUT_S = 10.0
HEARTBEAT_S = 10.0  # websocket ping interval; a dead peer is noticed within two of these
REPLY_TIMEOUT_S = 30.0  # a node that answers no snapshot for this long gets the latest one anyway


@dataclass
class NodeState:
    """What meshd knows of one node of the data plane."""

    node: str
    kind: str
    container: str
    connected: bool = False
    acked_version: int | None = None
    nacked_version: int | None = None
    nack_reason: str | None = None
    sent_version: int | None = None
    connected_at: float = 0.0
    last_seen: float = 0.0
    ack_times: dict[int, float] = field(default_factory=dict)
    generation: int = 0  # bumped per connection: only the newest connection owns `connected`
    identity: str | None = None      # the SPIFFE ID the node authenticated as
    authenticated: bool = False
    auth_via: str | None = None      # "token" (bootstrap) | "certificate"
    bundle_acked: int | None = None  # last trust bundle version the node installed


class AuthRefused(Exception):
    """The node does not get in (or gets nothing signed): close code and a reason (no secrets)."""

    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class AuthResult:
    """Who the node is, how it proved it, and the certificate to send first (bootstrap)."""

    identity: str
    via: str
    first: Message | None = None


class _Conn:
    """One websocket of a node: its own wake-up, last sent version and reply signal."""

    def __init__(self, node: str, ws: web.WebSocketResponse) -> None:
        self.node = node
        self.ws = ws
        self.wake = asyncio.Event()
        self.replied = asyncio.Event()
        self.sent_version: int | None = None
        self.lock = asyncio.Lock()    # one frame at a time from the sender loop and certificate pushes
        self.authenticated = False

    async def send(self, text: str) -> None:
        async with self.lock:
            await self.ws.send_str(text)


class Hub:
    """Holds the latest snapshot and every node; wakes node senders on a new version."""

    def __init__(self, on_hello_version=None, auth=None, on_refused=None):
        self.latest: Snapshot | None = None
        self._latest_text: str | None = None
        self.nodes: dict[str, NodeState] = {}
        self.published_at: dict[int, float] = {}
        self._on_hello_version = on_hello_version
        # meshd's authenticator (meshd.app): `authenticate(request, hello) -> AuthResult` and
        # `sign(node, identity, CsrRequest) -> Certs`, both raising AuthRefused. None: no checks
        # (tests of the snapshot push only).
        self.auth = auth
        # Called with (hello, peer address, AuthRefused) for each hello `auth` refuses.
        self.on_refused = on_refused
        self._conns: set[_Conn] = set()
        self._closing: set[asyncio.Task] = set()

    def publish(self, snapshot: Snapshot) -> None:
        """Make `snapshot` the one every node gets; encoded once, sent to all."""
        self.latest = snapshot
        self._latest_text = encode_message(SnapshotPush(version=snapshot.version,
                                                        snapshot=encode_snapshot(snapshot)))
        self.published_at[snapshot.version] = time.time()
        for conn in self._conns:
            conn.wake.set()

    def status(self) -> list[dict]:
        """Per node: connection and the versions it ACKed or NACKed."""
        return [{"node": n.node, "kind": n.kind, "container": n.container, "connected": n.connected,
                 "acked_version": n.acked_version, "nacked_version": n.nacked_version,
                 "nack_reason": n.nack_reason, "last_seen": n.last_seen, "identity": n.identity,
                 "auth": n.auth_via, "bundle_acked": n.bundle_acked}
                for n in sorted(self.nodes.values(), key=lambda n: n.node)]

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        """One node's websocket: hello, then snapshots out and ACK/NACK in."""
        ws = web.WebSocketResponse(heartbeat=HEARTBEAT_S, max_msg_size=16 * 1024 * 1024)
        await ws.prepare(request)
        try:
            first = await ws.receive(timeout=HELLO_TIMEOUT_S)
            hello = decode_message(first.data) if first.type == WSMsgType.TEXT else None
        except (asyncio.TimeoutError, ProtocolError) as exc:
            log.warning("control_bad_hello", peer=request.remote, error=str(exc))
            await ws.close(code=4400, message=b"expected hello")
            return ws
        if not isinstance(hello, Hello):
            await ws.close(code=CLOSE_BAD_HELLO, message=b"expected hello")
            return ws
        result: AuthResult | None = None
        if self.auth is not None:
            try:
                result = await self.auth.authenticate(request, hello)
            except AuthRefused as exc:
                log.warning("node_refused", node=hello.node, kind=hello.kind, peer=request.remote,
                            code=exc.code, reason=exc.reason)
                if self.on_refused is not None:
                    self.on_refused(hello, request.remote or "", exc)
                await ws.close(code=exc.code, message=exc.reason[:120].encode())
                return ws
        node = self.nodes.get(hello.node)
        if node is None or node.kind != hello.kind:
            node = self.nodes[hello.node] = NodeState(node=hello.node, kind=hello.kind, container=hello.container)
        node.container = hello.container
        if result is not None:
            node.identity, node.auth_via, node.authenticated = result.identity, result.via, True
        node.generation += 1
        generation = node.generation
        node.connected = True
        node.connected_at = node.last_seen = time.time()
        node.sent_version = None
        if hello.last_version and node.acked_version is None:
            node.acked_version = hello.last_version
        if self._on_hello_version is not None:
            self._on_hello_version(hello.last_version)
        log.info("node_connected", node=hello.node, kind=hello.kind, last_version=hello.last_version)
        conn = _Conn(node.node, ws)
        conn.authenticated = result is not None
        if result is not None and result.first is not None:
            await conn.send(encode_message(result.first))
        self._conns.add(conn)
        sender = asyncio.ensure_future(self._send_loop(ws, node, conn))
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                node.last_seen = time.time()
                try:
                    reply = decode_message(msg.data)
                except ProtocolError as exc:
                    log.warning("control_bad_message", node=node.node, error=str(exc))
                    continue
                if isinstance(reply, (Ack, Nack)) and reply.version == conn.sent_version:
                    conn.replied.set()
                if isinstance(reply, Ack):
                    node.acked_version = reply.version
                    node.ack_times[reply.version] = node.last_seen
                    if len(node.ack_times) > 64:
                        node.ack_times.pop(min(node.ack_times))
                elif isinstance(reply, Nack):
                    node.nacked_version = reply.version
                    node.nack_reason = reply.reason
                    log.warning("node_nack", node=node.node, version=reply.version, reason=reply.reason)
                elif isinstance(reply, BundleAck):
                    node.bundle_acked = reply.version
                elif isinstance(reply, CsrRequest) and self.auth is not None and result is not None:
                    try:
                        certs = await self.auth.sign(node, result.identity, reply)
                    except AuthRefused as exc:
                        log.warning("csr_refused", node=node.node, identity=result.identity, reason=exc.reason)
                        await ws.close(code=exc.code, message=exc.reason[:120].encode())
                        break
                    await conn.send(encode_message(certs))
        finally:
            sender.cancel()
            self._conns.discard(conn)
            if node.generation == generation:  # a newer connection of the same node is not ours to end
                node.connected = False
            log.info("node_disconnected", node=node.node)
        return ws

    async def _send_loop(self, ws: web.WebSocketResponse, node: NodeState, conn: _Conn) -> None:
        # Always send the latest snapshot only: a slow node skips the versions it missed.
        conn.wake.set()
        while not ws.closed:
            await conn.wake.wait()
            conn.wake.clear()
            latest = self.latest
            if latest is None or conn.sent_version == latest.version:
                continue
            text = self._latest_text
            conn.sent_version = node.sent_version = latest.version
            conn.replied.clear()
            try:
                await conn.send(text)
            except (ConnectionError, RuntimeError):
                return
            # Until the node answers (ACK or NACK) it is slow: publishes meanwhile collapse into the
            # latest, sent when it answers. Socket buffers would otherwise queue every version.
            try:
                await asyncio.wait_for(conn.replied.wait(), REPLY_TIMEOUT_S)
            except asyncio.TimeoutError:
                log.warning("node_no_reply", node=node.node, version=latest.version)

    async def broadcast(self, msg: Message) -> int:
        """Send a control message to every authenticated connection; the number reached."""
        text = encode_message(msg)
        sent = 0
        for conn in list(self._conns):
            if not conn.authenticated or conn.ws.closed:
                continue
            try:
                await conn.send(text)
                sent += 1
            except (ConnectionError, RuntimeError):
                continue
        return sent

    async def drop(self, name: str) -> None:
        """Forget a node whose container is gone, closing its sockets: a peer whose network
        namespace vanished sends no FIN, and would otherwise look connected until heartbeats fail."""
        self.nodes.pop(name, None)
        for conn in [c for c in self._conns if c.node == name]:
            self._conns.discard(conn)
            # Not awaited: a peer whose namespace is gone never answers the close frame, and the
            # rebuild that dropped it must not wait for aiohttp's close timeout.
            task = asyncio.ensure_future(conn.ws.close(code=4410, message=b"node removed"))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close_all(self) -> None:
        """Close every node's socket (meshd is stopping; nodes reconnect with backoff)."""
        for conn in list(self._conns):
            await conn.ws.close(code=1001, message=b"meshd stopping")

    def ack_latency(self, version: int) -> dict[str, float]:
        """Seconds from publishing `version` to each connected node's ACK of it."""
        start = self.published_at.get(version)
        if start is None:
            return {}
        return {n.node: n.ack_times[version] - start for n in self.nodes.values() if version in n.ack_times}


def dumps(obj) -> str:
    """Compact JSON for admin responses."""
    return json.dumps(obj, separators=(",", ":"), default=str)
