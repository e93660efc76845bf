"""The mesh CA: CSR checks, leaf contents, validity math, storage, root rotation, user-supplied CAs."""

from __future__ import annotations

import os
import stat
from datetime import datetime, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from certs.ca import CLOCK_SKEW_S, CertificateAuthority, CsrRejected, IssuedCert
from certs.keys import build_csr, generate_key, load_key

TD = "mesh.local"
WEB = "spiffe://mesh.local/ns/shop/sa/web"
DB = "spiffe://mesh.local/ns/shop/sa/db"
NOW = 1_700_000_000.0
HOUR = 3600.0


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create(TD, NOW)


def _csr(key, names, subject=x509.Name([])) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=True)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _verify(roots, leaf_pem: bytes, chain_pem: bytes = b"", at: float = NOW + 10):
    """Verify a workload leaf as a TLS client certificate with cryptography's verifier."""
    leaf = x509.load_pem_x509_certificate(leaf_pem)
    intermediates = x509.load_pem_x509_certificates(chain_pem) if chain_pem else []
    verifier = (PolicyBuilder().store(Store(list(roots)))
                .time(datetime.fromtimestamp(at, tz=timezone.utc)).build_client_verifier())
    return verifier.verify(leaf, intermediates)


def test_csr_accepted_and_leaf_is_a_workload_svid(ca):
    key, _ = generate_key()
    issued = ca.sign_csr(build_csr(key, WEB), WEB, HOUR, NOW)
    leaf = x509.load_pem_x509_certificate(issued.cert_pem)
    assert leaf.serial_number == issued.serial
    assert leaf.public_key().public_numbers() == key.public_key().public_numbers()
    ext = leaf.extensions
    bc = ext.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False
    ku = ext.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    eku = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    san = ext.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical  # empty subject => SAN must be critical (RFC 5280 4.2.1.6)
    assert list(san.value) == [x509.UniformResourceIdentifier(WEB)]
    assert leaf.subject == x509.Name([])
    assert leaf.issuer == ca.certificate.subject
    assert issued.chain_pem == b""  # the root signs directly
    assert issued.full_chain_pem == issued.cert_pem


def test_leaf_chains_to_root(ca):
    key, _ = generate_key()
    issued = ca.sign_csr(build_csr(key, WEB), WEB, HOUR, NOW)
    verified = _verify(ca.roots, issued.cert_pem)
    assert verified.chain[-1] == ca.certificate
    assert list(verified.subjects) == [x509.UniformResourceIdentifier(WEB)]
    other = CertificateAuthority.create(TD, NOW)
    with pytest.raises(VerificationError):
        _verify(other.roots, issued.cert_pem)


def test_csr_for_another_identity_rejected(ca):
    key, key_pem = generate_key()
    with pytest.raises(CsrRejected) as err:
        ca.sign_csr(build_csr(key, DB), WEB, HOUR, NOW)
    assert "spiffe://mesh.local/ns/shop/sa/db" in err.value.reason and WEB in err.value.reason
    assert "PRIVATE KEY" not in str(err.value) and key_pem.decode() not in str(err.value)


def test_csr_with_two_uri_sans_rejected(ca):
    key, _ = generate_key()
    csr = _csr(key, [x509.UniformResourceIdentifier(WEB), x509.UniformResourceIdentifier(DB)])
    with pytest.raises(CsrRejected, match="exactly one URI SAN, it requests 2"):
        ca.sign_csr(csr, WEB, HOUR, NOW)


@pytest.mark.parametrize("names, problem", [
    ([], "no subjectAltName"),
    ([x509.DNSName("web")], "exactly one URI SAN, it requests 0"),
    ([x509.UniformResourceIdentifier(WEB), x509.DNSName("evil.example.com")], "names other than"),
])
def test_csr_with_wrong_names_rejected(ca, names, problem):
    key, _ = generate_key()
    with pytest.raises(CsrRejected, match=problem):
        ca.sign_csr(_csr(key, names), WEB, HOUR, NOW)


def test_tampered_csr_rejected(ca):
    """A valid CSR whose requested identity was edited in transit fails its signature check."""
    key, _ = generate_key()
    der = x509.load_pem_x509_csr(build_csr(key, WEB)).public_bytes(serialization.Encoding.DER)
    forged_id = WEB[:-3] + "wex"
    assert der.count(WEB.encode()) == 1
    tampered = x509.load_der_x509_csr(der.replace(WEB.encode(), forged_id.encode()))
    pem = tampered.public_bytes(serialization.Encoding.PEM)
    with pytest.raises(CsrRejected, match="signature does not verify"):
        ca.sign_csr(pem, forged_id, HOUR, NOW)


@pytest.mark.parametrize("payload, problem", [
    (b"not a csr", "not a PEM certificate signing request"),
    (b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", "not a PEM"),
    (b"x" * 20_000, "larger than"),
    ("a string", "PEM bytes"),
])
def test_garbage_rejected(ca, payload, problem):
    with pytest.raises(CsrRejected, match=problem):
        ca.sign_csr(payload, WEB, HOUR, NOW)


def test_non_ec_csr_rejected(ca):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(CsrRejected, match="EC P-256"):
        ca.sign_csr(_csr(key, [x509.UniformResourceIdentifier(WEB)]), WEB, HOUR, NOW)


@pytest.mark.parametrize("expected_id, problem", [
    ("spiffe://other.domain/ns/shop/sa/web", "outside trust domain"),
    ("spiffe://mesh.local/ns/shop/sa/web/", "empty segment"),
])
def test_bad_expected_id_is_a_caller_error(ca, expected_id, problem):
    key, _ = generate_key()
    with pytest.raises(ValueError, match=problem) as err:
        ca.sign_csr(build_csr(key, WEB), expected_id, HOUR, NOW)
    assert not isinstance(err.value, CsrRejected)


def test_expiry_math_with_fixed_now(ca):
    now = NOW + 1234.7  # fractions of a second are cut (X.509 times have whole seconds)
    key, _ = generate_key()
    issued = ca.sign_csr(build_csr(key, WEB), WEB, HOUR, now)
    leaf = x509.load_pem_x509_certificate(issued.cert_pem)
    assert issued.not_before == NOW + 1234 - CLOCK_SKEW_S == NOW + 1174
    assert issued.not_after == NOW + 1234 + HOUR
    assert leaf.not_valid_before_utc.timestamp() == issued.not_before
    assert leaf.not_valid_after_utc.timestamp() == issued.not_after


def test_leaf_never_outlives_the_ca():
    short = CertificateAuthority.create(TD, NOW, ttl_s=2 * HOUR)
    key, _ = generate_key()
    issued = short.sign_csr(build_csr(key, WEB), WEB, 10 * HOUR, NOW)
    assert issued.not_after == short.not_after == NOW + 2 * HOUR
    with pytest.raises(ValueError, match="expired"):
        short.sign_csr(build_csr(key, WEB), WEB, HOUR, NOW + 3 * HOUR)


@pytest.mark.parametrize("ttl", [0.0, -5.0, float("nan"), float("inf")])
def test_bad_ttl_rejected(ca, ttl):
    key, _ = generate_key()
    with pytest.raises(ValueError, match="ttl_s"):
        ca.sign_csr(build_csr(key, WEB), WEB, ttl, NOW)


def test_root_certificate_profile(ca):
    root = ca.certificate
    bc = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = root.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey) and root.public_key().curve.name == "secp256r1"
    assert root.not_valid_before_utc.timestamp() == NOW - CLOCK_SKEW_S
    assert root.not_valid_after_utc.timestamp() == NOW + 10 * 365 * 86400
    assert x509.load_pem_x509_certificates(ca.bundle_pem) == [root]


def test_save_writes_key_0600_and_load_round_trips(tmp_path):
    ca = CertificateAuthority.create(TD, NOW)
    old_umask = os.umask(0)  # the mode must not depend on the process umask
    try:
        ca.save(tmp_path / "ca")
    finally:
        os.umask(old_umask)
    key_mode = stat.S_IMODE(os.stat(tmp_path / "ca" / "ca.key").st_mode)
    assert key_mode == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "ca").st_mode) & 0o077 == 0
    assert b"PRIVATE KEY" in (tmp_path / "ca" / "ca.key").read_bytes()
    loaded = CertificateAuthority.load(tmp_path / "ca")
    assert loaded.bundle_pem == ca.bundle_pem and loaded.cert_pem == ca.cert_pem
    key, _ = generate_key()
    issued = loaded.sign_csr(build_csr(key, WEB), WEB, HOUR, NOW)
    _verify(ca.roots, issued.cert_pem)


def test_load_refuses_a_group_readable_key(tmp_path):
    CertificateAuthority.create(TD, NOW).save(tmp_path)
    os.chmod(tmp_path / "ca.key", 0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        CertificateAuthority.load(tmp_path)


def test_root_rotation_bundle_verifies_leaves_of_both_roots(tmp_path):
    ca = CertificateAuthority.create(TD, NOW)
    old_root = ca.certificate
    k1, _ = generate_key()
    old_leaf = ca.sign_csr(build_csr(k1, WEB), WEB, HOUR, NOW)

    ca.rotate(NOW + 60)
    assert ca.certificate != old_root
    bundle = x509.load_pem_x509_certificates(ca.bundle_pem)
    assert bundle == [ca.certificate, old_root]  # new first, old kept for the overlap
    k2, _ = generate_key()
    new_leaf = ca.sign_csr(build_csr(k2, DB), DB, HOUR, NOW + 60)
    assert _verify(bundle, old_leaf.cert_pem, at=NOW + 120).chain[-1] == old_root
    assert _verify(bundle, new_leaf.cert_pem, at=NOW + 120).chain[-1] == ca.certificate

    ca.save(tmp_path)  # the overlap survives a restart
    assert CertificateAuthority.load(tmp_path).bundle_pem == ca.bundle_pem

    ca.retire_old_roots()
    assert x509.load_pem_x509_certificates(ca.bundle_pem) == [ca.certificate]
    with pytest.raises(VerificationError):
        _verify(ca.roots, old_leaf.cert_pem, at=NOW + 120)
    _verify(ca.roots, new_leaf.cert_pem, at=NOW + 120)


def _user_pki():
    """A user's root and an intermediate it signed (as an enterprise PKI would hand over)."""
    def cert(subject_key, issuer_key, subject, issuer, pathlen):
        return (x509.CertificateBuilder()
                .subject_name(subject).issuer_name(issuer).public_key(subject_key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(datetime.fromtimestamp(NOW - 86400, tz=timezone.utc))
                .not_valid_after(datetime.fromtimestamp(NOW + 365 * 86400, tz=timezone.utc))
                .add_extension(x509.BasicConstraints(ca=True, path_length=pathlen), critical=True)
                .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                               critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(subject_key.public_key()), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                               critical=False)
                .sign(issuer_key, hashes.SHA256()))
    root_key, int_key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP256R1())
    root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Corp Root")])
    int_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Corp Mesh Intermediate")])
    root = cert(root_key, root_key, root_name, root_name, 1)
    inter = cert(int_key, root_key, int_name, root_name, 0)
    pem = lambda c: c.public_bytes(serialization.Encoding.PEM)  # noqa: E731
    key_pem = int_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    return root, pem(root), pem(inter), key_pem


@pytest.mark.parametrize("where", ["chain", "roots"])
def test_user_supplied_intermediate(tmp_path, where):
    root, root_pem, inter_pem, key_pem = _user_pki()
    kwargs = {"chain_pem": root_pem} if where == "chain" else {"roots_pem": root_pem}
    ca = CertificateAuthority.from_pem(inter_pem, key_pem, **kwargs)
    assert x509.load_pem_x509_certificates(ca.bundle_pem) == [root]
    key, _ = generate_key()
    issued = ca.sign_csr(build_csr(key, WEB), WEB, HOUR, NOW)
    assert issued.chain_pem == inter_pem  # the intermediate travels with the leaf
    verified = _verify([root], issued.cert_pem, issued.chain_pem)
    assert verified.chain[-1] == root and len(verified.chain) == 3
    ca.save(tmp_path)
    again = CertificateAuthority.load(tmp_path)
    assert again.bundle_pem == ca.bundle_pem
    assert again.sign_csr(build_csr(key, WEB), WEB, HOUR, NOW).chain_pem == inter_pem


def test_user_supplied_ca_is_checked():
    root, root_pem, inter_pem, key_pem = _user_pki()
    with pytest.raises(ValueError, match="no trust root"):
        CertificateAuthority.from_pem(inter_pem, key_pem)
    unrelated = CertificateAuthority.create(TD, NOW).bundle_pem
    with pytest.raises(ValueError, match="does not chain to any supplied root"):
        CertificateAuthority.from_pem(inter_pem, key_pem, roots_pem=unrelated)
    _, other_key_pem = generate_key()
    with pytest.raises(ValueError, match="does not match"):
        CertificateAuthority.from_pem(inter_pem, other_key_pem, chain_pem=root_pem)
    ca = CertificateAuthority.create(TD, NOW)
    key, key_pem2 = generate_key()
    leaf = ca.sign_csr(build_csr(key, WEB), WEB, HOUR, NOW)
    with pytest.raises(ValueError, match="not a CA certificate"):
        CertificateAuthority.from_pem(leaf.cert_pem, key_pem2, roots_pem=ca.bundle_pem)


def test_issue_server_cert_for_the_gateway(ca):
    issued = ca.issue_server_cert(["gateway.example.com", "*.apps.example.com", "192.0.2.7"], HOUR, NOW)
    leaf = x509.load_pem_x509_certificate(issued.cert_pem)
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["gateway.example.com", "*.apps.example.com"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["192.0.2.7"]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    key = load_key(issued.key_pem)
    assert key.public_key().public_numbers() == leaf.public_key().public_numbers()
    assert "PRIVATE" not in repr(issued) and issued.key_pem.decode() not in repr(issued)
    verifier = (PolicyBuilder().store(Store(list(ca.roots)))
                .time(datetime.fromtimestamp(NOW + 10, tz=timezone.utc))
                .build_server_verifier(x509.DNSName("gateway.example.com")))
    verifier.verify(leaf, [])


@pytest.mark.parametrize("names", [[], "gateway.example.com", ["bad name"], ["-x.example.com"]])
def test_issue_server_cert_rejects_bad_names(ca, names):
    with pytest.raises(ValueError):
        ca.issue_server_cert(names, HOUR, NOW)


def test_issued_cert_type():
    issued = IssuedCert(b"c", b"i", 1, 0.0, 1.0)
    assert issued.full_chain_pem == b"ci" and issued.key_pem == b""


def test_build_csr_rejects_invalid_ids():
    key, _ = generate_key()
    with pytest.raises(ValueError, match="must start with"):
        build_csr(key, "http://mesh.local/x")
