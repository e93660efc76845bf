"""Workload keys and certificate signing requests.

Keys are EC P-256 (fast to sign with, small, what TLS 1.3 stacks all speak). A workload's key is
generated where it is used (the node) and never leaves it; only the CSR travels to meshd.

This module imports `cryptography`: meshd uses it directly, the sidecar and the gateway only
through `certs.worker` (a child process), so that they do not carry the library in their memory.
"""

from __future__ import annotations

import ipaddress

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshcore.identity import parse_spiffe_id

CURVE = ec.SECP256R1


def generate_key() -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """A new EC P-256 private key and its unencrypted PKCS#8 PEM (keep it private: mode 0600)."""
    key = ec.generate_private_key(CURVE())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    return key, pem


def load_key(key_pem: bytes) -> ec.EllipticCurvePrivateKey:
    """Load an unencrypted PEM private key; raises ValueError (without echoing the key) if it is not EC."""
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise ValueError("not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("workload keys must be EC keys")
    return key


def build_csr(key: ec.EllipticCurvePrivateKey, spiffe_id: str) -> bytes:
    """A PEM CSR for `spiffe_id`, signed by `key`: empty subject, one URI SAN, nothing else.

    Raises ValueError when `spiffe_id` is not a valid SPIFFE ID.
    """
    parse_spiffe_id(spiffe_id)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
                       critical=True)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def build_server_csr(key: ec.EllipticCurvePrivateKey, names: tuple[str, ...]) -> bytes:
    """A PEM CSR for a TLS server certificate naming DNS names / IP addresses (the gateway's HTTPS)."""
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


def spki_der(public_key) -> bytes:
    """The DER SubjectPublicKeyInfo of a public key: what matches a certificate to its key."""
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
