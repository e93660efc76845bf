"""Messages of the meshd <-> sidecar control channel (JSON over a websocket); pure, stdlib only.

Modelled on Envoy's xDS: meshd pushes whole versioned snapshots, the node answers ACK or NACK with
a reason and keeps its last good snapshot either way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Union

CONTROL_PATH = "/v1/stream"
CONTROL_PORT = 15010  # istiod's plaintext xDS port
NODE_KINDS = ("sidecar", "gateway")


class ProtocolError(ValueError):
    """A control message that does not decode; the message names the field."""


@dataclass(frozen=True)
class Hello:
    """First message of a node: who it is and the last snapshot version it holds."""

    kind: str
    node: str            # the node's own name (sidecar container name, or "gateway")
    container: str       # the app container id a sidecar serves ("" for the gateway)
    last_version: int


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


Message = Union[Hello, SnapshotPush, Ack, Nack]


def encode_message(msg: Message) -> str:
    """Serialise one control message to its JSON text."""
    if isinstance(msg, Hello):
        body = {"type": "hello", "kind": msg.kind, "node": msg.node, "container": msg.container,
                "last_version": msg.last_version}
    elif isinstance(msg, SnapshotPush):
        body = {"type": "snapshot", "version": msg.version, "snapshot": msg.snapshot}
    elif isinstance(msg, Ack):
        body = {"type": "ack", "version": msg.version}
    elif isinstance(msg, Nack):
        body = {"type": "nack", "version": msg.version, "reason": msg.reason}
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


def decode_message(text: str | bytes) -> Message:
    """Parse one control message; raises ProtocolError naming what is wrong."""
    try:
        body = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ProtocolError("message: expected a JSON object")
    kind = body.get("type")
    if kind == "hello":
        node_kind = _get(body, "kind", str)
        if node_kind not in NODE_KINDS:
            raise ProtocolError(f"hello.kind: {node_kind!r} is not one of {', '.join(NODE_KINDS)}")
        return Hello(kind=node_kind, node=_get(body, "node", str), container=_get(body, "container", str),
                     last_version=_get(body, "last_version", int))
    if kind == "snapshot":
        return SnapshotPush(version=_get(body, "version", int), snapshot=_get(body, "snapshot", dict))
    if kind == "ack":
        return Ack(version=_get(body, "version", int))
    if kind == "nack":
        return Nack(version=_get(body, "version", int), reason=_get(body, "reason", str))
    raise ProtocolError(f"message.type: {kind!r} is not hello, snapshot, ack or nack")


def reconnect_delay(attempt: int, rand: float, base: float = 0.2, cap: float = 5.0) -> float:
    """Seconds to wait before reconnect `attempt` (0-based): exponential backoff with full jitter.

    `rand` is a uniform number in [0, 1) supplied by the caller, so the schedule is testable.
    """
    ceiling = min(cap, base * (2 ** min(attempt, 30)))
    return ceiling * rand
