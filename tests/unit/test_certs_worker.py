"""certs.worker: the node processes' keys, CSRs and certificate reading in a child process, so that
the sidecar and the gateway never import `cryptography` (issue 7's memory target)."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from certs import worker
from certs.ca import CertificateAuthority
from certs.keys import build_csr, generate_key, spki_der
from certs.store import material_from_pem

ROOT = Path(__file__).resolve().parents[2]
TD = "mesh.local"
WEB = "spiffe://mesh.local/ns/shop/sa/web"


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create(TD, time.time())


def test_keygen_csr_for_an_identity(ca):
    answer = worker.call({"op": "keygen_csr", "identity": WEB})
    key = serialization.load_pem_private_key(answer["key_pem"].encode(), password=None)
    csr = x509.load_pem_x509_csr(answer["csr_pem"].encode())
    assert csr.is_signature_valid
    assert spki_der(csr.public_key()) == spki_der(key.public_key()) == base64.b64decode(answer["spki"])
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [WEB]
    issued = ca.sign_csr(answer["csr_pem"].encode(), WEB, 3600, time.time())   # meshd accepts it
    assert issued.serial


def test_keygen_csr_for_server_names():
    answer = worker.call({"op": "keygen_csr", "names": ["LocalHost", "127.0.0.1"]})
    san = x509.load_pem_x509_csr(answer["csr_pem"].encode()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


def test_keygen_refuses_what_is_no_spiffe_id():
    with pytest.raises(ValueError, match="spiffe://"):
        worker.call({"op": "keygen_csr", "identity": "https://example.com/web"})
    with pytest.raises(ValueError, match="identity or a list of server names"):
        worker.call({"op": "keygen_csr"})


def _issued(ca):
    key, key_pem = generate_key()
    return key, key_pem, ca.sign_csr(build_csr(key, WEB), WEB, 3600, time.time())


def test_inspect_reads_the_leaf(ca):
    key, key_pem, issued = _issued(ca)
    info = worker.call({"op": "inspect", "chain_pem": issued.full_chain_pem.decode(),
                        "key_pem": key_pem.decode(), "bundle_pem": ca.bundle_pem.decode()})
    assert info["uris"] == [WEB] and info["serial"] == issued.serial
    assert info["not_before"] == issued.not_before and info["not_after"] == issued.not_after
    assert base64.b64decode(info["spki"]) == spki_der(key.public_key())
    m = material_from_pem(issued.full_chain_pem, key_pem, ca.bundle_pem)
    assert (m.identity, m.serial, m.not_after, m.spki) == (WEB, issued.serial, issued.not_after,
                                                           spki_der(key.public_key()))


def test_inspect_refusals_never_echo_the_key(ca):
    _, key_pem, issued = _issued(ca)
    _, other_pem, _ = _issued(ca)
    chain = issued.full_chain_pem.decode()
    cases = [
        ({"chain_pem": "not a certificate"}, "the certificate chain is not PEM"),
        ({"chain_pem": chain, "key_pem": other_pem.decode()}, "the private key does not match the certificate"),
        ({"chain_pem": chain, "key_pem": key_pem.decode()[:-40]}, "the private key is not an unencrypted PEM key"),
        ({"chain_pem": chain, "key_pem": key_pem.decode(), "bundle_pem": "junk"},
         "the trust bundle is not PEM certificates"),
    ]
    for fields, message in cases:
        with pytest.raises(ValueError) as err:
            worker.call({"op": "inspect", **fields})
        assert str(err.value) == message
        assert "PRIVATE" not in str(err.value)
    with pytest.raises(ValueError, match="unknown op"):
        worker.call({"op": "sign"})


def test_in_process_mode_answers_the_same(ca, monkeypatch):
    _, key_pem, issued = _issued(ca)
    request = {"op": "inspect", "chain_pem": issued.full_chain_pem.decode(), "key_pem": key_pem.decode()}
    real = worker.call(request)
    monkeypatch.setattr(worker, "IN_PROCESS", True)
    assert worker.call(request) == real
    with pytest.raises(ValueError, match="does not match"):
        worker.call({**request, "key_pem": generate_key()[1].decode()})


def test_a_worker_that_does_not_answer_is_a_worker_error(monkeypatch):
    with pytest.raises(worker.WorkerError, match="did not answer within"):
        worker.call({"op": "keygen_csr", "identity": WEB}, timeout=0.001)
    monkeypatch.setattr(worker.sys, "executable", "/nonexistent/python")
    with pytest.raises(worker.WorkerError, match="did not start"):
        worker.call({"op": "keygen_csr", "identity": WEB}, attempts=2)
    assert issubclass(worker.WorkerError, OSError)


def test_the_child_gets_no_mesh_variables(monkeypatch):
    monkeypatch.setenv("MESH_BOOTSTRAP_TOKEN", "secret-token")
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    env = worker._child_env()
    assert not [k for k in env if k.startswith("MESH_")]
    assert env["PYTHONPATH"].split(os.pathsep) == [str(ROOT), "/elsewhere"]


# A node's whole certificate life in a fresh interpreter, as `sidecar run` does it: bootstrap CSR,
# install, save, restore after a restart, renewal with a new key; `cryptography` never loaded there.
NODE = r"""
import asyncio, json, sys
from meshproc.runtime import configure_logging
from meshcore.protocol import Certs
from sidecar.tlsagent import CertAgent, read_bootstrap_token

def ask(obj):
    print("@@" + json.dumps(obj), flush=True)
    return json.loads(sys.stdin.readline())

async def main(identity, bundle, tls_dir):
    token, token_file = read_bootstrap_token(tls_dir + "-token")      # the file meshd copied in
    agent = CertAgent(identity, bundle.encode(), token, token_file=token_file, tls_dir=tls_dir,
                      restore=False)                                       # as `sidecar run`
    await agent.restore()                     # nothing saved yet
    token, csr = await agent.bootstrap_fields()
    reply = ask({"csr": csr, "token": token})
    m = await agent.install(Certs(cert_chain=reply["chain"], bundle=bundle, not_after=0))
    assert read_bootstrap_token(tls_dir + "-token") == ("", "")         # spent: the file is gone
    restored = CertAgent(identity, bundle.encode(), "", tls_dir=tls_dir, restore=False)   # a restart
    assert not restored.has_valid_cert()
    await restored.restore()
    assert await restored.bootstrap_fields() == ("", "")
    reply = ask({"csr": await restored.new_csr(), "serial": restored.material.serial, "first": m.serial})
    m2 = await restored.install(Certs(cert_chain=reply["chain"], bundle=bundle, not_after=0))
    try:
        await restored.install(Certs(cert_chain=reply["foreign"], bundle=bundle, not_after=0))
        refused = ""
    except ValueError as exc:
        refused = str(exc)
    ask({"done": True, "serial": m2.serial, "identity": m2.identity, "refused": refused,
         "cryptography": [m for m in sys.modules if m.split(".")[0] == "cryptography"]})

configure_logging("sidecar")
asyncio.run(main(*sys.argv[1:]))
"""


def _message(proc) -> dict:
    """The node's next message (its log lines, JSON on stdout too, are skipped)."""
    while line := proc.stdout.readline():
        if line.startswith("@@"):
            return json.loads(line[2:])
    raise AssertionError(f"the node ended (status {proc.wait(timeout=10)})")


def test_a_node_lives_without_cryptography(ca, tmp_path):
    tls_dir = tmp_path / "tls"
    (tmp_path / "tls-token").write_text("token\n")
    proc = subprocess.Popen([sys.executable, "-c", NODE, WEB, ca.bundle_pem.decode(), str(tls_dir)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        def reply(obj):
            proc.stdin.write(json.dumps(obj) + "\n")
            proc.stdin.flush()

        first = _message(proc)
        assert first["token"] == "token"
        issued = ca.sign_csr(first["csr"].encode(), WEB, 3600, time.time())
        reply({"chain": issued.full_chain_pem.decode()})
        second = _message(proc)
        assert second["serial"] == second["first"] == issued.serial      # restored from tls_dir
        renewed = ca.sign_csr(second["csr"].encode(), WEB, 3600, time.time())
        foreign = ca.sign_csr(build_csr(generate_key()[0], WEB), WEB, 3600, time.time())
        reply({"chain": renewed.full_chain_pem.decode(), "foreign": foreign.full_chain_pem.decode()})
        done = _message(proc)
        reply({})
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
    assert done["serial"] == renewed.serial and done["identity"] == WEB
    assert done["refused"] == "the certificate matches no key of this node"
    assert done["cryptography"] == []
    assert stat.S_IMODE(os.stat(tls_dir / "key.pem").st_mode) == 0o600
    key = serialization.load_pem_private_key((tls_dir / "key.pem").read_bytes(), password=None)
    leaf = x509.load_pem_x509_certificate((tls_dir / "cert.pem").read_bytes())
    assert spki_der(key.public_key()) == spki_der(leaf.public_key()) and leaf.serial_number == renewed.serial


def test_saved_material_is_restored_only_when_usable(ca, tmp_path, monkeypatch):
    import asyncio

    from certs.store import save_material
    from sidecar.tlsagent import CertAgent

    key, key_pem, issued = _issued(ca)
    good = material_from_pem(issued.full_chain_pem, key_pem, ca.bundle_pem)
    save_material(tmp_path / "tls", good)
    d = str(tmp_path / "tls")
    sync = CertAgent(WEB, ca.bundle_pem, tls_dir=d)               # restore=True: at once, blocking
    assert sync.material == good and sync.material.spki == spki_der(key.public_key())
    later = CertAgent(WEB, ca.bundle_pem, tls_dir=d, restore=False)
    assert later.material is None
    asyncio.run(later.restore())
    assert later.material == good and later.renew_at is not None
    other = CertAgent("spiffe://mesh.local/ns/shop/sa/db", ca.bundle_pem, tls_dir=d, restore=False)
    asyncio.run(other.restore())                                  # another identity's certificate
    assert other.material is None
    os.chmod(tmp_path / "tls" / "key.pem", 0o644)
    loose = CertAgent(WEB, ca.bundle_pem, tls_dir=d, restore=False)
    asyncio.run(loose.restore())                                  # a key readable by others
    assert loose.material is None


def test_acall_timeout_kills_the_worker():
    import asyncio

    async def go():
        with pytest.raises(worker.WorkerError, match="did not answer within"):
            await worker.acall({"op": "keygen_csr", "identity": WEB}, timeout=0.001)
        answer = await worker.acall({"op": "keygen_csr", "identity": WEB})
        assert answer["csr_pem"].startswith("-----BEGIN CERTIFICATE REQUEST-----")
        with pytest.raises(ValueError, match="spiffe://"):
            await worker.acall({"op": "keygen_csr", "identity": "web"})

    asyncio.run(go())
