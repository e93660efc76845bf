"""A node's workload identity: its key, its certificate from meshd, renewal, the trust bundle.

The private key is generated for the node by a short-lived child process (`certs.worker`, which
also reads the certificates the node receives: the node itself does not load `cryptography`) and
handed over through a pipe; it leaves the node only for one copy in the node container's own file
system (`MESH_TLS_DIR`, directory 0700, key 0600), so that a restarted sidecar process reconnects
with its certificate instead of a (spent) bootstrap token. Worker runs are rare (bootstrap, renewal
at about half of the certificate's lifetime, root rotation, restore) and run as asyncio
subprocesses, off the event loop: the methods that need one are coroutines. `CertAgent(...)` restores
saved material at once, blocking for a worker run; the nodes pass `restore=False` and
`await agent.restore()` instead.

`CertAgent` is what `sidecar.control.ControlClient` uses on the control channel (bootstrap fields of
the hello, the TLS context to reach meshd, `certs`/`bundle`/`renew` handling) and `MeshTls` is the
TLS hook of `sidecar.proxy.ProxyState` (contexts read per handshake, peer identity checks, TLS
version counters).
"""

from __future__ import annotations

import base64
import os
import random
import ssl
import time
from dataclasses import replace
from typing import Any, Callable

import structlog

from certs import worker
from certs.holder import ALPN_SERVER, TlsHolder, TlsMaterial, peer_identity
from certs.store import (
    inspect_request, load_material, material_from_inspection, read_material_files, save_material,
)
from meshcore.authz import source_name
from meshcore.identity import renew_at as compute_renew_at
from meshcore.metrics import Counter, Gauge, Registry
from meshcore.protocol import Certs

log = structlog.get_logger("sidecar.tls")

DEFAULT_TLS_DIR = "/tmp/mesh-tls"
MAX_PENDING_KEYS = 4
INSPECT_ATTEMPTS = 3    # a certificate that arrives is not asked for again: retry a worker that failed


def read_bootstrap_token(path: str, fallback: str = "") -> tuple[str, str]:
    """(token, file): the one-time token meshd copied into this node's file system at `path`
    (meshcore.bootstrap), with the file to delete once the token is spent; else (`fallback`, "")
    (MESH_BOOTSTRAP_TOKEN: the Swarm agent's gateway subprocess), and ("", "") for a restarted node
    whose token is spent."""
    try:
        with open(path, encoding="ascii") as fh:
            return fh.read().strip(), path
    except FileNotFoundError:
        return fallback, ""


class PendingKey:
    """A private key whose CSR is out: its PEM (never shown) and its SPKI (DER), to match the certificate."""

    __slots__ = ("key_pem", "spki")

    def __init__(self, key_pem: bytes, spki: bytes):
        self.key_pem = key_pem
        self.spki = spki

    def __repr__(self) -> str:
        return f"PendingKey(spki={self.spki[-8:].hex()}...)"


async def new_key_and_csr(request: dict) -> tuple[PendingKey, str]:
    """A new key and its CSR (PEM text) from the worker (`request`: keygen_csr's identity or names)."""
    answer = await worker.acall({"op": "keygen_csr", **request})
    return PendingKey(answer["key_pem"].encode("ascii"), base64.b64decode(answer["spki"])), answer["csr_pem"]


async def inspect_chain(chain_pem: bytes, bundle_pem: bytes | None = None) -> dict:
    """The worker's reading of the leaf of `chain_pem` (raises ValueError when it does not parse)."""
    return await worker.acall(inspect_request(chain_pem, bundle_pem=bundle_pem), attempts=INSPECT_ATTEMPTS)


class TlsStats:
    """Prometheus series of the node's TLS: handshakes by direction and version, certificate state."""

    def __init__(self, registry: Registry | None):
        registry = registry if registry is not None else Registry()
        self.registry = registry
        self.connections = Counter(
            "mesh_tls_connections", "Mesh connections by direction (inbound/outbound) and negotiated TLS "
            "version (`plaintext` for a permissive inbound's plaintext connection).",
            ("direction", "tls_version"), registry=registry)
        self.refused = Counter(
            "mesh_tls_refused", "Mesh connections refused: plaintext to a strict inbound, bad peer identity.",
            ("direction", "reason"), registry=registry)
        self.rotations = Counter("mesh_cert_rotations", "Workload certificates installed.", registry=registry)
        self.expiry = Gauge("mesh_cert_expiry_timestamp_seconds", "When the workload certificate expires.",
                            registry=registry)
        self.serial = Gauge("mesh_cert_serial_low32", "Low 32 bits of the workload certificate serial.",
                            registry=registry)
        self._children: dict[tuple, Any] = {}

    def conn(self, direction: str, version: str) -> None:
        key = (direction, version)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.connections.labels(direction, version)
        child.inc()


class CertAgent:
    """Holds the node's workload certificate and keeps it fresh through the control channel."""

    def __init__(self, identity: str, bundle_pem: bytes, token: str = "", *, tls_dir: str | None = DEFAULT_TLS_DIR,
                 server_names: tuple[str, ...] = (), registry: Registry | None = None,
                 rand: Callable[[], float] = random.random, clock: Callable[[], float] = time.time,
                 restore: bool = True, token_file: str = ""):
        self.identity = identity
        self.initial_bundle = bundle_pem
        self.token = token
        self.token_file = token_file   # where `token` came from: deleted once the token is spent
        self.tls_dir = tls_dir
        self.rand = rand
        self.clock = clock
        self.holder = TlsHolder()
        self.stats = TlsStats(registry)
        self.renew_at: float | None = None
        self.installed = 0
        self.bundle_version = 0
        self._pending: list[PendingKey] = []   # private keys whose CSR is out, newest last
        self._token_spent = False
        self.last_error: str | None = None
        # The gateway's HTTPS certificate (server names from MESH_GATEWAY_HOSTS), issued by meshd.
        self.server_names = server_names
        self.server_holder: ServerCert | None = ServerCert() if server_names else None
        if restore:
            self._load_saved()

    # ---- state -----------------------------------------------------------------------------

    @property
    def material(self) -> TlsMaterial | None:
        return self.holder.material

    def has_valid_cert(self, now: float | None = None) -> bool:
        m = self.holder.material
        return m is not None and m.not_after > (self.clock() if now is None else now)

    @property
    def bundle_pem(self) -> bytes:
        m = self.holder.material
        return m.bundle_pem if m is not None else self.initial_bundle

    def _has_saved(self) -> bool:
        return bool(self.tls_dir) and os.path.exists(os.path.join(self.tls_dir, "key.pem"))

    def _load_saved(self) -> None:
        """Restore the material saved in tls_dir (blocking: a worker run)."""
        if not self._has_saved():
            return
        try:
            material = load_material(self.tls_dir)
        except (OSError, ValueError) as exc:
            log.warning("tls_saved_material_unusable", error=str(exc))
            return
        self._restore_material(material)

    async def restore(self) -> None:
        """Restore the material saved in tls_dir, if any, valid and for this identity (the worker
        runs as an asyncio subprocess); for an agent made with `restore=False`."""
        if not self._has_saved():
            return
        try:
            chain, key_pem, bundle = read_material_files(self.tls_dir)
            info = await worker.acall(inspect_request(chain, key_pem, bundle), attempts=INSPECT_ATTEMPTS)
            material = material_from_inspection(chain, key_pem, bundle, info)
        except (OSError, ValueError) as exc:
            log.warning("tls_saved_material_unusable", error=str(exc))
            return
        self._restore_material(material)

    def _restore_material(self, material: TlsMaterial) -> None:
        if material.identity != self.identity or material.not_after <= self.clock():
            return
        self._install_material(material, None)
        log.info("tls_material_restored", identity=self.identity, serial=f"{material.serial:x}",
                 not_after=material.not_after)

    def _install_material(self, material: TlsMaterial, renew_at: float | None) -> None:
        self.holder.update(material)
        now = self.clock()
        start = min(max(material.not_before, now), material.not_after - 1)
        self.renew_at = renew_at if renew_at else compute_renew_at(start, material.not_after, self.rand())
        self.installed += 1
        self.stats.rotations.inc()
        self.stats.expiry.set(material.not_after)
        self.stats.serial.set(material.serial & 0xFFFFFFFF)
        if self.tls_dir:
            try:
                save_material(self.tls_dir, material)
            except OSError as exc:
                log.warning("tls_material_not_saved", error=str(exc))

    # ---- control channel -------------------------------------------------------------------

    def needs_bootstrap(self) -> bool:
        return not self.has_valid_cert()

    async def bootstrap_fields(self) -> tuple[str, str]:
        """(token, csr) for the hello when the node has no valid certificate, else ("", "")."""
        if not self.needs_bootstrap() or not self.token:
            return "", ""
        return self.token, await self.new_csr()

    def _add_pending(self, key: PendingKey) -> None:
        self._pending.append(key)
        del self._pending[:-MAX_PENDING_KEYS]

    async def new_csr(self) -> str:
        """A fresh key (kept pending until its certificate arrives) and its CSR (PEM text).

        Raises ValueError for an identity that is no SPIFFE ID, certs.worker.WorkerError (an
        OSError) when the worker does not answer."""
        key, csr = await new_key_and_csr({"identity": self.identity})
        self._add_pending(key)
        return csr

    def control_ssl_context(self) -> ssl.SSLContext:
        """TLS 1.3 client context for meshd's control endpoint: verify meshd (bundle + IP/host name)
        and present the workload certificate when there is a valid one."""
        material = self.holder.material
        if material is not None and material.not_after > self.clock():
            from certs.holder import build_context
            ctx = build_context(material, server_side=False)
        else:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_3
            ctx.load_verify_locations(cadata=self.bundle_pem.decode("ascii"))
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx

    async def install(self, msg: Certs) -> TlsMaterial:
        """Install a `certs` message: its leaf must match a pending (or the current) key.

        Raises ValueError when it does not (or does not parse), certs.worker.WorkerError when the
        worker reading it failed (after retries)."""
        if msg.purpose == "gateway-server":
            if self.server_holder is None:
                raise ValueError("a gateway server certificate for a node that asked for none")
            await self.server_holder.install(msg, self._pending)
            return self.holder.material
        chain = msg.cert_chain.encode("ascii")
        bundle = msg.bundle.encode("ascii")
        info = await inspect_chain(chain, bundle)
        want = base64.b64decode(info["spki"])
        key_pem = None
        for key in reversed(self._pending):
            if key.spki == want:
                key_pem = key.key_pem
                self._pending.remove(key)
                break
        current = self.holder.material
        if key_pem is None and current is not None and (not current.spki or current.spki == want):
            key_pem = current.key_pem  # same key re-certified (holder.update checks it fits)
        if key_pem is None:
            raise ValueError("the certificate matches no key of this node")
        material = material_from_inspection(chain, key_pem, bundle, info)
        if material.identity != self.identity:
            raise ValueError(f"the certificate is for {material.identity!r}, not {self.identity!r}")
        self._install_material(material, msg.renew_at or None)
        self._token_spent = True
        self._delete_token_file()
        log.info("tls_certificate_installed", identity=self.identity, serial=f"{material.serial:x}",
                 not_after=round(material.not_after, 1), renew_at=round(self.renew_at or 0, 1))
        return material

    def _delete_token_file(self) -> None:
        """The token is spent: its file goes (a restarted node reconnects with its saved certificate;
        this process keeps the token, which tells meshd that its own node lost its key)."""
        if not self.token_file:
            return
        try:
            os.unlink(self.token_file)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("bootstrap_token_file_kept", error=str(exc))
        self.token_file = ""

    def install_bundle(self, bundle_pem: str, version: int) -> None:
        """A new trust bundle for the current certificate (root rotation)."""
        m = self.holder.material
        if m is None:
            self.initial_bundle = bundle_pem.encode("ascii")
        else:
            new = replace(m, bundle_pem=bundle_pem.encode("ascii"))
            self.holder.update(new)
            if self.tls_dir:
                try:
                    save_material(self.tls_dir, new)
                except OSError:
                    pass
        if self.server_holder is not None:
            self.server_holder.bundle_pem = bundle_pem.encode("ascii")
        self.bundle_version = version
        log.info("tls_bundle_installed", version=version, roots=bundle_pem.count("BEGIN CERTIFICATE"))

    def renew_due(self, now: float | None = None) -> bool:
        now = self.clock() if now is None else now
        return self.renew_at is not None and now >= self.renew_at

    def server_csr_due(self) -> bool:
        """The gateway has no HTTPS certificate yet, or its certificate is due for renewal."""
        return self.server_holder is not None and self.server_holder.due(self.clock())

    async def server_csr(self) -> str | None:
        """The gateway's HTTPS CSR, when it has none or its certificate is due."""
        if not self.server_csr_due():
            return None
        key, csr = await new_key_and_csr({"names": list(self.server_names)})
        self._add_pending(key)
        return csr

    def describe(self) -> dict:
        m = self.holder.material
        return {"identity": self.identity, "serial": f"{m.serial:x}" if m else None,
                "not_after": m.not_after if m else None, "renew_at": self.renew_at,
                "installed": self.installed, "bundle_version": self.bundle_version,
                "roots": m.bundle_pem.count(b"BEGIN CERTIFICATE") if m else 0}


class ServerCert:
    """A TLS server certificate for external clients (the gateway's HTTPS), swapped per handshake."""

    def __init__(self) -> None:
        self.current: ssl.SSLContext | None = None
        self.not_before = 0.0
        self.not_after = 0.0
        self.bundle_pem = b""
        self.front = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.front.minimum_version = ssl.TLSVersion.TLSv1_3
        self.front.sni_callback = self._select

    def _select(self, ssl_obj: Any, _name: str | None, _ctx: ssl.SSLContext) -> int | None:
        if self.current is None:
            return ssl.ALERT_DESCRIPTION_HANDSHAKE_FAILURE
        ssl_obj.context = self.current
        return None

    def due(self, now: float) -> bool:
        return self.current is None or now >= self.not_before + (self.not_after - self.not_before) * 0.5

    def load_pem(self, chain_pem: bytes, key_pem: bytes, info: dict | None = None) -> None:
        """Serve `chain_pem` with `key_pem` from the next handshake on. `info`: the worker's reading
        of the chain; without it the worker is run here (blocking: from async code use `aload_pem`)."""
        from certs.holder import _load_via_memfd, _load_via_tempdir

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.set_alpn_protocols(ALPN_SERVER)   # the gateway's listener takes HTTP/2 (h2) and HTTP/1.1
        ctx.num_tickets = 0
        if not _load_via_memfd(ctx, chain_pem, key_pem):   # OpenSSL checks that the key fits
            _load_via_tempdir(ctx, chain_pem, key_pem)
        if info is None:
            info = worker.call(inspect_request(chain_pem), attempts=INSPECT_ATTEMPTS)
        self.not_before = float(info["not_before"])
        self.not_after = float(info["not_after"])
        self.current = ctx

    async def aload_pem(self, chain_pem: bytes, key_pem: bytes) -> None:
        """`load_pem` with the chain read by an asyncio worker subprocess (e.g. the user's certificate)."""
        self.load_pem(chain_pem, key_pem, await inspect_chain(chain_pem))

    async def install(self, msg: Certs, pending: list[PendingKey]) -> None:
        chain = msg.cert_chain.encode("ascii")
        info = await inspect_chain(chain)
        want = base64.b64decode(info["spki"])
        for key in reversed(pending):
            if key.spki == want:
                pending.remove(key)
                self.load_pem(chain, key.key_pem, info)
                log.info("gateway_server_certificate_installed", not_after=round(self.not_after, 1))
                return
        raise ValueError("the server certificate matches no key of this node")


class MeshTls:
    """The proxy's TLS hook (`ProxyState(tls=...)`): contexts per handshake, identity checks."""

    def __init__(self, agent: CertAgent):
        self.agent = agent
        self.holder = agent.holder
        self.stats = agent.stats

    def server_context(self) -> ssl.SSLContext:
        return self.holder.server_context()

    def client_context(self) -> ssl.SSLContext:
        return self.holder.client_context()

    def client_context_h2(self) -> ssl.SSLContext:
        return self.holder.client_context_h2()

    def check_peer(self, ssl_object: Any, endpoint: Any) -> bool:
        """Outbound: the peer's verified SPIFFE ID must be the endpoint's expected identity."""
        got = peer_identity(ssl_object)
        want = getattr(endpoint, "identity", None)
        if not want or got != want:
            self.stats.refused.labels("outbound", "peer_identity").inc()
            log.warning("mtls_peer_identity_mismatch", expected=want, got=got,
                        address=getattr(endpoint, "address", None))
            return False
        self.stats.conn("outbound", ssl_object.version() or "unknown")
        return True

    def inbound_peer(self, ssl_object: Any) -> tuple[str | None, str | None]:
        """Inbound: (the caller's verified SPIFFE ID, its service name) or (None, None) in plaintext.
        A TLS connection is counted once: the streams of an HTTP/2 hop ask again, each, and get the
        connection's answer (kept on its SSLObject)."""
        if ssl_object is None:
            self.stats.conn("inbound", "plaintext")
            return None, None
        known = getattr(ssl_object, "mesh_peer", None)
        if known is not None:
            return known
        self.stats.conn("inbound", ssl_object.version() or "unknown")
        identity = peer_identity(ssl_object)
        peer = identity, source_name(identity)
        try:
            ssl_object.mesh_peer = peer
        except AttributeError:   # an SSLObject class with __slots__: counted per ask, as before
            pass
        return peer
