"""meshd's PKI: the mesh CA, bootstrap tokens, signing, meshd's own TLS endpoint, rotations.

- CA: a user-supplied root or intermediate (`MESH_CA_CERT`, `MESH_CA_KEY`, optional `MESH_CA_CHAIN`
  and `MESH_CA_ROOTS`, PEM files), else the CA in `<MESHD_STATE_DIR>/ca/` (created on first start,
  `ca.key` 0600). Trust domain `MESH_TRUST_DOMAIN` (default mesh.local).
- leaves: `spiffe://<td>/ns/<compose project>/sa/<mesh service>`; the gateway is
  `spiffe://<td>/ns/mesh-system/sa/gateway`. TTL `MESH_CERT_TTL` (default 24h; any duration, down to
  seconds), renewal at 50% +/- 10% of the lifetime (`meshcore.identity.renew_at`), told to the node.
- tokens: one per created node, 256 random bits, kept as SHA-256 only (`meshcore.bootstrap`).
- meshd's control endpoint (wss, 15012) presents a server certificate of the mesh CA whose SANs are
  its listening IPs, and asks for OPTIONAL client certificates verified against the trust bundle.
Nothing here logs a token, a key or a CSR's content.
"""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import shutil
import ssl
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import structlog
from cryptography import x509

from certs.ca import CertificateAuthority, CsrRejected, IssuedCert
from certs.holder import _load_via_memfd, _load_via_tempdir
from meshcore.bootstrap import TokenRecord, hash_token
from meshcore.durations import parse_duration
from meshcore.identity import renew_at as compute_renew_at
from meshcore.labels import spiffe_id
from meshcore.protocol import Bundle, Certs, Renew

from .store import Store

log = structlog.get_logger("meshd.pki")

GATEWAY_NAMESPACE = "mesh-system"
GATEWAY_SERVICE = "gateway"
CONTROL_CERT_TTL_S = 24 * 3600.0
GATEWAY_SERVER_TTL_S = 30 * 86400.0
TOKENS_KEY, CERTS_KEY, BUNDLE_VERSION_KEY = "pki_tokens", "pki_certs", "pki_bundle_version"
# A root rotation in progress: {"phase", "old_root", "new_root", "started_at"}; the staged CA (its
# key too) waits in <state>/ca-staged until it signs. Both outlive a meshd restart, which resumes.
ROOT_ROTATION_KEY, STAGED_CA_DIR = "pki_root_rotation", "ca-staged"
ROOT_PHASES = ("distributing_bundle", "switching_signer", "renewing", "retiring_old_root")
RESUME_AFTER_S = 10.0  # a restarted meshd resumes a root rotation once its nodes have reconnected
KEEP_SERIALS = 8
WAIT_STEP_S = 60.0   # a rotation step waits this long for every connected node


def _issuer_name(cert_pem: bytes) -> str:
    leaf = x509.load_pem_x509_certificates(cert_pem)[0]
    cn = leaf.issuer.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(cn[0].value) if cn else leaf.issuer.rfc4514_string()


def _root_name(cert: x509.Certificate) -> str:
    cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(cn[0].value) if cn else cert.subject.rfc4514_string()


def load_ca(state_dir: str, trust_domain: str, env: dict[str, str], now: float) -> tuple[CertificateAuthority, bool]:
    """(CA, user_supplied): from MESH_CA_* files, else the state directory (created if missing)."""
    if env.get("MESH_CA_CERT") or env.get("MESH_CA_KEY"):
        if not (env.get("MESH_CA_CERT") and env.get("MESH_CA_KEY")):
            raise ValueError("MESH_CA_CERT and MESH_CA_KEY go together")

        def read(name: str) -> bytes:
            path = env.get(name)
            return open(path, "rb").read() if path else b""

        key_path = env["MESH_CA_KEY"]
        if os.stat(key_path).st_mode & 0o077:
            raise PermissionError(f"MESH_CA_KEY {key_path} is readable by group or others; chmod 600 it")
        ca = CertificateAuthority.from_pem(read("MESH_CA_CERT"), read("MESH_CA_KEY"), read("MESH_CA_CHAIN"),
                                           read("MESH_CA_ROOTS"), trust_domain)
        return ca, True
    directory = os.path.join(state_dir, "ca")
    if os.path.exists(os.path.join(directory, "ca.key")):
        return CertificateAuthority.load(directory, trust_domain), False
    ca = CertificateAuthority.create(trust_domain, now)
    ca.save(directory)
    log.info("ca_created", trust_domain=trust_domain, root=_root_name(ca.certificate))
    return ca, False


class ControlTls:
    """meshd's server side of the control channel: one front context for every listener; the
    certificate (SANs = listening IPs) and the trust bundle are swapped per handshake."""

    def __init__(self, pki: "Pki"):
        self.pki = pki
        self.ips: tuple[str, ...] = ()
        self.current: ssl.SSLContext | None = None
        self.issued: IssuedCert | None = None
        self.front = self._base()
        self.front.sni_callback = self._select

    @staticmethod
    def _base() -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.verify_mode = ssl.CERT_OPTIONAL      # bootstrap hellos have no client certificate yet
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT
        ctx.num_tickets = 0
        return ctx

    def _select(self, ssl_obj: Any, _name: str | None, _ctx: ssl.SSLContext) -> int | None:
        if self.current is None:
            return ssl.ALERT_DESCRIPTION_HANDSHAKE_FAILURE
        ssl_obj.context = self.current
        return None

    def ensure(self, ips: list[str], force: bool = False) -> None:
        """(Re)issue meshd's certificate when the listening IPs change, it is half-way, or `force`."""
        wanted = tuple(sorted(set(ips) | {"127.0.0.1"}))
        now = time.time()
        half = self.issued is not None and now > (self.issued.not_before + self.issued.not_after) / 2
        if wanted == self.ips and self.current is not None and not half and not force:
            return
        issued = self.pki.ca.issue_server_cert(list(wanted), CONTROL_CERT_TTL_S, now)
        self.rebuild(issued)
        self.ips = wanted
        log.info("control_certificate_issued", ips=list(wanted), serial=f"{issued.serial:x}")

    def rebuild(self, issued: IssuedCert | None = None) -> None:
        """New inner context: the certificate (new or kept) and the current trust bundle."""
        issued = issued or self.issued
        if issued is None:
            return
        ctx = self._base()
        ctx.load_verify_locations(cadata=self.pki.ca.bundle_pem.decode("ascii"))
        if not _load_via_memfd(ctx, issued.full_chain_pem, issued.key_pem):
            _load_via_tempdir(ctx, issued.full_chain_pem, issued.key_pem)
        self.issued = issued
        self.current = ctx


@dataclass
class Rotation:
    """Progress of `meshctl certs rotate [--root]` (GET /v1/certs/rotation)."""

    kind: str
    state: str = "running"            # running | done | failed
    step: str = "starting"
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    pending: list[str] = field(default_factory=list)
    old_root: str | None = None
    new_root: str | None = None
    renewed: int = 0
    error: str | None = None
    log: list[dict] = field(default_factory=list)

    def note(self, step: str, detail: str = "") -> None:
        self.step = step
        self.log.append({"at": round(time.time(), 3), "step": step, "detail": detail})
        log.info("rotation_step", kind=self.kind, step=step, detail=detail)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "state": self.state, "step": self.step, "started_at": self.started_at,
                "finished_at": self.finished_at, "pending": list(self.pending), "old_root": self.old_root,
                "new_root": self.new_root, "renewed": self.renewed, "error": self.error, "log": list(self.log)}


class Pki:
    """The CA and everything meshd signs, with what it knows of every issued certificate."""

    def __init__(self, state_dir: str, trust_domain: str, store: Store, cert_ttl: str = "24h",
                 env: dict[str, str] | None = None, clock: Callable[[], float] = time.time,
                 rand: Callable[[], float] = random.random, gateway_hosts: tuple[str, ...] = ("localhost",)):
        self.store = store
        self.clock = clock
        self.rand = rand
        self.trust_domain = trust_domain
        self.cert_ttl_s = parse_duration(cert_ttl, bare_seconds=True)   # MESH_CERT_TTL took seconds
        if self.cert_ttl_s <= 0:
            raise ValueError(f"{cert_ttl!r} is not a positive duration")
        self.gateway_hosts = gateway_hosts
        self.ca, self.user_supplied = load_ca(state_dir, trust_domain, env or {}, clock())
        self.state_dir = state_dir
        self.bundle_version = int(store.get(BUNDLE_VERSION_KEY, 1))
        self.control_tls = ControlTls(self)
        self.rotation: Rotation | None = None
        self._rotation_task: asyncio.Task | None = None

    # ---- identities ------------------------------------------------------------------------

    @property
    def gateway_identity(self) -> str:
        return spiffe_id(self.trust_domain, GATEWAY_NAMESPACE, GATEWAY_SERVICE)

    def workload_identity(self, namespace: str, service: str) -> str:
        return spiffe_id(self.trust_domain, namespace, service)

    # ---- bootstrap tokens ------------------------------------------------------------------

    def _tokens(self) -> dict:
        return dict(self.store.get(TOKENS_KEY, {}) or {})

    def issue_token(self, kind: str, node: str, container: str) -> str:
        """A new one-time token for a node about to be created; only its hash is stored."""
        token = secrets.token_urlsafe(32)
        rec = TokenRecord(node=node, kind=kind, container=container, token_hash=hash_token(token),
                          created_at=self.clock())
        tokens = self._tokens()
        tokens[node] = rec.to_dict()
        self.store.put(TOKENS_KEY, tokens)
        return token

    def set_node_container(self, node: str, container_id: str) -> None:
        tokens = self._tokens()
        if node in tokens:
            tokens[node]["node_container"] = container_id
            self.store.put(TOKENS_KEY, tokens)

    def token_record(self, node: str) -> TokenRecord | None:
        raw = self._tokens().get(node)
        return TokenRecord.from_dict(raw) if raw else None

    def mark_used(self, node: str) -> None:
        tokens = self._tokens()
        if node in tokens:
            tokens[node]["used_at"] = self.clock()
            self.store.put(TOKENS_KEY, tokens)

    def forget_node(self, node: str) -> None:
        tokens = self._tokens()
        if tokens.pop(node, None) is not None:
            self.store.put(TOKENS_KEY, tokens)

    # ---- signing ---------------------------------------------------------------------------

    def _certs(self) -> dict:
        return dict(self.store.get(CERTS_KEY, {}) or {})

    def sign_workload(self, node: str, kind: str, container: str, csr_pem: str, identity: str) -> Certs:
        """Sign a node's CSR for `identity` (what meshd knows it to be); raises CsrRejected."""
        now = self.clock()
        issued = self.ca.sign_csr(csr_pem.encode("ascii"), identity, self.cert_ttl_s, now)
        renew = compute_renew_at(now, issued.not_after, self.rand())
        certs = self._certs()
        old = certs.get(node) or {}
        serials = ([f"{issued.serial:x}"] + [s for s in old.get("serials", [])])[:KEEP_SERIALS]
        certs[node] = {"node": node, "kind": kind, "container": container, "identity": identity,
                       "serial": f"{issued.serial:x}", "issuer": _issuer_name(issued.cert_pem),
                       "issued_at": now, "not_before": issued.not_before, "not_after": issued.not_after,
                       "renew_at": renew, "serials": serials, "renewals": int(old.get("renewals", -1)) + 1}
        self.store.put(CERTS_KEY, certs)
        log.info("certificate_issued", node=node, identity=identity, serial=f"{issued.serial:x}",
                 not_after=issued.not_after)
        return Certs(cert_chain=issued.full_chain_pem.decode("ascii"), bundle=self.ca.bundle_pem.decode("ascii"),
                     not_after=issued.not_after, renew_at=renew)

    def sign_gateway_server(self, csr_pem: str) -> Certs:
        """The gateway's HTTPS certificate for the configured host names (MESH_GATEWAY_HOSTS)."""
        now = self.clock()
        issued = self.ca.sign_server_csr(csr_pem.encode("ascii"), self.gateway_hosts,
                                         min(GATEWAY_SERVER_TTL_S, self.ca.not_after - now - 1), now)
        log.info("gateway_server_certificate_issued", names=list(self.gateway_hosts), serial=f"{issued.serial:x}")
        return Certs(cert_chain=issued.full_chain_pem.decode("ascii"), bundle=self.ca.bundle_pem.decode("ascii"),
                     not_after=issued.not_after, purpose="gateway-server")

    def cert_record(self, node: str) -> dict | None:
        return self._certs().get(node)

    def cert_known(self, node: str, serial: int) -> bool:
        rec = self._certs().get(node)
        return rec is not None and f"{serial:x}" in rec.get("serials", [])

    def forget_cert(self, node: str) -> None:
        certs = self._certs()
        if certs.pop(node, None) is not None:
            self.store.put(CERTS_KEY, certs)

    def describe(self, connected: dict[str, bool] | None = None) -> dict:
        """GET /v1/certs."""
        now = self.clock()
        identities = []
        for node, rec in sorted(self._certs().items()):
            identities.append({k: rec.get(k) for k in ("node", "kind", "identity", "serial", "issuer",
                                                       "issued_at", "not_before", "not_after", "renew_at",
                                                       "renewals")}
                              | {"expired": rec.get("not_after", 0) <= now,
                                 "connected": (connected or {}).get(node)})
        roots = [{"name": _root_name(r), "serial": f"{r.serial_number:x}",
                  "not_after": r.not_valid_after_utc.timestamp()} for r in self.ca.roots]
        return {"trust_domain": self.trust_domain, "cert_ttl_s": self.cert_ttl_s,
                "user_supplied_ca": self.user_supplied, "signing": _root_name(self.ca.certificate),
                "roots": roots, "bundle_version": self.bundle_version, "identities": identities,
                "rotation": self.rotation.to_dict() if self.rotation else None,
                "interrupted_root_rotation": self.interrupted_root_rotation()}

    # ---- rotations -------------------------------------------------------------------------

    def start_rotation(self, hub, root: bool, resumed: dict | None = None) -> Rotation:
        """Start a leaf rotation (every node renews now) or a root rotation, or resume the root
        rotation a stopped meshd left at `resumed`; raises RuntimeError."""
        if self.rotation is not None and self.rotation.state == "running":
            raise RuntimeError("a rotation is already running")
        if root and self.user_supplied:
            raise RuntimeError("the CA is user-supplied (MESH_CA_*): rotate it outside meshd and restart")
        if root and resumed is None:
            resumed = self.interrupted_root_rotation()   # a failed or interrupted one is finished first
        self.rotation = Rotation(kind="root" if root else "leaf")
        self._rotation_task = asyncio.ensure_future(self._run_rotation(hub, self.rotation, resumed))
        return self.rotation

    def interrupted_root_rotation(self) -> dict | None:
        """The root rotation a previous meshd left unfinished (its persisted phase), if any."""
        rec = self.store.get(ROOT_ROTATION_KEY)
        return dict(rec) if isinstance(rec, dict) and rec.get("phase") in ROOT_PHASES else None

    async def resume_root_rotation(self, hub, after_s: float = RESUME_AFTER_S) -> None:
        """Finish an interrupted root rotation once the nodes have had `after_s` to reconnect."""
        rec = self.interrupted_root_rotation()
        if rec is None or self.user_supplied:
            return
        await asyncio.sleep(after_s)
        try:
            self.start_rotation(hub, root=True, resumed=rec)
        except RuntimeError:
            return   # `meshctl certs rotate --root` resumed it meanwhile
        log.info("rotation_resumed", phase=rec["phase"], old_root=rec.get("old_root"), new_root=rec.get("new_root"))

    async def _wait(self, rot: Rotation, hub, done: Callable[[Any], bool], what: str) -> None:
        deadline = time.monotonic() + WAIT_STEP_S
        while True:
            pending = [n.node for n in hub.nodes.values() if n.connected and n.authenticated and not done(n)]
            rot.pending = sorted(pending)
            if not pending:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: no answer from {', '.join(sorted(pending))}")
            await asyncio.sleep(0.05)

    async def _renew_all(self, rot: Rotation, hub, reason: str) -> None:
        since = self.clock()
        await hub.broadcast(Renew(reason=reason))

        def renewed(n) -> bool:
            rec = self.cert_record(n.node)
            return rec is not None and rec.get("issued_at", 0) >= since

        await self._wait(rot, hub, renewed, "renewal")
        rot.renewed = sum(1 for n in hub.nodes.values() if n.connected and renewed(n))

    async def _push_bundle(self, rot: Rotation, hub) -> None:
        self.bundle_version += 1
        self.store.put(BUNDLE_VERSION_KEY, self.bundle_version)
        version = self.bundle_version
        self.control_tls.rebuild()
        await hub.broadcast(Bundle(version=version, bundle=self.ca.bundle_pem.decode("ascii")))
        await self._wait(rot, hub, lambda n: (n.bundle_acked or 0) >= version, f"bundle {version}")

    def _save_phase(self, rot: Rotation, phase: str) -> None:
        self.store.put(ROOT_ROTATION_KEY, {"phase": phase, "old_root": rot.old_root, "new_root": rot.new_root,
                                           "started_at": rot.started_at})

    async def _rotate_root(self, rot: Rotation, hub, resumed: dict | None) -> None:
        """Old+new roots to every node, sign with the new root, renew every node, retire the old
        root. Each phase is persisted before it runs, so a restarted meshd resumes where it stopped."""
        staged_dir = os.path.join(self.state_dir, STAGED_CA_DIR)
        ca_dir = os.path.join(self.state_dir, "ca")
        phase = resumed["phase"] if resumed else ROOT_PHASES[0]
        if resumed:
            rot.old_root, rot.new_root = resumed.get("old_root"), resumed.get("new_root")
            rot.started_at = float(resumed.get("started_at") or rot.started_at)
            rot.note("resumed", f"after a meshd restart, at {phase}")
        at = ROOT_PHASES.index(phase)
        staged = None
        if at == 0:
            if resumed and os.path.exists(os.path.join(staged_dir, "ca.key")):
                staged = CertificateAuthority.load(staged_dir, self.trust_domain)
            else:
                rot.old_root = _root_name(self.ca.roots[0])
                staged = CertificateAuthority.create(self.trust_domain, self.clock())
                rot.new_root = _root_name(staged.certificate)
                staged.save(staged_dir)
                self._save_phase(rot, "distributing_bundle")
            self.ca.add_root(staged.certificate)
            self.ca.save(ca_dir)
            rot.note("distributing_bundle", f"old+new roots to every node ({rot.old_root} + {rot.new_root})")
            await self._push_bundle(rot, hub)
            self._save_phase(rot, "switching_signer")
            at = 1
        if at == 1:
            rot.note("switching_signer", f"new leaves are signed by {rot.new_root}")
            self.ca.adopt(staged or CertificateAuthority.load(staged_dir, self.trust_domain))
            self.ca.save(ca_dir)
            self.control_tls.ensure(list(self.control_tls.ips), force=True)
            self._save_phase(rot, "renewing")
        if at <= 2:
            rot.note("renewing", "every connected node renews under the new root")
            await self._renew_all(rot, hub, "root rotation")
            self._save_phase(rot, "retiring_old_root")
        rot.note("retiring_old_root", f"bundle with {rot.new_root} only")
        self.ca.retire_old_roots()
        self.ca.save(ca_dir)
        await self._push_bundle(rot, hub)
        self.store.put(ROOT_ROTATION_KEY, None)
        shutil.rmtree(staged_dir, ignore_errors=True)

    async def _run_rotation(self, hub, rot: Rotation, resumed: dict | None = None) -> None:
        try:
            if rot.kind == "leaf":
                rot.note("renewing", "every connected node renews its certificate now")
                await self._renew_all(rot, hub, "leaf rotation")
            else:
                await self._rotate_root(rot, hub, resumed)
            rot.state = "done"
            rot.note("done")
        except Exception as exc:  # noqa: BLE001 - reported through the admin API
            rot.state = "failed"
            rot.error = str(exc) or type(exc).__name__
            rot.note("failed", rot.error)
        finally:
            rot.finished_at = time.time()

__all__ = ["Pki", "ControlTls", "Rotation", "load_ca", "CsrRejected", "GATEWAY_NAMESPACE"]
