"""The node side of the control channel: hello, snapshots in, ACK/NACK out, reconnect with backoff."""

from __future__ import annotations

import asyncio
import ipaddress
import random
import socket
import time
from typing import Callable
from urllib.parse import urlsplit, urlunsplit

import structlog

from meshcore.control_address import Route, choose_control_host
from meshcore.protocol import (
    CLOSE_BAD_HELLO, CLOSE_FORBIDDEN, CLOSE_UNAUTHORIZED, Ack, Bundle, BundleAck, Certs, CsrRequest, Hello, Nack, ProtocolError, Renew, SnapshotPush,
    decode_message, encode_message, reconnect_delay,
)
from meshcore.snapshot import Snapshot, SnapshotError, decode_snapshot
from sidecar.wsclient import ConnectionClosed, WebSocketError, connect

log = structlog.get_logger("sidecar.control")

REFUSAL_CODES = (CLOSE_BAD_HELLO, CLOSE_UNAUTHORIZED, CLOSE_FORBIDDEN)
# As meshd's end (meshd/control.py): 16 MiB messages, a ping every 10 s answered within 5 s; no
# compression (sidecar.wsclient offers no extension) and no proxy: the channel goes straight to meshd.
CONNECT_OPTIONS = {"max_size": 16 * 1024 * 1024, "ping_interval": 10.0, "ping_timeout": 5.0,
                   "open_timeout": 10.0, "close_timeout": 5.0}


RENEW_RETRY_S = 2.0     # a renewal asked for and not yet answered is asked again after this
RENEW_CHECK_MAX_S = 30.0   # the renew loop looks again at least this often (a clock step, a new certificate)
NO_CERT_CHECK_S = 1.0    # before the first certificate is installed, it looks this often
SERVER_CHECK_S = 5.0     # the gateway's HTTPS certificate is looked at this often


def renew_wait(now: float, renew_at: float | None, asked_at: float, has_server_cert: bool) -> float:
    """Seconds the renew loop may sleep: until the certificate's renew time (or the retry of an
    unanswered request), at most RENEW_CHECK_MAX_S, and SERVER_CHECK_S for a gateway. An idle
    sidecar wakes up for this every 30 s, not four times a second."""
    wait = RENEW_CHECK_MAX_S if renew_at is not None else NO_CERT_CHECK_S
    if renew_at is not None:
        wait = min(wait, renew_at - now if renew_at > now else asked_at + RENEW_RETRY_S - now)
    if has_server_cert:
        wait = min(wait, SERVER_CHECK_S)
    return max(0.05, wait)


class ControlClient:
    """Keeps the last good snapshot; `apply` is called with each new one and may raise to NACK it."""

    def __init__(self, url: str, kind: str, node: str, container: str,
                 apply: Callable[[Snapshot], None], rand: Callable[[], float] = random.random,
                 agent=None, routes: Callable[[], list[Route]] | None = None,
                 on_connected: Callable[[str], None] | None = None):
        self.url = url
        self.on_connected = on_connected   # told the URL each connection went to (the host checked)
        # The namespace's current IPv4 routes (read at each connect): the host dialled is one of
        # this host's (meshcore.control_address). None: dial `url` as given (tests, the gateway).
        self.routes = routes
        self.last_error: str | None = None
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
        self.agent = agent          # sidecar.tlsagent.CertAgent: certificates over this channel (wss)
        self.cert_installed = asyncio.Event()   # wakes the renew loop: a new renew time to sleep until
        self.refusals = 0
        self.last_refusal: str | None = None

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
        while True:
            renewer = None
            url = self.url
            try:
                url = self.dial_url(await self._resolve_host())
                token, csr = await self.agent.bootstrap_fields() if self.agent is not None else ("", "")
                ssl_ctx = self.agent.control_ssl_context() if self.agent is not None else None
                kwargs = {"ssl": ssl_ctx} if ssl_ctx is not None else {}
                async with connect(url, **CONNECT_OPTIONS, **kwargs) as ws:
                    self.connected = True
                    self.last_error = None
                    if self.on_connected is not None:
                        self.on_connected(url)
                    last = self.current.version if self.current else 0
                    await ws.send(encode_message(Hello(kind=self.kind, node=self.node, container=self.container,
                                                       last_version=last, token=token, csr=csr)))
                    log.info("control_connected", url=url, last_version=last,
                             auth="token" if token else ("certificate" if self.agent else "none"))
                    if self.agent is not None:
                        renewer = asyncio.ensure_future(self._renew_loop(ws))
                    while True:
                        try:
                            data = await ws.recv()
                        except ConnectionClosed as exc:
                            self._note_close(exc.rcvd)
                            break
                        if not isinstance(data, str):
                            continue
                        try:
                            push = decode_message(data)
                        except ProtocolError as exc:
                            log.warning("control_bad_message", error=str(exc))
                            continue
                        attempt = 0
                        if isinstance(push, SnapshotPush):
                            await ws.send(encode_message(self.handle_push(push)))
                        elif self.agent is not None:
                            await self._handle_cert_message(ws, push)
            except (WebSocketError, OSError, asyncio.TimeoutError, ValueError) as exc:
                self.last_error = str(exc) or type(exc).__name__
                log.info("control_unreachable", url=url, error=self.last_error)
            finally:
                self.connected = False
                if renewer is not None:
                    renewer.cancel()
            delay = reconnect_delay(attempt, self.rand())
            attempt += 1
            await asyncio.sleep(delay)

    async def _resolve_host(self) -> str | None:
        """The configured host's IPv4 address when it is a name (on Swarm, the control service: one
        task address with dnsrr, a new one after the control plane moved); None for an address, for
        no route source, or when the name does not resolve (then the default gateway is dialled)."""
        host = urlsplit(self.url).hostname or ""
        if self.routes is None:
            return None
        try:
            ipaddress.ip_address(host)
            return None
        except ValueError:
            pass
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, None, family=socket.AF_INET)
        except OSError:
            return None
        return str(infos[0][4][0]) if infos else None

    def dial_url(self, resolved: str | None = None) -> str:
        """`url` with its host (or the address `resolved` from its name) checked against the
        namespace's routes: kept while it is loopback or on-link, else this namespace's default
        gateway (the host); raises NoControlAddress."""
        if self.routes is None:
            return self.url
        parts = urlsplit(self.url)
        configured = parts.hostname or ""
        host = choose_control_host(resolved or configured, self.routes())
        if host == configured:
            return self.url
        if host != resolved:
            log.warning("control_address_replaced", configured=configured, dialled=host,
                        reason="not on a directly connected network of this namespace")
        netloc = f"{host}:{parts.port}" if parts.port else host
        return urlunsplit(parts._replace(netloc=netloc))

    def _note_close(self, frame) -> None:
        """Count meshd's refusals (close 4400 bad hello, 4401 token, 4403 placement or identity)."""
        if frame is not None and frame.code in REFUSAL_CODES:
            self.refusals += 1
            self.last_refusal = f"{frame.code} {frame.reason}".strip()
            log.warning("control_refused", code=frame.code, reason=frame.reason)

    async def _handle_cert_message(self, ws, msg) -> None:
        # Keys, CSRs and certificate parsing run in a short-lived worker process (certs.worker), in
        # a thread: OSError (certs.worker.WorkerError) when it could not answer.
        agent = self.agent
        if isinstance(msg, Certs):
            try:
                await agent.install(msg)
            except (ValueError, OSError) as exc:
                log.warning("tls_certificate_refused", error=str(exc))
            else:
                self.cert_installed.set()
        elif isinstance(msg, Renew):
            log.info("tls_renew_requested", reason=msg.reason)
            try:
                csr = await agent.new_csr()
            except (ValueError, OSError) as exc:
                log.warning("tls_csr_failed", error=str(exc))   # the renew loop asks again when due
                return
            await ws.send(encode_message(CsrRequest(csr=csr)))
        elif isinstance(msg, Bundle):
            try:
                agent.install_bundle(msg.bundle, msg.version)
            except ValueError as exc:
                log.warning("tls_bundle_refused", error=str(exc))
                return
            await ws.send(encode_message(BundleAck(version=msg.version)))

    async def _renew_loop(self, ws) -> None:
        """Renew the workload certificate at its renew time (and the gateway's HTTPS certificate)."""
        agent = self.agent
        asked_at = 0.0
        try:
            while ws.open:
                now = time.time()
                if agent.has_valid_cert(now) and agent.renew_due(now) and now - asked_at > 2.0:
                    asked_at = now
                    try:
                        csr = await agent.new_csr()
                    except (ValueError, OSError) as exc:
                        log.warning("tls_csr_failed", error=str(exc))
                    else:
                        await ws.send(encode_message(CsrRequest(csr=csr)))
                        log.info("tls_renewal_requested", identity=agent.identity)
                if (agent.has_valid_cert(now) and agent.server_csr_due()
                        and now - getattr(self, "_server_asked", 0.0) > 5.0):
                    self._server_asked = now
                    try:
                        server_csr = await agent.server_csr()
                    except (ValueError, OSError) as exc:
                        log.warning("tls_csr_failed", purpose="gateway-server", error=str(exc))
                        server_csr = None
                    if server_csr is not None:
                        await ws.send(encode_message(CsrRequest(csr=server_csr, purpose="gateway-server")))
                # Sleep until the renew time, or until a certificate is installed (a rotation's
                # may be due long before the one the sleep was computed for).
                self.cert_installed.clear()
                now = time.time()
                wait = renew_wait(now, agent.renew_at if agent.has_valid_cert(now) else None, asked_at,
                                  agent.server_holder is not None)
                try:
                    await asyncio.wait_for(self.cert_installed.wait(), wait)
                except asyncio.TimeoutError:
                    pass
        except ConnectionClosed:
            pass                   # run() notices it too, and reconnects
