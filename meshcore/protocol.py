"""Messages of the meshd <-> sidecar control channel (JSON over a websocket); pure, stdlib only.

Modelled on Envoy's xDS: meshd pushes whole versioned snapshots, the node answers ACK or NACK with
a reason and keeps its last good snapshot either way.

The channel runs over TLS (`wss://`, port 15012 like istiod's mTLS xDS port). Certificates:
- bootstrap: the node's first `hello` carries its one-time `token` (from its environment) and a `csr`
  for its SPIFFE ID; meshd answers `certs` (or closes with CLOSE_UNAUTHORIZED and a reason).
- reconnects present the workload certificate as TLS client certificate (no token, no csr).
- renewal: node -> meshd `csr`, meshd -> node `certs`; meshd may ask for one early with `renew`.
- trust bundle changes (root rotation): meshd -> node `bundle` {version}, node -> meshd `bundle_ack`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Union

CONTROL_PATH = "/v1/stream"
CONTROL_PORT = 15012  # istiod's mTLS xDS port; the channel is wss:// only
NODE_KINDS = ("sidecar", "gateway")
CSR_PURPOSES = ("workload", "gateway-server")
# Every node's /metrics carries its start (wall clock, s); meshd's scraper reads it to count the
# first scrape of a node born while it watched (meshcore.promtext.scrape_delta).
NODE_START_TIME_METRIC = "mesh_node_start_time_seconds"
MAX_PEM_CHARS = 64 * 1024
# websocket close codes (4000-4999 are for applications, RFC 6455 section 7.4.2)
CLOSE_BAD_HELLO = 4400
CLOSE_UNAUTHORIZED = 4401
CLOSE_FORBIDDEN = 4403


class ProtocolError(ValueError):
    """A control message that does not decode; the message names the field."""


@dataclass(frozen=True)
class Hello:
    """First message of a node: who it is and the last snapshot version it holds."""

    kind: str
    node: str            # the node's own name (sidecar container name, or "gateway")
    container: str       # the app container id a sidecar serves ("" for the gateway)
    last_version: int
    token: str = field(default="", repr=False)  # one-time bootstrap token (first connect only)
    csr: str = field(default="", repr=False)    # PEM CSR for the node's SPIFFE ID (with the token)


@dataclass(frozen=True)
class Certs:
    """meshd -> node: a signed certificate chain (leaf first), the trust bundle, when to renew."""

    cert_chain: str
    bundle: str
    not_after: float
    renew_at: float = 0.0          # 0: the node picks (half of the lifetime, with jitter)
    purpose: str = "workload"      # or "gateway-server" (the gateway's HTTPS certificate)


@dataclass(frozen=True)
class CsrRequest:
    """node -> meshd: sign this CSR (renewal; or the gateway's HTTPS certificate)."""

    csr: str = field(repr=False)
    purpose: str = "workload"


@dataclass(frozen=True)
class Renew:
    """meshd -> node: renew the workload certificate now (leaf or root rotation)."""

    reason: str = ""


@dataclass(frozen=True)
class Bundle:
    """meshd -> node: a new trust bundle (PEM roots); the node answers `bundle_ack` once installed."""

    version: int
    bundle: str


@dataclass(frozen=True)
class BundleAck:
    """node -> meshd: the trust bundle `version` is installed for new handshakes."""

    version: int


@dataclass(frozen=True)
class SnapshotPush:
    """meshd -> node: the latest snapshot in wire form."""

    version: int
    snapshot: dict[str, Any]


@dataclass(frozen=True)
class Ack:
    """node -> meshd: the snapshot was applied."""

    version: int


@dataclass(frozen=True)
class Nack:
    """node -> meshd: the snapshot was refused; the node keeps its last good one."""

    version: int
    reason: str


Message = Union[Hello, SnapshotPush, Ack, Nack, Certs, CsrRequest, Renew, Bundle, BundleAck]


def encode_message(msg: Message) -> str:
    """Serialise one control message to its JSON text."""
    if isinstance(msg, Hello):
        body = {"type": "hello", "kind": msg.kind, "node": msg.node, "container": msg.container,
                "last_version": msg.last_version}
        if msg.token:
            body["token"] = msg.token
        if msg.csr:
            body["csr"] = msg.csr
    elif isinstance(msg, SnapshotPush):
        body = {"type": "snapshot", "version": msg.version, "snapshot": msg.snapshot}
    elif isinstance(msg, Ack):
        body = {"type": "ack", "version": msg.version}
    elif isinstance(msg, Nack):
        body = {"type": "nack", "version": msg.version, "reason": msg.reason}
    elif isinstance(msg, Certs):
        body = {"type": "certs", "cert_chain": msg.cert_chain, "bundle": msg.bundle,
                "not_after": msg.not_after, "renew_at": msg.renew_at, "purpose": msg.purpose}
    elif isinstance(msg, CsrRequest):
        body = {"type": "csr", "csr": msg.csr, "purpose": msg.purpose}
    elif isinstance(msg, Renew):
        body = {"type": "renew", "reason": msg.reason}
    elif isinstance(msg, Bundle):
        body = {"type": "bundle", "version": msg.version, "bundle": msg.bundle}
    elif isinstance(msg, BundleAck):
        body = {"type": "bundle_ack", "version": msg.version}
    else:
        raise TypeError(f"not a control message: {msg!r}")
    return json.dumps(body, separators=(",", ":"))


def _get(body: dict, key: str, kind: type) -> Any:
    if key not in body:
        raise ProtocolError(f"{body.get('type', 'message')}.{key}: missing")
    value = body[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(f"{body.get('type', 'message')}.{key}: expected {kind.__name__}")
    return value


def _opt(body: dict, key: str, kind: type, default: Any) -> Any:
    if key not in body:
        return default
    return _get(body, key, kind)


def _pem(body: dict, key: str, marker: str, optional: bool = False) -> str:
    value = _opt(body, key, str, "") if optional else _get(body, key, str)
    if not value:
        if optional:
            return ""
        raise ProtocolError(f"{body.get('type')}.{key}: empty")
    if len(value) > MAX_PEM_CHARS:
        raise ProtocolError(f"{body.get('type')}.{key}: longer than {MAX_PEM_CHARS} characters")
    if f"-----BEGIN {marker}-----" not in value:
        raise ProtocolError(f"{body.get('type')}.{key}: expected PEM ({marker})")
    return value


def _number(body: dict, key: str, optional: bool = False) -> float:
    if optional and key not in body:
        return 0.0
    if key not in body:
        raise ProtocolError(f"{body.get('type')}.{key}: missing")
    value = body[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value in (
            float("inf"), float("-inf")):
        raise ProtocolError(f"{body.get('type')}.{key}: expected a finite number")
    return float(value)


def _purpose(body: dict) -> str:
    purpose = _opt(body, "purpose", str, "workload")
    if purpose not in CSR_PURPOSES:
        raise ProtocolError(f"{body.get('type')}.purpose: {purpose!r} is not one of {', '.join(CSR_PURPOSES)}")
    return purpose


def decode_message(text: str | bytes) -> Message:
    """Parse one control message; raises ProtocolError naming what is wrong."""
    try:
        body = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"not JSON: {exc}") from None
    except RecursionError:   # json nests by recursion: a peer's "[[[[..." must not pass as another error
        raise ProtocolError("not JSON: nested too deeply") from None
    if not isinstance(body, dict):
        raise ProtocolError("message: expected a JSON object")
    kind = body.get("type")
    if kind == "hello":
        node_kind = _get(body, "kind", str)
        if node_kind not in NODE_KINDS:
            raise ProtocolError(f"hello.kind: {node_kind!r} is not one of {', '.join(NODE_KINDS)}")
        token = _opt(body, "token", str, "")
        if len(token) > 256:
            raise ProtocolError("hello.token: longer than 256 characters")
        csr = _pem(body, "csr", "CERTIFICATE REQUEST", optional=True)
        if bool(token) != bool(csr):
            raise ProtocolError("hello: token and csr come together (bootstrap) or not at all")
        return Hello(kind=node_kind, node=_get(body, "node", str), container=_get(body, "container", str),
                     last_version=_get(body, "last_version", int), token=token, csr=csr)
    if kind == "snapshot":
        return SnapshotPush(version=_get(body, "version", int), snapshot=_get(body, "snapshot", dict))
    if kind == "ack":
        return Ack(version=_get(body, "version", int))
    if kind == "nack":
        return Nack(version=_get(body, "version", int), reason=_get(body, "reason", str))
    if kind == "certs":
        return Certs(cert_chain=_pem(body, "cert_chain", "CERTIFICATE"), bundle=_pem(body, "bundle", "CERTIFICATE"),
                     not_after=_number(body, "not_after"), renew_at=_number(body, "renew_at", optional=True),
                     purpose=_purpose(body))
    if kind == "csr":
        return CsrRequest(csr=_pem(body, "csr", "CERTIFICATE REQUEST"), purpose=_purpose(body))
    if kind == "renew":
        return Renew(reason=_opt(body, "reason", str, ""))
    if kind == "bundle":
        return Bundle(version=_get(body, "version", int), bundle=_pem(body, "bundle", "CERTIFICATE"))
    if kind == "bundle_ack":
        return BundleAck(version=_get(body, "version", int))
    raise ProtocolError(f"message.type: {kind!r} is not hello, snapshot, ack, nack, certs, csr, renew, "
                        "bundle or bundle_ack")


def reconnect_delay(attempt: int, rand: float, base: float = 0.2, cap: float = 5.0) -> float:
    """Seconds to wait before reconnect `attempt` (0-based): exponential backoff with full jitter.

    `rand` is a uniform number in [0, 1) supplied by the caller, so the schedule is testable.
    """
    ceiling = min(cap, base * (2 ** min(attempt, 30)))
    return ceiling * rand
