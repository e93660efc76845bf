"""Bootstrap of node identities: one-time tokens bound to Docker facts; pure, standard library only.

meshd creates every sidecar (and the gateway) with a random one-time token and keeps only the token's
SHA-256, with the node's name and app container id. The token is never in the node's environment
(which `docker inspect` shows): meshd copies it as a file (`token_archive`, at TOKEN_FILE) into the
created, not yet started container, and the node deletes the file once the token is spent. The
node's first hello carries the token and a CSR. meshd signs only when every check below passes, then marks the token
used; a token is never accepted twice. Everything after that authenticates with the certificate.

Checks (`check_token`, then `check_placement`; each failure has a reason that names no secret):
- a token record exists for the node's name, of the same kind (sidecar/gateway);
- the presented token hashes to the recorded hash (constant-time comparison);
- the token was not used before and has not expired;
- the hello's container is the app container the record was made for;
- Docker says the node's container is the one meshd created (owner/role labels, its app label),
  and, for a sidecar, that it runs in the app container's network namespace
  (`HostConfig.NetworkMode == container:<app id>`); the gateway runs in the host namespace;
- the websocket peer address is one of the app container's IPs (sidecar) or loopback (gateway);
- the CSR requests exactly the identity meshd derives from the app's labels (checked when signing).
"""

from __future__ import annotations

import hashlib
import hmac
import io
import ipaddress
from dataclasses import dataclass

TOKEN_TTL_S = 24 * 3600.0   # an unused token expires (meshd then recreates the node)
NODE_UID = 1337             # the uid the nodes run as (Istio's proxy uid); it owns the token file
TOKEN_DIR_PARENT = "/run"   # exists in every Debian-based image; the archive adds TOKEN_DIR below it
TOKEN_DIR = "mesh"
TOKEN_NAME = "bootstrap-token"
TOKEN_FILE = f"{TOKEN_DIR_PARENT}/{TOKEN_DIR}/{TOKEN_NAME}"
TOKEN_FILE_ENV = "MESH_BOOTSTRAP_TOKEN_FILE"   # overrides TOKEN_FILE (tests)
TOKEN_ENV = "MESH_BOOTSTRAP_TOKEN"             # the Swarm agent's gateway subprocess only


def token_archive(token: str, uid: int = NODE_UID, mtime: float = 0.0) -> bytes:
    """A tar archive (for Docker's put_archive at TOKEN_DIR_PARENT) of TOKEN_DIR (0700) holding
    TOKEN_NAME (0400), both owned by `uid`: the node reads the token, and deletes it once spent."""
    import tarfile  # meshd only: the nodes import this module for its constants

    out = io.BytesIO()
    data = token.encode("ascii")
    with tarfile.open(fileobj=out, mode="w") as tar:
        folder = tarfile.TarInfo(TOKEN_DIR)
        folder.type, folder.mode, folder.uid, folder.gid, folder.mtime = tarfile.DIRTYPE, 0o700, uid, uid, mtime
        tar.addfile(folder)
        entry = tarfile.TarInfo(f"{TOKEN_DIR}/{TOKEN_NAME}")
        entry.size, entry.mode, entry.uid, entry.gid, entry.mtime = len(data), 0o400, uid, uid, mtime
        tar.addfile(entry, io.BytesIO(data))
    return out.getvalue()



def hash_token(token: str) -> str:
    """The stored form of a token: SHA-256, hex."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class TokenRecord:
    """What meshd stores for one issued token (never the token itself)."""

    node: str
    kind: str              # "sidecar" | "gateway"
    container: str         # the app container id ("" for the gateway)
    token_hash: str
    created_at: float
    used_at: float | None = None
    node_container: str = ""   # the sidecar/gateway container id, once created

    def to_dict(self) -> dict:
        return {"node": self.node, "kind": self.kind, "container": self.container,
                "token_hash": self.token_hash, "created_at": self.created_at, "used_at": self.used_at,
                "node_container": self.node_container}

    @classmethod
    def from_dict(cls, d: dict) -> "TokenRecord":
        return cls(node=d["node"], kind=d["kind"], container=d.get("container", ""),
                   token_hash=d["token_hash"], created_at=float(d["created_at"]),
                   used_at=d.get("used_at"), node_container=d.get("node_container", ""))


def check_token(record: TokenRecord | None, kind: str, node: str, container: str, token: str,
                now: float, ttl_s: float = TOKEN_TTL_S) -> str | None:
    """None when `token` is the unused, unexpired token of this node; else the reason it is refused."""
    if record is None:
        return f"no bootstrap token was issued for node {node!r}"
    if record.node != node or record.kind != kind:
        return f"the token record is not for {kind} {node!r}"
    if not hmac.compare_digest(record.token_hash, hash_token(token)):
        return f"wrong bootstrap token for node {node!r}"
    if record.used_at is not None:
        return f"the bootstrap token of node {node!r} was already used"
    if now > record.created_at + ttl_s:
        return f"the bootstrap token of node {node!r} has expired"
    if record.container != container:
        return f"the token of node {node!r} belongs to another container"
    return None


@dataclass(frozen=True)
class Placement:
    """Docker facts about a node that asks for its first certificate."""

    kind: str
    node_labels: dict
    node_network_mode: str
    node_running: bool
    app_id: str                      # "" for the gateway
    app_ips: tuple[str, ...]         # the app container's IPv4 addresses
    peer_ip: str                     # the websocket peer address


def _is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


def check_placement(p: Placement) -> str | None:
    """None when Docker confirms the node is where meshd put it; else the reason."""
    if not p.node_running:
        return "the node's container is not running"
    if p.node_labels.get("mesh.owner") != "meshd":
        return "the node's container was not created by meshd"
    if p.kind == "sidecar":
        if p.node_labels.get("mesh.role") != "sidecar" or p.node_labels.get("mesh.sidecar.for") != p.app_id:
            return "the node's container is not the sidecar of that app container"
        if p.node_network_mode != f"container:{p.app_id}":
            return "the node's container does not share the app container's network namespace"
        if p.peer_ip not in p.app_ips:
            return f"the connection comes from {p.peer_ip}, not from the app container's addresses"
        return None
    if p.node_labels.get("mesh.role") != "gateway":
        return "the node's container is not meshd's gateway"
    if p.node_network_mode != "host":
        return "the gateway does not run in the host network namespace"
    if not _is_loopback(p.peer_ip):
        return f"the gateway connects from {p.peer_ip}, not from loopback"
    return None


