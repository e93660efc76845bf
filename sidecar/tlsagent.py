"""A node's workload identity: its key, its certificate from meshd, renewal, the trust bundle.

The private key is generated here and never leaves the process but for one copy in the node
container's own file system (`MESH_TLS_DIR`, directory 0700, key 0600), so that a restarted sidecar
process reconnects with its certificate instead of a (spent) bootstrap token.

`CertAgent` is what `sidecar.control.ControlClient` uses on the control channel (bootstrap fields of
the hello, the TLS context to reach meshd, `certs`/`bundle`/`renew` handling) and `MeshTls` is the
TLS hook of `sidecar.proxy.ProxyState` (contexts read per handshake, peer identity checks, TLS
version counters).
"""

from __future__ import annotations

import os
import random
import ssl
import time
from dataclasses import replace
from typing import Any, Callable

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from prometheus_client import CollectorRegistry, Counter, Gauge

from certs.holder import TlsHolder, TlsMaterial, peer_identity
from certs.keys import build_csr, generate_key
from certs.store import load_material, material_from_pem, save_material
from meshcore.authz import source_name
from meshcore.identity import renew_at as compute_renew_at
from meshcore.protocol import Certs

log = structlog.get_logger("sidecar.tls")

DEFAULT_TLS_DIR = "/tmp/mesh-tls"
MAX_PENDING_KEYS = 4


def _spki(key) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _leaf_spki(chain_pem: bytes) -> bytes:
    return _spki(x509.load_pem_x509_certificates(chain_pem)[0].public_key())


class TlsStats:
    """Prometheus series of the node's TLS: handshakes by direction and version, certificate state."""

    def __init__(self, registry: CollectorRegistry | None):
        registry = registry if registry is not None else CollectorRegistry()
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
                 server_names: tuple[str, ...] = (), registry: CollectorRegistry | None = None,
                 rand: Callable[[], float] = random.random, clock: Callable[[], float] = time.time):
        self.identity = identity
        self.initial_bundle = bundle_pem
        self.token = token
        self.tls_dir = tls_dir
        self.rand = rand
        self.clock = clock
        self.holder = TlsHolder()
        self.stats = TlsStats(registry)
        self.renew_at: float | None = None
        self.installed = 0
        self.bundle_version = 0
        self._pending: list[Any] = []   # private keys whose CSR is out, newest last
        self._token_spent = False
        self.last_error: str | None = None
        # The gateway's HTTPS certificate (server names from MESH_GATEWAY_HOSTS), issued by meshd.
        self.server_names = server_names
        self.server_holder: ServerCert | None = ServerCert() if server_names else None
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

    def _load_saved(self) -> None:
        if not self.tls_dir or not os.path.exists(os.path.join(self.tls_dir, "key.pem")):
            return
        try:
            material = load_material(self.tls_dir)
        except (OSError, ValueError) as exc:
            log.warning("tls_saved_material_unusable", error=str(exc))
            return
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

    def bootstrap_fields(self) -> tuple[str, str]:
        """(token, csr) for the hello when the node has no valid certificate, else ("", "")."""
        if not self.needs_bootstrap() or not self.token:
            return "", ""
        return self.token, self.new_csr()

    def new_csr(self) -> str:
        """A fresh key (kept pending until its certificate arrives) and its CSR (PEM text)."""
        key, _ = generate_key()
        self._pending.append(key)
        del self._pending[:-MAX_PENDING_KEYS]
        return build_csr(key, self.identity).decode("ascii")

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

    def install(self, msg: Certs) -> TlsMaterial:
        """Install a `certs` message: its leaf must match a pending (or the current) key."""
        if msg.purpose == "gateway-server":
            if self.server_holder is None:
                raise ValueError("a gateway server certificate for a node that asked for none")
            self.server_holder.install(msg, self._pending)
            return self.holder.material
        chain = msg.cert_chain.encode("ascii")
        bundle = msg.bundle.encode("ascii")
        want = _leaf_spki(chain)
        candidates = list(reversed(self._pending))
        key_pem = None
        for key in candidates:
            if _spki(key.public_key()) == want:
                key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption())
                self._pending = [k for k in self._pending if k is not key]
                break
        if key_pem is None and self.holder.material is not None:
            key_pem = self.holder.material.key_pem  # same key re-certified
        if key_pem is None:
            raise ValueError("the certificate matches no key of this node")
        material = material_from_pem(chain, key_pem, bundle)
        if material.identity != self.identity:
            raise ValueError(f"the certificate is for {material.identity!r}, not {self.identity!r}")
        self._install_material(material, msg.renew_at or None)
        self._token_spent = True
        log.info("tls_certificate_installed", identity=self.identity, serial=f"{material.serial:x}",
                 not_after=round(material.not_after, 1), renew_at=round(self.renew_at or 0, 1))
        return material

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

    def server_csr(self) -> str | None:
        """The gateway's HTTPS CSR, when it has none or its certificate is due."""
        if self.server_holder is None or not self.server_holder.due(self.clock()):
            return None
        key, _ = generate_key()
        self._pending.append(key)
        del self._pending[:-MAX_PENDING_KEYS]
        return build_server_csr(key, self.server_names).decode("ascii")

    def describe(self) -> dict:
        m = self.holder.material
        return {"identity": self.identity, "serial": f"{m.serial:x}" if m else None,
                "not_after": m.not_after if m else None, "renew_at": self.renew_at,
                "installed": self.installed, "bundle_version": self.bundle_version,
                "roots": m.bundle_pem.count(b"BEGIN CERTIFICATE") if m else 0}


def build_server_csr(key, names: tuple[str, ...]) -> bytes:
    """A CSR for a TLS server certificate naming DNS names / IP addresses."""
    import ipaddress

    general: list[x509.GeneralName] = []
    for name in names:
        try:
            general.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            general.append(x509.DNSName(name.lower()))
    csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
           .add_extension(x509.SubjectAlternativeName(general), critical=False)
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM)


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

    def load_pem(self, chain_pem: bytes, key_pem: bytes) -> None:
        from certs.holder import _load_via_memfd, _load_via_tempdir

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.set_alpn_protocols(["http/1.1"])
        ctx.num_tickets = 0
        if not _load_via_memfd(ctx, chain_pem, key_pem):
            _load_via_tempdir(ctx, chain_pem, key_pem)
        leaf = x509.load_pem_x509_certificates(chain_pem)[0]
        self.not_before = leaf.not_valid_before_utc.timestamp()
        self.not_after = leaf.not_valid_after_utc.timestamp()
        self.current = ctx

    def install(self, msg: Certs, pending: list) -> None:
        chain = msg.cert_chain.encode("ascii")
        want = _leaf_spki(chain)
        for key in reversed(pending):
            if _spki(key.public_key()) == want:
                pending.remove(key)
                key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption())
                self.load_pem(chain, key_pem)
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
        """Inbound: (the caller's verified SPIFFE ID, its service name) or (None, None) in plaintext."""
        if ssl_object is None:
            self.stats.conn("inbound", "plaintext")
            return None, None
        self.stats.conn("inbound", ssl_object.version() or "unknown")
        identity = peer_identity(ssl_object)
        return identity, source_name(identity)
