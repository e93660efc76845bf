"""Mutual TLS over asyncio loopback with the TlsHolder contexts (real OpenSSL handshakes)."""

from __future__ import annotations

import asyncio
import os
import ssl
import stat
import time

import pytest

from certs.ca import CertificateAuthority
from certs.holder import TlsHolder, TlsMaterial, build_context, peer_identity
from certs.keys import build_csr, generate_key
from certs.store import load_material, material_from_pem, save_material
from meshcore.identity import match_identity

TD = "mesh.local"
WEB = "spiffe://mesh.local/ns/shop/sa/web"
DB = "spiffe://mesh.local/ns/shop/sa/db"
GUARD_S = 10  # upper bound against hangs only; nothing waits on it when the test passes


def _now() -> float:
    return time.time()  # OpenSSL checks validity against the real clock


def material(ca: CertificateAuthority, sid: str, bundle_pem: bytes | None = None) -> TlsMaterial:
    key, key_pem = generate_key()
    issued = ca.sign_csr(build_csr(key, sid), sid, 3600, _now())
    return TlsMaterial(cert_chain_pem=issued.full_chain_pem, key_pem=key_pem,
                       bundle_pem=ca.bundle_pem if bundle_pem is None else bundle_pem,
                       identity=sid, not_before=issued.not_before, not_after=issued.not_after,
                       serial=issued.serial)


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create(TD, _now())


class Server:
    """A TLS listener that answers each accepted connection with what it saw of the client."""

    def __init__(self, holder: TlsHolder):
        self.holder = holder
        self.seen: list[str | None] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Server:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0,
                                                 ssl=self.holder.server_context())
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        await self.server.wait_closed()

    @property
    def port(self) -> int:
        return self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sslobj = writer.get_extra_info("ssl_object")
        identity = peer_identity(sslobj)
        self.seen.append(identity)
        writer.write(f"{identity}|{sslobj.version()}|{sslobj.selected_alpn_protocol()}".encode())
        await writer.drain()
        writer.close()


async def talk(port: int, ctx: ssl.SSLContext, sni: str | None = None):
    """Connect, read the server's answer; returns (answer, server identity, server serial)."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=sni), GUARD_S)
    try:
        answer = await asyncio.wait_for(reader.read(), GUARD_S)
        sslobj = writer.get_extra_info("ssl_object")
        return answer.decode(), peer_identity(sslobj), int(sslobj.getpeercert()["serialNumber"], 16)
    finally:
        writer.close()


async def refused(port: int, ctx: ssl.SSLContext) -> BaseException | bytes:
    """Try a connection that should fail; returns the error, or what was read (b"" on a hang-up)."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=ctx), GUARD_S)
    except (ssl.SSLError, ConnectionError) as exc:
        return exc
    try:
        # TLS 1.3: the client finishes its side before the server has checked the client
        # certificate; the server's refusal arrives as an alert (or a reset) on the first read.
        return await asyncio.wait_for(reader.read(), GUARD_S)
    except (ssl.SSLError, ConnectionError) as exc:
        return exc
    finally:
        writer.close()


def plain_client(bundle_pem: bytes, **versions) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=bundle_pem.decode())
    for attr, value in versions.items():
        setattr(ctx, attr, value)
    return ctx


@pytest.mark.parametrize("sni", [None, "db.shop.mesh"])
async def test_mtls_handshake_reads_both_identities(ca, sni):
    server_holder, client_holder = TlsHolder(material(ca, DB)), TlsHolder(material(ca, WEB))
    async with Server(server_holder) as srv:
        answer, server_id, serial = await talk(srv.port, client_holder.client_context(), sni)
    assert answer == f"{WEB}|TLSv1.3|http/1.1"  # the server saw the client's SPIFFE ID
    assert server_id == DB and serial == server_holder.material.serial
    assert match_identity([server_id], {DB}) == DB
    assert srv.seen == [WEB]


async def test_client_without_certificate_refused(ca):
    async with Server(TlsHolder(material(ca, DB))) as srv:
        result = await refused(srv.port, plain_client(ca.bundle_pem))
    assert isinstance(result, BaseException) or result == b""
    assert srv.seen == []


async def test_client_with_certificate_from_another_ca_refused(ca):
    other = CertificateAuthority.create(TD, _now())
    # The intruder trusts our server, so only its own certificate can be the reason for refusal.
    intruder = build_context(material(other, WEB, bundle_pem=ca.bundle_pem), server_side=False)
    async with Server(TlsHolder(material(ca, DB))) as srv:
        result = await refused(srv.port, intruder)
    assert isinstance(result, BaseException) or result == b""
    assert srv.seen == []


async def test_server_with_certificate_from_another_ca_refused(ca):
    other = CertificateAuthority.create(TD, _now())
    client = TlsHolder(material(ca, WEB)).client_context()
    async with Server(TlsHolder(material(other, DB, bundle_pem=ca.bundle_pem))) as srv:
        result = await refused(srv.port, client)
    assert isinstance(result, ssl.SSLCertVerificationError)
    assert srv.seen == []


async def test_tls12_only_client_refused(ca):
    # A valid mesh certificate does not help: the protocol version is the problem.
    ctx = build_context(material(ca, WEB), server_side=False)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    async with Server(TlsHolder(material(ca, DB))) as srv:
        result = await refused(srv.port, ctx)
        ctx.maximum_version = ssl.TLSVersion.TLSv1_3  # control: the same client, TLS 1.3 allowed
        answer, _, _ = await talk(srv.port, ctx)
    # The server's protocol_version alert may arrive as an SSLError or be overtaken by its reset.
    assert isinstance(result, (ssl.SSLError, ConnectionError))
    if isinstance(result, ssl.SSLError):
        assert "VERSION" in str(result).upper()
    assert answer.startswith(WEB) and srv.seen == [WEB]  # only the TLS 1.3 attempt got through


async def test_update_rotates_certificate_without_restarting_the_server(ca):
    holder = TlsHolder(material(ca, DB))
    client = TlsHolder(material(ca, WEB)).client_context()
    front = holder.server_context()
    async with Server(holder) as srv:
        server, port, fd = srv.server, srv.port, srv.server.sockets[0].fileno()
        _, ident1, serial1 = await talk(port, client)
        new = material(ca, "spiffe://mesh.local/ns/shop/sa/db-v2")
        assert holder.update(new) == 2
        _, ident2, serial2 = await talk(port, client)
        _, ident3, serial3 = await talk(port, client, sni="db.shop.mesh")
        # the very same listening socket served all three handshakes
        assert srv.server is server and server.is_serving()
        assert [(s.fileno(), s.getsockname()[1]) for s in server.sockets] == [(fd, port)]
    assert holder.server_context() is front  # the listener's context object never changed
    assert (ident1, serial1) != (ident2, serial2)
    assert ident2 == ident3 == new.identity and serial2 == serial3 == new.serial


async def test_root_rotation_overlap_over_tls():
    """Nodes holding the two-root bundle accept peers from the old and the new root."""
    ca = CertificateAuthority.create(TD, _now() - 120)
    old_server = material(ca, DB)
    ca.rotate(_now() - 60)
    holder = TlsHolder(material(ca, WEB))  # new root, bundle has both roots
    async with Server(TlsHolder(TlsMaterial(old_server.cert_chain_pem, old_server.key_pem, ca.bundle_pem,
                                            DB, old_server.not_before, old_server.not_after,
                                            old_server.serial))) as srv:
        answer, server_id, _ = await talk(srv.port, holder.client_context())
    assert server_id == DB and answer.startswith(WEB)


async def test_name_constrained_root_verifies_in_openssl():
    ca = CertificateAuthority.create(TD, _now(), name_constraints=True)
    async with Server(TlsHolder(material(ca, DB))) as srv:
        answer, server_id, _ = await talk(srv.port, TlsHolder(material(ca, WEB)).client_context())
    assert server_id == DB and answer.startswith(WEB)


async def test_no_material_yet_refuses_handshakes(ca):
    holder = TlsHolder()
    with pytest.raises(RuntimeError):
        holder.client_context()
    async with Server(holder) as srv:
        result = await refused(srv.port, TlsHolder(material(ca, WEB)).client_context())
    assert isinstance(result, (ssl.SSLError, ConnectionError))
    assert srv.seen == [] and holder.version == 0


def test_bad_material_is_refused_and_old_material_kept(ca):
    good, other = material(ca, DB), material(ca, WEB)
    holder = TlsHolder(good)
    mismatched = TlsMaterial(good.cert_chain_pem, other.key_pem, good.bundle_pem, DB,
                             good.not_before, good.not_after, good.serial)
    with pytest.raises(ValueError, match="does not load") as err:
        holder.update(mismatched)
    assert "PRIVATE KEY" not in str(err.value)
    assert holder.material is good and holder.version == 1
    assert "PRIVATE" not in repr(good)


def test_contexts_policy(ca):
    holder = TlsHolder(material(ca, DB))
    for ctx in (holder.server_context(), holder.current_server_context(), holder.client_context()):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert ctx.check_hostname is False
    assert holder.client_context() is holder.client_context()  # cached until the next update
    before = holder.client_context()
    holder.update(material(ca, DB))
    assert holder.client_context() is not before


def test_store_round_trip(ca, tmp_path):
    m = material(ca, WEB)
    save_material(tmp_path / "node", m)
    assert stat.S_IMODE(os.stat(tmp_path / "node" / "key.pem").st_mode) == 0o600
    loaded = load_material(tmp_path / "node")
    assert loaded == m
    assert material_from_pem(m.cert_chain_pem, m.key_pem, m.bundle_pem).identity == WEB
    os.chmod(tmp_path / "node" / "key.pem", 0o640)
    with pytest.raises(PermissionError):
        load_material(tmp_path / "node")
