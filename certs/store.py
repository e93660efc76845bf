"""A node's TLS material on disk: `cert.pem` (leaf + chain), `key.pem` (0600), `bundle.pem`.

Each file is replaced atomically (write a temporary file in the same directory, fsync, rename).
The three files are not replaced as one unit, so `load_material` checks that the key matches the
certificate; a reader that races a writer gets ValueError and should retry.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from certs.holder import TlsMaterial
from meshcore.identity import SCHEME, is_spiffe_id

CERT_FILE, KEY_FILE, BUNDLE_FILE = "cert.pem", "key.pem", "bundle.pem"


def write_file_atomic(path: str | os.PathLike, data: bytes, mode: int) -> None:
    """Replace `path` with `data`, file mode `mode`; the file never exists with wider permissions."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # created 0600
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        raise
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def material_from_pem(cert_chain_pem: bytes, key_pem: bytes, bundle_pem: bytes) -> TlsMaterial:
    """Build TlsMaterial, reading identity, validity and serial from the leaf (the first cert).

    Raises ValueError when the PEM does not parse or the key does not match the leaf. The identity
    is the leaf's single SPIFFE URI SAN, or "" when it has none (e.g. a gateway server certificate).
    """
    try:
        certs = x509.load_pem_x509_certificates(cert_chain_pem)
    except ValueError:
        raise ValueError("the certificate chain is not PEM") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise ValueError("the private key is not an unencrypted PEM key") from None
    leaf = certs[0]
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if (key.public_key().public_bytes(serialization.Encoding.DER, spki)
            != leaf.public_key().public_bytes(serialization.Encoding.DER, spki)):
        raise ValueError("the private key does not match the certificate")
    try:
        x509.load_pem_x509_certificates(bundle_pem)
    except ValueError:
        raise ValueError("the trust bundle is not PEM certificates") from None
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = [u for u in san.get_values_for_type(x509.UniformResourceIdentifier)
                if u[:len(SCHEME)].lower() == SCHEME]
    except x509.ExtensionNotFound:
        uris = []
    identity = uris[0] if len(uris) == 1 and is_spiffe_id(uris[0]) else ""
    return TlsMaterial(cert_chain_pem=cert_chain_pem, key_pem=key_pem, bundle_pem=bundle_pem,
                       identity=identity, not_before=leaf.not_valid_before_utc.timestamp(),
                       not_after=leaf.not_valid_after_utc.timestamp(), serial=leaf.serial_number)


def save_material(directory: str | os.PathLike, material: TlsMaterial) -> None:
    """Write `material` to `directory` (created 0700): key.pem 0600, cert.pem and bundle.pem 0644."""
    d = Path(directory)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_file_atomic(d / KEY_FILE, material.key_pem, 0o600)
    write_file_atomic(d / CERT_FILE, material.cert_chain_pem, 0o644)
    write_file_atomic(d / BUNDLE_FILE, material.bundle_pem, 0o644)


def load_material(directory: str | os.PathLike) -> TlsMaterial:
    """Read material saved by `save_material`; refuses a key file readable by group or others."""
    d = Path(directory)
    key_path = d / KEY_FILE
    mode = stat.S_IMODE(os.stat(key_path).st_mode)
    if mode & 0o077:
        raise PermissionError(f"{key_path} is accessible by group or others (mode {mode:04o}); chmod 600 it")
    return material_from_pem((d / CERT_FILE).read_bytes(), key_path.read_bytes(), (d / BUNDLE_FILE).read_bytes())
