"""The node processes' cryptography, in a short-lived child process: `python -m certs.worker`.

The sidecar and the gateway need `cryptography` only for a few rare operations: a new EC P-256 key
and its CSR (bootstrap, renewal at about half of the certificate's lifetime, root rotation, the
gateway's HTTPS certificate) and reading a certificate they receive or restore (validity, serial,
SPKI, URI SANs). Importing `cryptography` costs each of them ~8 MiB of resident memory for their
whole life (bench/RESULTS.md), so they run those operations here instead: one request (a JSON
object) on stdin, one answer (a JSON object) on stdout, then the process exits.

    {"op": "keygen_csr", "identity": "spiffe://td/ns/n/sa/s"}     a workload key and its CSR
    {"op": "keygen_csr", "names": ["localhost", "127.0.0.1"]}     a TLS server key and its CSR
        -> {"key_pem", "csr_pem", "spki"}
    {"op": "inspect", "chain_pem": ..., ["key_pem": ..., "bundle_pem": ...]}
        -> {"not_before", "not_after", "serial", "spki", "uris"}     (of the leaf, the first certificate)
    a refused request -> {"error": "..."}                             (never echoing a key)

`spki` is the base64 of the DER SubjectPublicKeyInfo: the node matches a certificate to the pending
key it made the CSR with by comparing it. `inspect` checks, when given, that `key_pem` is the leaf's
key and that `bundle_pem` parses as certificates.

The private key travels through the pipes only, never through argv, the environment or a log; the
child gets the parent's environment without its `MESH_*` variables (the bootstrap token). This
module's top level imports no third-party package: `call` / `acall` are what the nodes import.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

TIMEOUT_S = 30.0
# Tests may set this to run requests in this process (JSON in and out all the same); the nodes
# never do: their memory is the point of the worker.
IN_PROCESS = False
_ROOT = str(Path(__file__).resolve().parents[1])   # the directory holding the `certs` package


class WorkerError(OSError):
    """The worker did not answer: it did not start, timed out, crashed or wrote no JSON."""


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = _ROOT + (os.pathsep + path if path else "")
    return env


def _tail(stderr: bytes) -> str:
    lines = stderr.decode("utf-8", "replace").strip().splitlines()
    return lines[-1][:200] if lines else "no message"


def call(request: dict[str, Any], timeout: float = TIMEOUT_S, attempts: int = 1) -> dict[str, Any]:
    """Run `request` in a fresh worker process (blocking: from async code use `acall`).

    Raises ValueError with the worker's message when it refuses the request (e.g. a certificate
    that does not parse, a key that does not match), WorkerError when it did not answer after
    `attempts` tries.
    """
    payload = json.dumps(request).encode("utf-8")
    for attempt in range(attempts):
        try:
            answer = _run(payload, timeout)
            break
        except WorkerError:
            if attempt + 1 >= attempts:
                raise
    if "error" in answer:
        raise ValueError(str(answer["error"]))
    return answer


async def acall(request: dict[str, Any], timeout: float = TIMEOUT_S, attempts: int = 1) -> dict[str, Any]:
    """`call` for async code: the worker runs as an asyncio subprocess, the event loop keeps serving.

    No thread: an executor thread would stay in the node for good, with its stack and malloc arena
    (~0.7 MiB of resident memory)."""
    payload = json.dumps(request).encode("utf-8")
    for attempt in range(attempts):
        try:
            answer = await _arun(payload, timeout)
            break
        except WorkerError:
            if attempt + 1 >= attempts:
                raise
    if "error" in answer:
        raise ValueError(str(answer["error"]))
    return answer


def _command() -> list[str]:
    return [sys.executable, "-m", "certs.worker"]


def _run(payload: bytes, timeout: float) -> dict[str, Any]:
    if IN_PROCESS:
        return json.loads(json.dumps(_answer(payload)))
    try:
        proc = subprocess.run(_command(), input=payload, capture_output=True, timeout=timeout,
                              env=_child_env(), cwd=_ROOT)
    except subprocess.TimeoutExpired:
        raise WorkerError(f"the certs worker did not answer within {timeout:g} s") from None
    except OSError as exc:
        raise WorkerError(f"the certs worker did not start: {exc.strerror or exc}") from None
    return _parse(proc.returncode, proc.stdout, proc.stderr)


async def _arun(payload: bytes, timeout: float) -> dict[str, Any]:
    if IN_PROCESS:
        return json.loads(json.dumps(_answer(payload)))
    import asyncio

    try:
        proc = await asyncio.create_subprocess_exec(
            *_command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=_child_env(), cwd=_ROOT)
    except OSError as exc:
        raise WorkerError(f"the certs worker did not start: {exc.strerror or exc}") from None
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(payload), timeout)
    except asyncio.TimeoutError:
        raise WorkerError(f"the certs worker did not answer within {timeout:g} s") from None
    finally:
        if proc.returncode is None:      # timed out or cancelled: no worker outlives its caller
            try:
                proc.kill()
            except ProcessLookupError:
                pass
            try:
                await asyncio.shield(proc.wait())
            except BaseException:        # noqa: BLE001 - cancelled again while reaping: let it go
                pass
    return _parse(proc.returncode, stdout, stderr)


def _parse(returncode: int, stdout: bytes, stderr: bytes) -> dict[str, Any]:
    if returncode != 0:
        raise WorkerError(f"the certs worker exited with status {returncode}: {_tail(stderr)}")
    try:
        answer = json.loads(stdout)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise WorkerError("the certs worker answered no JSON object")
    return answer


# ---- the worker's side (imports cryptography) ---------------------------------------------------

def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _keygen_csr(request: dict[str, Any]) -> dict[str, Any]:
    from certs.keys import build_csr, build_server_csr, generate_key, spki_der

    identity, names = request.get("identity"), request.get("names")
    if isinstance(identity, str) and identity:
        key, key_pem = generate_key()
        csr = build_csr(key, identity)
    elif isinstance(names, list) and names and all(isinstance(n, str) and n for n in names):
        key, key_pem = generate_key()
        csr = build_server_csr(key, tuple(names))
    else:
        raise ValueError("keygen_csr needs an identity or a list of server names")
    return {"key_pem": key_pem.decode("ascii"), "csr_pem": csr.decode("ascii"), "spki": _b64(spki_der(key.public_key()))}


def _pem(request: dict[str, Any], name: str) -> bytes | None:
    value = request.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{name} must be PEM text")
    return value.encode("ascii", "replace")


def _inspect(request: dict[str, Any]) -> dict[str, Any]:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from certs.keys import spki_der

    chain_pem, key_pem, bundle_pem = (_pem(request, n) for n in ("chain_pem", "key_pem", "bundle_pem"))
    try:
        leaf = x509.load_pem_x509_certificates(chain_pem or b"")[0]
    except ValueError:
        raise ValueError("the certificate chain is not PEM") from None
    spki = spki_der(leaf.public_key())
    if key_pem is not None:
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError):
            raise ValueError("the private key is not an unencrypted PEM key") from None
        if spki_der(key.public_key()) != spki:
            raise ValueError("the private key does not match the certificate")
    if bundle_pem is not None:
        try:
            x509.load_pem_x509_certificates(bundle_pem)
        except ValueError:
            raise ValueError("the trust bundle is not PEM certificates") from None
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = list(san.get_values_for_type(x509.UniformResourceIdentifier))
    except x509.ExtensionNotFound:
        uris = []
    return {"not_before": leaf.not_valid_before_utc.timestamp(), "not_after": leaf.not_valid_after_utc.timestamp(),
            "serial": leaf.serial_number, "spki": _b64(spki), "uris": uris}


OPS = {"keygen_csr": _keygen_csr, "inspect": _inspect}


def _answer(payload: bytes) -> dict[str, Any]:
    """The answer to one request. Errors carry fixed messages or the request's own (public) fields;
    anything unexpected is reported by its type only, so no key material can reach the answer."""
    try:
        request = json.loads(payload)
    except ValueError:
        request = None
    if not isinstance(request, dict):
        return {"error": "the request is not a JSON object"}
    op = OPS.get(request.get("op"))
    if op is None:
        return {"error": f"unknown op {str(request.get('op'))[:40]!r}"}
    try:
        return op(request)
    except ValueError as exc:
        return {"error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - reported by type only
        return {"error": f"{request['op']} failed ({type(exc).__name__})"}


def main() -> int:
    answer = _answer(sys.stdin.buffer.read())
    sys.stdout.write(json.dumps(answer))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
