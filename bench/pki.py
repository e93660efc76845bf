"""Real mTLS material for the benchmarks: one certs.CertificateAuthority (EC P-256 root), and per
workload an EC P-256 key, a CSR for its SPIFFE ID and the CA's signature, as meshd issues them.

Written as the sidecar reads it (certs.store layout: cert.pem, key.pem 0600, bundle.pem) and as
HAProxy reads it (one PEM with the chain and the key, plus the CA bundle).
"""

from __future__ import annotations

import time
from pathlib import Path

from certs.ca import CertificateAuthority
from certs.holder import TlsMaterial
from certs.keys import build_csr, generate_key
from certs.store import save_material, write_file_atomic
from meshcore.labels import DEFAULT_TRUST_DOMAIN, spiffe_id

NAMESPACE = "bench"
TTL_S = 24 * 3600.0


def identity(service: str) -> str:
    return spiffe_id(DEFAULT_TRUST_DOMAIN, NAMESPACE, service)


def issue(ca: CertificateAuthority, service: str) -> TlsMaterial:
    key, key_pem = generate_key()
    sid = identity(service)
    issued = ca.sign_csr(build_csr(key, sid), sid, TTL_S, time.time())
    return TlsMaterial(cert_chain_pem=issued.full_chain_pem, key_pem=key_pem, bundle_pem=ca.bundle_pem,
                       identity=sid, not_before=issued.not_before, not_after=issued.not_after,
                       serial=issued.serial)


def write_pki(directory: Path, services: tuple[str, ...]) -> dict[str, Path]:
    """A fresh CA and one workload's material per service under `directory`.

    Returns paths: `ca` (bundle PEM), `<service>` (certs.store directory), `<service>.haproxy.pem`.
    """
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca = CertificateAuthority.create(DEFAULT_TRUST_DOMAIN, time.time())
    paths: dict[str, Path] = {"ca": directory / "ca.pem"}
    write_file_atomic(paths["ca"], ca.bundle_pem, 0o644)
    for service in services:
        material = issue(ca, service)
        d = directory / service
        save_material(d, material)
        paths[service] = d
        combined = directory / f"{service}.haproxy.pem"
        write_file_atomic(combined, material.cert_chain_pem + material.key_pem, 0o600)
        paths[f"{service}.haproxy.pem"] = combined
    return paths
