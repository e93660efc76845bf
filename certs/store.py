"""A node's TLS material on disk: `cert.pem` (leaf + chain), `key.pem` (0600), `bundle.pem`.

Each file is replaced atomically (write a temporary file in the same directory, fsync, rename).
The three files are not replaced as one unit, so `load_material` checks that the key matches the
certificate; a reader that races a writer gets ValueError and should retry.

Certificates are read by `certs.worker` (a child process with `cryptography`), so `material_from_pem`
and `load_material` block for the worker's run (~0.1 s); async code uses `certs.worker.acall` with
`inspect_request` and `material_from_inspection` instead.
This module imports no `cryptography` itself.
"""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path
from typing import Any

from certs import worker
from certs.holder import TlsMaterial
from meshcore.identity import SCHEME, is_spiffe_id

CERT_FILE, KEY_FILE, BUNDLE_FILE = "cert.pem", "key.pem", "bundle.pem"


def write_file_atomic(path: str | os.PathLike, data: bytes, mode: int) -> None:
    """Replace `path` with `data`, file mode `mode`; the file never exists with wider permissions."""
    path = Path(path)
    # What tempfile.mkstemp does (a fresh random name, O_EXCL, 0600), without importing tempfile
    # and shutil with bz2 and lzma into every node (~0.9 MiB).
    tmp = path.parent / f".{path.name}.{os.urandom(8).hex()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
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


def inspect_request(cert_chain_pem: bytes, key_pem: bytes | None = None,
                    bundle_pem: bytes | None = None) -> dict[str, Any]:
    """The `certs.worker` request reading the leaf of `cert_chain_pem` (and checking the key and
    the bundle when given)."""
    request: dict[str, Any] = {"op": "inspect", "chain_pem": cert_chain_pem.decode("ascii", "replace")}
    if key_pem is not None:
        request["key_pem"] = key_pem.decode("ascii", "replace")
    if bundle_pem is not None:
        request["bundle_pem"] = bundle_pem.decode("ascii", "replace")
    return request


def leaf_identity(uris: list[str]) -> str:
    """The leaf's SPIFFE ID: its single SPIFFE URI SAN, or "" (none, several, or invalid)."""
    ids = [u for u in uris if u[:len(SCHEME)].lower() == SCHEME]
    return ids[0] if len(ids) == 1 and is_spiffe_id(ids[0]) else ""


def material_from_inspection(cert_chain_pem: bytes, key_pem: bytes, bundle_pem: bytes,
                             info: dict[str, Any]) -> TlsMaterial:
    """TlsMaterial from the worker's `inspect` answer `info` for `cert_chain_pem`."""
    return TlsMaterial(cert_chain_pem=cert_chain_pem, key_pem=key_pem, bundle_pem=bundle_pem,
                       identity=leaf_identity(list(info.get("uris", ()))),
                       not_before=float(info["not_before"]), not_after=float(info["not_after"]),
                       serial=int(info["serial"]), spki=base64.b64decode(info["spki"]))


def material_from_pem(cert_chain_pem: bytes, key_pem: bytes, bundle_pem: bytes) -> TlsMaterial:
    """Build TlsMaterial, reading identity, validity and serial from the leaf (the first cert).

    Raises ValueError when the PEM does not parse or the key does not match the leaf (and
    certs.worker.WorkerError when the worker does not answer). The identity is the leaf's single
    SPIFFE URI SAN, or "" when it has none (e.g. a gateway server certificate). Blocks for a
    `certs.worker` run.
    """
    info = worker.call(inspect_request(cert_chain_pem, key_pem, bundle_pem), attempts=3)
    return material_from_inspection(cert_chain_pem, key_pem, bundle_pem, info)


def save_material(directory: str | os.PathLike, material: TlsMaterial) -> None:
    """Write `material` to `directory` (created 0700): key.pem 0600, cert.pem and bundle.pem 0644."""
    d = Path(directory)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_file_atomic(d / KEY_FILE, material.key_pem, 0o600)
    write_file_atomic(d / CERT_FILE, material.cert_chain_pem, 0o644)
    write_file_atomic(d / BUNDLE_FILE, material.bundle_pem, 0o644)


def read_material_files(directory: str | os.PathLike) -> tuple[bytes, bytes, bytes]:
    """(cert chain, key, bundle) PEM as saved by `save_material`; refuses a key file readable by
    group or others (PermissionError)."""
    d = Path(directory)
    key_path = d / KEY_FILE
    mode = stat.S_IMODE(os.stat(key_path).st_mode)
    if mode & 0o077:
        raise PermissionError(f"{key_path} is accessible by group or others (mode {mode:04o}); chmod 600 it")
    return (d / CERT_FILE).read_bytes(), key_path.read_bytes(), (d / BUNDLE_FILE).read_bytes()


def load_material(directory: str | os.PathLike) -> TlsMaterial:
    """Read material saved by `save_material`; refuses a key file readable by group or others.
    Blocks for a `certs.worker` run (from async code: read_material_files + certs.worker.acall)."""
    return material_from_pem(*read_material_files(directory))
