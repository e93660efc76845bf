"""The mesh certificate authority: meshd signs the workloads' CSRs with it.

Layout on disk (`save`/`load`, one directory, created mode 0700):
- `ca.key`    the signing key, PKCS#8 PEM, mode 0600 (checked on load: group/other access is refused)
- `ca.crt`    the signing certificate: meshd's own root, or a user-supplied root or intermediate
- `chain.pem` (only with a user-supplied intermediate) the certificates between `ca.crt` and the root
- `roots.pem` the trust bundle: every root the mesh trusts, current first; during a root rotation it
              holds the old and the new root so that leaves of both verify everywhere

Workload certificates (X.509-SVIDs) are EC, CA:false, keyUsage digitalSignature (TLS 1.3 only uses
the leaf key to sign; ECDHE key shares are ephemeral, so keyAgreement/keyEncipherment are not
needed), extendedKeyUsage serverAuth + clientAuth, an empty subject and exactly one URI SAN (the
SPIFFE ID, marked critical as RFC 5280 requires for empty subjects). Nothing of the CSR but its
public key and its checked SPIFFE ID is copied into the certificate.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from certs.keys import generate_key
from certs.store import write_file_atomic
from meshcore.identity import parse_spiffe_id, parse_trust_domain
from meshcore.labels import DEFAULT_TRUST_DOMAIN

DEFAULT_ROOT_TTL_S = 10 * 365 * 86400.0
CLOCK_SKEW_S = 60  # leaves start this much before `now`, for peers whose clocks run a little behind
MAX_CSR_BYTES = 16 * 1024
KEY_FILE, CERT_FILE, CHAIN_FILE, ROOTS_FILE = "ca.key", "ca.crt", "chain.pem", "roots.pem"

_ACCEPTED_CURVES = ("secp256r1", "secp384r1")
_DNS_RE = re.compile(r"^(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")


class CsrRejected(ValueError):
    """A CSR meshd will not sign; `reason` says why (never contains key material)."""

    def __init__(self, reason: str):
        super().__init__(f"CSR rejected: {reason}")
        self.reason = reason


@dataclass(frozen=True)
class IssuedCert:
    """A signed certificate. Present `cert_pem + chain_pem` (`full_chain_pem`) in TLS.

    `chain_pem` holds the intermediates between the leaf and the trust bundle's root (empty when a
    root signs directly). `key_pem` is set only when the CA generated the key (`issue_server_cert`);
    it is excluded from `repr()` so that logging an IssuedCert cannot leak it.
    """

    cert_pem: bytes
    chain_pem: bytes
    serial: int
    not_before: float
    not_after: float
    key_pem: bytes = field(default=b"", repr=False)

    @property
    def full_chain_pem(self) -> bytes:
        return self.cert_pem + self.chain_pem


def _pem(certs: Iterable[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _spki(key) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _hash_for(key) -> hashes.HashAlgorithm | None:
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    if isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        return hashes.SHA256()
    raise ValueError("the CA key must be an EC, RSA or EdDSA key")


def _utc(ts: int) -> datetime:
    return datetime.fromtimestamp(ts, tz=timezone.utc)


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def is_self_signed(cert: x509.Certificate) -> bool:
    """True for a self-issued certificate whose signature verifies with its own key (a root)."""
    return _issued_by(cert, cert)


def _load_certs(pem: bytes, what: str) -> list[x509.Certificate]:
    if not pem.strip():
        return []
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise ValueError(f"{what} is not PEM certificates") from None


def _check_signing_cert(cert: x509.Certificate, what: str) -> None:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise ValueError(f"{what} has no basicConstraints; it is not a CA certificate") from None
    if not bc.ca:
        raise ValueError(f"{what} is not a CA certificate (basicConstraints CA:false)")
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    if not ku.key_cert_sign:
        raise ValueError(f"{what} lacks the keyCertSign key usage")


def _check_name_constraints(certs: Sequence[x509.Certificate], trust_domain: str) -> None:
    """Refuse a CA whose URI name constraints would make our own leaves unverifiable."""
    for cert in certs:
        try:
            nc = cert.extensions.get_extension_for_class(x509.NameConstraints).value
        except x509.ExtensionNotFound:
            continue
        permitted = [s.value.lower() for s in (nc.permitted_subtrees or ())
                     if isinstance(s, x509.UniformResourceIdentifier)]
        excluded = [s.value.lower() for s in (nc.excluded_subtrees or ())
                    if isinstance(s, x509.UniformResourceIdentifier)]

        def hit(base: str) -> bool:
            return trust_domain == base or (base.startswith(".") and trust_domain.endswith(base))

        if (permitted and not any(hit(b) for b in permitted)) or any(hit(b) for b in excluded):
            raise ValueError(f"the CA's name constraints do not permit trust domain {trust_domain!r}")


def _checked_csr(csr_pem: bytes) -> tuple[ec.EllipticCurvePublicKey, x509.SubjectAlternativeName]:
    """The public key and SAN of a well-formed, well-signed CSR with an accepted EC key, or CsrRejected."""
    if not isinstance(csr_pem, (bytes, bytearray)):
        raise CsrRejected("CSR must be PEM bytes")
    if len(csr_pem) > MAX_CSR_BYTES:
        raise CsrRejected(f"CSR is larger than {MAX_CSR_BYTES} bytes")
    try:
        csr = x509.load_pem_x509_csr(bytes(csr_pem))
    except ValueError:
        raise CsrRejected("not a PEM certificate signing request") from None
    try:
        valid = csr.is_signature_valid
    except Exception:  # noqa: BLE001 - unsupported algorithms surface as various errors
        valid = False
    if not valid:
        raise CsrRejected("the CSR signature does not verify")
    public_key = csr.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or public_key.curve.name not in _ACCEPTED_CURVES:
        raise CsrRejected("the CSR key must be an EC P-256 or P-384 key")
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise CsrRejected("the CSR has no subjectAltName") from None
    except Exception:  # noqa: BLE001 - malformed or duplicate extensions
        raise CsrRejected("the CSR's extensions do not parse") from None
    return public_key, san


class CertificateAuthority:
    """Signs workload CSRs and gateway server certificates; owns the trust bundle.

    Build with `create` (new self-signed root), `from_pem` (a user-supplied root or intermediate)
    or `load` (a directory written by `save`). Not thread-safe for `rotate`/`retire_old_roots`
    versus signing; signing itself only reads state.
    """

    def __init__(self, key, cert: x509.Certificate, chain: Sequence[x509.Certificate] = (),
                 roots: Sequence[x509.Certificate] = (), trust_domain: str = DEFAULT_TRUST_DOMAIN):
        self._trust_domain = parse_trust_domain(trust_domain)
        self._hash = _hash_for(key)
        if _spki(key.public_key()) != _spki(cert.public_key()):
            raise ValueError("the CA key does not match the CA certificate")
        _check_signing_cert(cert, "the CA certificate")
        chain = [] if is_self_signed(cert) else list(chain)
        roots = list(roots)
        roots += [c for c in [cert, *chain] if is_self_signed(c) and c not in roots]
        chain = [c for c in chain if not is_self_signed(c)]
        if not roots:
            raise ValueError("no trust root: supply the root certificate (roots.pem)")
        path = [cert, *chain]
        for child, parent in zip(path, path[1:]):
            if not _issued_by(child, parent):
                raise ValueError("the CA chain is broken: a certificate is not signed by the next one")
            _check_signing_cert(parent, "a chain certificate")
        top = path[-1]
        anchor = top if is_self_signed(top) else next((r for r in roots if _issued_by(top, r)), None)
        if anchor is None:
            raise ValueError("the CA certificate does not chain to any supplied root")
        _check_name_constraints([cert, *chain, anchor], self._trust_domain)
        self._key = key
        self._cert = cert
        self._chain = chain
        self._anchor = anchor
        self._roots = [anchor] + [r for r in roots if r != anchor]
        self._prepare()

    def _prepare(self) -> None:
        """Precompute what every signature reuses (issuer name, AKI, PEM blobs)."""
        cert = self._cert
        try:
            ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            self._aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        except x509.ExtensionNotFound:
            self._aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(cert.public_key())
        self._issuer = cert.subject
        self._cert_not_before = int(cert.not_valid_before_utc.timestamp())
        self._cert_not_after = int(cert.not_valid_after_utc.timestamp())
        signer_is_root = is_self_signed(cert)
        self._chain_pem = b"" if signer_is_root else _pem([cert, *self._chain])
        self._bundle_pem = _pem(self._roots)

    # ---- construction ------------------------------------------------------------------------

    @classmethod
    def create(cls, trust_domain: str, now: float, ttl_s: float = DEFAULT_ROOT_TTL_S,
               name_constraints: bool = False) -> CertificateAuthority:
        """A new self-signed EC P-256 root valid from `now - 60 s` for `ttl_s`.

        CA:true with pathlen 0 (it signs leaves directly; a deployment that wants intermediates
        supplies its own root/intermediate through `from_pem`). keyUsage keyCertSign + cRLSign.
        With `name_constraints` the root may only vouch for URI names in `trust_domain` (DNS names
        stay unconstrained, for the gateway's server certificate).
        """
        trust_domain = parse_trust_domain(trust_domain)
        key, _ = generate_key()
        not_before = math.floor(now) - CLOCK_SKEW_S
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshd")]
        if len(trust_domain) <= 64:
            attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, trust_domain))
        # The key id makes the name unique per root, so overlapping roots never share a subject.
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, f"meshd root CA {ski.digest[:6].hex()}"))
        name = x509.Name(attrs)
        builder = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_utc(not_before))
            .not_valid_after(_utc(math.floor(now + ttl_s)))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
        )
        if name_constraints:
            builder = builder.add_extension(
                x509.NameConstraints(permitted_subtrees=[x509.UniformResourceIdentifier(trust_domain)],
                                     excluded_subtrees=None), critical=True)
        cert = builder.sign(key, hashes.SHA256())
        return cls(key, cert, (), [cert], trust_domain)

    @classmethod
    def from_pem(cls, cert_pem: bytes, key_pem: bytes, chain_pem: bytes = b"", roots_pem: bytes = b"",
                 trust_domain: str = DEFAULT_TRUST_DOMAIN) -> CertificateAuthority:
        """A user-supplied signing CA: a root, or an intermediate with its chain and root.

        `chain_pem` lists the certificates above `cert_pem` (a root at its end counts as a trust
        root); `roots_pem` adds trust roots (needed when the chain stops below the root).
        """
        certs = _load_certs(cert_pem, "the CA certificate")
        if len(certs) < 1:
            raise ValueError("the CA certificate is empty")
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError):
            raise ValueError("the CA key is not an unencrypted PEM private key") from None
        chain = certs[1:] + _load_certs(chain_pem, "the CA chain")
        roots = _load_certs(roots_pem, "the trust roots")
        return cls(key, certs[0], chain, roots, trust_domain)

    @classmethod
    def load(cls, directory: str | os.PathLike, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> CertificateAuthority:
        """Load a CA saved by `save` (or laid out the same way by hand)."""
        d = Path(directory)
        key_path = d / KEY_FILE
        mode = os.stat(key_path).st_mode
        if stat.S_IMODE(mode) & 0o077:
            raise PermissionError(f"{key_path} is accessible by group or others "
                                  f"(mode {stat.S_IMODE(mode):04o}); chmod 600 it")
        chain_path, roots_path = d / CHAIN_FILE, d / ROOTS_FILE
        return cls.from_pem(
            (d / CERT_FILE).read_bytes(), key_path.read_bytes(),
            chain_path.read_bytes() if chain_path.exists() else b"",
            roots_path.read_bytes() if roots_path.exists() else b"",
            trust_domain)

    def save(self, directory: str | os.PathLike) -> None:
        """Write the CA to `directory` (created 0700); `ca.key` is written 0600, atomically."""
        d = Path(directory)
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        key_pem = self._key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption())
        write_file_atomic(d / KEY_FILE, key_pem, 0o600)
        write_file_atomic(d / CERT_FILE, _pem([self._cert]), 0o644)
        if self._chain:
            write_file_atomic(d / CHAIN_FILE, _pem(self._chain), 0o644)
        else:
            (d / CHAIN_FILE).unlink(missing_ok=True)
        write_file_atomic(d / ROOTS_FILE, self._bundle_pem, 0o644)

    # ---- properties --------------------------------------------------------------------------

    @property
    def trust_domain(self) -> str:
        return self._trust_domain

    @property
    def certificate(self) -> x509.Certificate:
        """The signing certificate."""
        return self._cert

    @property
    def cert_pem(self) -> bytes:
        return _pem([self._cert])

    @property
    def roots(self) -> tuple[x509.Certificate, ...]:
        """The trusted roots, the current one first."""
        return tuple(self._roots)

    @property
    def bundle_pem(self) -> bytes:
        """The trust bundle (PEM roots, current first) to hand to every node."""
        return self._bundle_pem

    @property
    def not_after(self) -> float:
        """When the signing certificate expires (epoch seconds); leaves never outlive it."""
        return float(self._cert_not_after)

    # ---- rotation ----------------------------------------------------------------------------

    def rotate(self, now: float, ttl_s: float = DEFAULT_ROOT_TTL_S, name_constraints: bool = False) -> None:
        """Switch signing to a new self-signed root; the old roots stay in the bundle.

        Distribute the new `bundle_pem` to every node, re-issue the leaves, and once no leaf of
        the old root is still valid call `retire_old_roots()`.
        """
        new = CertificateAuthority.create(self._trust_domain, now, ttl_s, name_constraints)
        self._key, self._cert, self._chain, self._hash = new._key, new._cert, [], new._hash
        self._anchor = new._cert
        self._roots = [new._cert] + [r for r in self._roots if r != new._cert]
        self._prepare()

    def add_root(self, root: x509.Certificate) -> None:
        """Trust `root` too (it joins the bundle after the current one); signing does not change.

        Step 1 of a root rotation without failed handshakes: every node gets a bundle with both
        roots before any leaf of the new root exists (then `adopt`, re-issue, `retire_old_roots`).
        """
        if not is_self_signed(root):
            raise ValueError("only a self-signed root can be added to the bundle")
        if root not in self._roots:
            self._roots = [*self._roots, root]
            self._prepare()

    def adopt(self, signer: "CertificateAuthority") -> None:
        """Sign with `signer`'s key and certificate from now on; every root stays trusted."""
        if signer.trust_domain != self._trust_domain:
            raise ValueError("the new signer has another trust domain")
        roots = [*signer.roots, *[r for r in self._roots if r not in signer.roots]]
        self._key, self._cert, self._chain, self._hash = signer._key, signer._cert, list(signer._chain), signer._hash
        self._anchor = signer._anchor
        self._roots = [self._anchor] + [r for r in roots if r != self._anchor]
        self._prepare()

    def retire_old_roots(self) -> None:
        """Drop every root but the one the current signing certificate chains to."""
        self._roots = [self._anchor]
        self._prepare()

    # ---- signing -----------------------------------------------------------------------------

    def _validity(self, ttl_s: float, now: float) -> tuple[int, int]:
        if not (math.isfinite(ttl_s) and ttl_s > 0):
            raise ValueError(f"ttl_s must be a positive number of seconds, got {ttl_s!r}")
        if not math.isfinite(now):
            raise ValueError(f"now must be a finite time, got {now!r}")
        not_before = max(math.floor(now) - CLOCK_SKEW_S, self._cert_not_before)
        not_after = min(math.floor(now + ttl_s), self._cert_not_after)
        if not_after <= max(not_before, math.floor(now)):
            raise ValueError("the signing CA certificate has expired (or is not yet valid)")
        return not_before, not_after

    def _sign(self, public_key, san: x509.SubjectAlternativeName, eku: Sequence[x509.ObjectIdentifier],
              not_before: int, not_after: int) -> tuple[x509.Certificate, int]:
        serial = x509.random_serial_number()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self._issuer)
            .public_key(public_key)
            .serial_number(serial)
            .not_valid_before(_utc(not_before))
            .not_valid_after(_utc(not_after))
            .add_extension(_LEAF_BASIC_CONSTRAINTS, critical=True)
            .add_extension(_LEAF_KEY_USAGE, critical=True)
            .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
            .add_extension(san, critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(self._aki, critical=False)
            .sign(self._key, self._hash)
        )
        return cert, serial

    def sign_csr(self, csr_pem: bytes, expected_id: str, ttl_s: float, now: float) -> IssuedCert:
        """Sign a workload CSR for `expected_id`, valid `[now - 60 s, now + ttl_s]`.

        `expected_id` is what meshd knows the caller to be (from Docker, never from the CSR); the
        CSR must be well signed, hold an EC P-256/P-384 key, and request exactly that one URI SAN and
        no other name. Raises CsrRejected (reason in `.reason`) for a bad CSR, ValueError for a bad
        `expected_id`/`ttl_s` or an expired CA. `not_after` is cut to the CA's own expiry.
        """
        sid = parse_spiffe_id(expected_id)
        if sid.trust_domain != self._trust_domain:
            raise ValueError(f"identity {expected_id!r} is outside trust domain {self._trust_domain!r}")
        not_before, not_after = self._validity(ttl_s, now)
        public_key, san = _checked_csr(csr_pem)
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        if len(uris) != 1:
            raise CsrRejected(f"the CSR must request exactly one URI SAN, it requests {len(uris)}")
        if len(san) != 1:
            raise CsrRejected("the CSR requests names other than its SPIFFE ID")
        if uris[0] != expected_id:
            raise CsrRejected(f"the CSR requests identity {uris[0][:200]!r}, expected {expected_id!r}")
        cert, serial = self._sign(
            public_key, x509.SubjectAlternativeName([x509.UniformResourceIdentifier(expected_id)]),
            _WORKLOAD_EKU, not_before, not_after)
        return IssuedCert(cert.public_bytes(serialization.Encoding.PEM), self._chain_pem, serial,
                          float(not_before), float(not_after))

    def sign_server_csr(self, csr_pem: bytes, allowed_names: Sequence[str], ttl_s: float, now: float) -> IssuedCert:
        """Sign a TLS server CSR (the gateway's HTTPS) whose DNS/IP names are all in `allowed_names`.

        The key stays with the requester. Only the CSR's public key and its checked names are copied.
        """
        not_before, not_after = self._validity(ttl_s, now)
        public_key, san = _checked_csr(csr_pem)
        allowed_dns = {n.strip().lower().rstrip(".") for n in allowed_names}
        names: list[x509.GeneralName] = []
        for gn in san:
            if isinstance(gn, x509.DNSName) and gn.value.lower() in allowed_dns:
                names.append(x509.DNSName(gn.value.lower()))
            elif isinstance(gn, x509.IPAddress) and str(gn.value) in allowed_dns:
                names.append(gn)
            else:
                raise CsrRejected(f"the CSR requests a name that is not configured: {str(getattr(gn, 'value', gn))[:100]!r}")
        if not names:
            raise CsrRejected("the CSR requests no DNS name or IP address")
        cert, serial = self._sign(public_key, x509.SubjectAlternativeName(names), _SERVER_EKU, not_before, not_after)
        return IssuedCert(cert.public_bytes(serialization.Encoding.PEM), self._chain_pem, serial,
                          float(not_before), float(not_after))

    def issue_server_cert(self, dns_names: Sequence[str], ttl_s: float, now: float) -> IssuedCert:
        """A TLS server certificate (serverAuth) for the gateway's HTTPS, with a new EC P-256 key.

        `dns_names` are DNS names (a leading `*.` wildcard is allowed) or IP addresses. The key is
        returned in `IssuedCert.key_pem` (hidden from repr).
        """
        if isinstance(dns_names, str) or not dns_names:
            raise ValueError("dns_names must be a non-empty list of names")
        names: list[x509.GeneralName] = []
        for raw in dns_names:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(raw)))
                continue
            except ValueError:
                pass
            name = raw.strip().lower().rstrip(".")
            if len(name) > 253 or not _DNS_RE.match(name):
                raise ValueError(f"{raw!r} is not a DNS name or IP address")
            names.append(x509.DNSName(name))
        not_before, not_after = self._validity(ttl_s, now)
        key, key_pem = generate_key()
        cert, serial = self._sign(key.public_key(), x509.SubjectAlternativeName(names),
                                  _SERVER_EKU, not_before, not_after)
        return IssuedCert(cert.public_bytes(serialization.Encoding.PEM), self._chain_pem, serial,
                          float(not_before), float(not_after), key_pem)


_LEAF_BASIC_CONSTRAINTS = x509.BasicConstraints(ca=False, path_length=None)
_LEAF_KEY_USAGE = x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                crl_sign=False, encipher_only=False, decipher_only=False)
_WORKLOAD_EKU = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)
_SERVER_EKU = (ExtendedKeyUsageOID.SERVER_AUTH,)
