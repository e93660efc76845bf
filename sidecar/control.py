"""The node side of the control channel: hello, snapshots in, ACK/NACK out, reconnect with backoff."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Callable

import aiohttp
import structlog

from meshcore.protocol import (
    Ack, Hello, Nack, ProtocolError, SnapshotPush, decode_message, encode_message, reconnect_delay,
)
from meshcore.snapshot import Snapshot, SnapshotError, decode_snapshot

log = structlog.get_logger("sidecar.control")


class ControlClient:
    """Keeps the last good snapshot; `apply` is called with each new one and may raise to NACK it."""

    def __init__(self, url: str, kind: str, node: str, container: str,
                 apply: Callable[[Snapshot], None], rand: Callable[[], float] = random.random):
        self.url = url
        self.kind = kind
        self.node = node
        self.container = container
        self.apply = apply
        self.rand = rand
        self.current: Snapshot | None = None
        self.connected = False
        self.last_applied_at: float | None = None
        self.nacks = 0
        self.ready = asyncio.Event()

    def handle_push(self, push: SnapshotPush) -> Ack | Nack:
        """Validate and apply one pushed snapshot; on any error keep the last good one and NACK."""
        try:
            snapshot = decode_snapshot(push.snapshot)
            if snapshot.version != push.version:
                raise SnapshotError(f"snapshot.version {snapshot.version} differs from push version {push.version}")
            self.apply(snapshot)
        except Exception as exc:  # noqa: BLE001 - any failure of apply NACKs; it must not end run()
            reason = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
            self.nacks += 1
            log.warning("snapshot_nack", version=push.version, reason=reason)
            return Nack(version=push.version, reason=reason)
        self.current = snapshot
        self.last_applied_at = time.time()
        self.ready.set()
        return Ack(version=snapshot.version)

    async def run(self) -> None:
        """Connect, serve, and reconnect forever; the data path keeps its last snapshot meanwhile."""
        attempt = 0
        async with aiohttp.ClientSession() as session:
            while True:
                try:
                    async with session.ws_connect(self.url, heartbeat=10.0, max_msg_size=16 * 1024 * 1024) as ws:
                        self.connected = True
                        attempt = 0
                        last = self.current.version if self.current else 0
                        await ws.send_str(encode_message(Hello(kind=self.kind, node=self.node,
                                                               container=self.container, last_version=last)))
                        log.info("control_connected", url=self.url, last_version=last)
                        async for msg in ws:
                            if msg.type != aiohttp.WSMsgType.TEXT:
                                continue
                            try:
                                push = decode_message(msg.data)
                            except ProtocolError as exc:
                                log.warning("control_bad_message", error=str(exc))
                                continue
                            if isinstance(push, SnapshotPush):
                                await ws.send_str(encode_message(self.handle_push(push)))
                except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                    log.info("control_unreachable", url=self.url, error=str(exc) or type(exc).__name__)
                finally:
                    self.connected = False
                delay = reconnect_delay(attempt, self.rand())
                attempt += 1
                await asyncio.sleep(delay)
