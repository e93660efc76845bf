"""The one place a node's TLS material lives, and the ssl contexts built from it.

Policy of every context: TLS 1.3 only, certificates required both ways and verified against the
mesh trust bundle (X.509 strict mode), ALPN `http/1.1`, no session tickets (no resumption that
would skip a fresh certificate check). Host name checking is off: the mesh checks the peer's
SPIFFE ID (URI SAN) instead, with `peer_identity` + `meshcore.identity.match_identity`.

The stdlib `ssl` module loads certificate chains only from files. The PEM is handed to OpenSSL
through anonymous in-memory files (`memfd_create`, read via `/proc/self/fd/N`) that are closed
right after loading, so the key never touches a file system; where that is not available, through
a private temporary directory (mode 0700, files 0600, on /dev/shm when present) removed at once.
Key material is never logged and is excluded from `repr(TlsMaterial)`.
"""

from __future__ import annotations

import os
import ssl
import threading
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from meshcore.identity import SCHEME, is_spiffe_id

# ALPN (RFC 7301). A mesh server offers HTTP/2 (RFC 9113 3.2) first: a client that offers "h2" gets
# it, any other gets HTTP/1.1. Clients offer "http/1.1" alone, except the HTTP/2 hop's context.
ALPN_PROTOCOLS = ["http/1.1"]
ALPN_SERVER = ["h2", "http/1.1"]
ALPN_H2_CLIENT = ["h2", "http/1.1"]


@dataclass(frozen=True)
class TlsMaterial:
    """A node's certificate chain (leaf first), private key, trust bundle, and what the leaf says."""

    cert_chain_pem: bytes
    key_pem: bytes = field(repr=False)
    bundle_pem: bytes
    identity: str
    not_before: float
    not_after: float
    serial: int
    # The leaf's DER SubjectPublicKeyInfo when known (certs.store fills it in): matches a certificate
    # to this key without parsing the key. Not part of equality.
    spki: bytes = field(default=b"", repr=False, compare=False)


class _State(NamedTuple):
    version: int
    material: TlsMaterial
    server: ssl.SSLContext
    client: ssl.SSLContext
    client_h2: ssl.SSLContext



def _refuse_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key.
    raise ValueError("encrypted private keys are not supported")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _load_via_memfd(ctx: ssl.SSLContext, chain_pem: bytes, key_pem: bytes) -> bool:
    if not hasattr(os, "memfd_create") or not os.path.isdir("/proc/self/fd"):
        return False
    fds: list[int] = []
    try:
        for name, data in (("mesh-cert", chain_pem), ("mesh-key", key_pem)):
            fd = os.memfd_create(name, os.MFD_CLOEXEC)
            fds.append(fd)
            _write_all(fd, data)
        ctx.load_cert_chain(f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}", password=_refuse_password)
        return True
    except OSError as exc:
        if isinstance(exc, ssl.SSLError):
            raise
        return False  # e.g. /proc not readable: use the temporary directory instead
    finally:
        for fd in fds:
            os.close(fd)


def _load_via_tempdir(ctx: ssl.SSLContext, chain_pem: bytes, key_pem: bytes) -> None:
    # Imported here: only this fallback needs them, and they cost every node ~0.9 MiB (shutil
    # brings bz2 and lzma).
    import shutil
    import tempfile

    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    d = tempfile.mkdtemp(prefix="mesh-tls-", dir=base)  # mode 0700
    try:
        paths = []
        for name, data in (("cert.pem", chain_pem), ("key.pem", key_pem)):
            path = os.path.join(d, name)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                _write_all(fd, data)
            finally:
                os.close(fd)
            paths.append(path)
        ctx.load_cert_chain(paths[0], paths[1], password=_refuse_password)
    finally:
        shutil.rmtree(d, ignore_errors=True)


class DirectSSLObject(ssl.SSLObject):
    """An SSLObject whose read, write and pending are the C methods of the connection itself.

    ssl.SSLObject's are Python methods that only pass their arguments on (`self._sslobj.read(len,
    buffer)`), and an event loop's TLS transport calls them several times per record read (pending,
    read until SSLWantReadError) and once per write: a Python frame each, on every request of a
    mesh hop. Bound here as instance attributes, with the same positional arguments and results.
    """

    @classmethod
    def _create(cls, *args: Any, **kwargs: Any) -> "DirectSSLObject":
        self = super()._create(*args, **kwargs)
        inner = self._sslobj
        self.read = inner.read
        self.write = inner.write
        self.pending = inner.pending
        return self


def _base_context(server_side: bool, alpn: list[str] | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    ctx.sslobject_class = DirectSSLObject
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if not server_side:
        ctx.check_hostname = False  # identity is the URI SAN, checked by the caller
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.set_alpn_protocols(alpn or (ALPN_SERVER if server_side else ALPN_PROTOCOLS))
    if server_side:
        ctx.num_tickets = 0
    return ctx


def build_context(material: TlsMaterial, server_side: bool, alpn: list[str] | None = None) -> ssl.SSLContext:
    """A TLS 1.3 mTLS context for `material` (ALPN offer `alpn`, else the side's default); raises
    ValueError when the material does not load."""
    ctx = _base_context(server_side, alpn)
    try:
        ctx.load_verify_locations(cadata=material.bundle_pem.decode("ascii"))
        if not _load_via_memfd(ctx, material.cert_chain_pem, material.key_pem):
            _load_via_tempdir(ctx, material.cert_chain_pem, material.key_pem)
    except (ssl.SSLError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "reason", None) or type(exc).__name__
        raise ValueError(f"TLS material does not load ({reason}); check that the key matches the "
                         "certificate and that the bundle is PEM") from None
    return ctx


class TlsHolder:
    """Holds the current TlsMaterial and the contexts built for it; `update` swaps all atomically.

    `server_context()` returns one stable "front" context to give to a listening socket once
    (`asyncio.start_server(..., ssl=holder.server_context())`). Its `sni_callback`, which OpenSSL
    runs on every ClientHello (with or without SNI), switches the connection to the context built
    for the current material (`ssl_obj.context = current`). So after `update()` the next handshake
    presents the new certificate and verifies against the new bundle, with no restart of the
    listener; connections already established keep the material they started with. The front
    context itself carries no certificate, so if the swap did not happen the handshake would fail
    rather than serve stale material. Until the first `update()` handshakes are refused.

    `client_context()` returns the context of the current material; take it per connection.
    Contexts are built once per `update()` (building also validates the material: a bad one raises
    ValueError and the holder keeps what it had).
    """

    def __init__(self, material: TlsMaterial | None = None):
        self._lock = threading.Lock()
        self._state: _State | None = None
        self._version = 0
        self._front = _base_context(server_side=True)
        self._front.sni_callback = self._select_context
        if material is not None:
            self.update(material)

    def update(self, material: TlsMaterial) -> int:
        """Install new material; returns its version number (1, 2, ...)."""
        server = build_context(material, server_side=True)
        client = build_context(material, server_side=False)
        client_h2 = build_context(material, server_side=False, alpn=ALPN_H2_CLIENT)
        with self._lock:
            self._version += 1
            self._state = _State(self._version, material, server, client, client_h2)  # one reference swap
            return self._version

    def _select_context(self, ssl_obj: Any, server_name: str | None, ctx: ssl.SSLContext) -> int | None:
        state = self._state
        if state is None:
            return ssl.ALERT_DESCRIPTION_HANDSHAKE_FAILURE
        ssl_obj.context = state.server
        return None

    def _current(self) -> _State:
        state = self._state
        if state is None:
            raise RuntimeError("no TLS material yet")
        return state

    @property
    def material(self) -> TlsMaterial | None:
        state = self._state
        return state.material if state else None

    @property
    def version(self) -> int:
        """0 before the first update, then the number of updates."""
        state = self._state
        return state.version if state else 0

    def server_context(self) -> ssl.SSLContext:
        """The stable front context for listeners (see the class docstring); never changes."""
        return self._front

    def current_server_context(self) -> ssl.SSLContext:
        """The server context of the current material (what the front switches to)."""
        return self._current().server

    def client_context(self) -> ssl.SSLContext:
        """The client context of the current material; raises RuntimeError before the first update."""
        return self._current().client

    def client_context_h2(self) -> ssl.SSLContext:
        """client_context offering ALPN h2 before http/1.1 (the HTTP/2 hop between sidecars)."""
        return self._current().client_h2


def peer_uris(ssl_object: Any) -> list[str]:
    """The URI SANs of the peer's verified certificate (empty when there is none)."""
    cert = ssl_object.getpeercert() if ssl_object is not None else None
    if not cert:
        return []
    return [value for kind, value in cert.get("subjectAltName", ()) if kind == "URI"]


def peer_identity(ssl_object: Any) -> str | None:
    """The peer's SPIFFE ID from its verified certificate, or None (no, several, or invalid)."""
    ids = [u for u in peer_uris(ssl_object) if u[:len(SCHEME)].lower() == SCHEME]
    if len(ids) != 1 or not is_spiffe_id(ids[0]):
        return None
    return ids[0]
