"""Who may use the control channel, and what meshd signs for it (see meshcore.bootstrap).

- bootstrap hello (token + CSR, no client certificate): the token checks, then Docker's word that the
  node's container is the one meshd created, in the app's network namespace (sidecar) or the host's
  (gateway), the websocket peer address, and the CSR's SPIFFE ID against the app's labels.
- any later hello: the TLS client certificate (verified by the TLS layer against the trust bundle)
  must be one meshd issued to that node (serial), for the node's identity, from the right address.
- renewals (`csr` on an authenticated connection) are signed for the connection's identity only.
"""

from __future__ import annotations

import asyncio
import ipaddress
from typing import TYPE_CHECKING

import docker
import structlog

from certs.ca import CsrRejected
from certs.holder import peer_identity
from meshcore.bootstrap import Placement, check_placement, check_token
from meshcore.labels import LabelDecodeError, decode_labels
from meshcore.protocol import CLOSE_FORBIDDEN, CLOSE_UNAUTHORIZED, Certs, CsrRequest, Hello

from .control import AuthRefused, AuthResult, NodeState
from .docker_adapter import GATEWAY_NAME, decode_container_attrs, sidecar_name

if TYPE_CHECKING:
    from .pki import Pki

log = structlog.get_logger("meshd.auth")


def _loopback(ip: str | None) -> bool:
    try:
        return ip is not None and ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


class NodeAuthenticator:
    """The Hub's `auth`: authenticate hellos, sign CSRs of authenticated nodes."""

    def __init__(self, pki: "Pki", client: docker.DockerClient, on_identity_lost=None):
        self.pki = pki
        self.client = client
        self.refused = 0
        # Called with a node name when meshd's own node (right container, right address) comes back
        # with its spent token: it lost its key (e.g. its certificate expired while meshd was away).
        # meshd then recreates it with a fresh token. A replay from anywhere else changes nothing.
        self.on_identity_lost = on_identity_lost

    # ---- Docker facts (blocking; run in a worker thread) -----------------------------------

    def _inspect(self, name_or_id: str) -> dict | None:
        if not name_or_id:
            return None
        try:
            return self.client.api.inspect_container(name_or_id)
        except docker.errors.NotFound:
            return None

    def _facts(self, hello: Hello, node_container: str) -> tuple[dict | None, dict | None]:
        node_attrs = self._inspect(node_container or (GATEWAY_NAME if hello.kind == "gateway" else hello.node))
        app_attrs = self._inspect(hello.container) if hello.kind == "sidecar" else None
        return node_attrs, app_attrs

    def _expected_identity(self, hello: Hello, app_attrs: dict | None) -> str:
        if hello.kind == "gateway":
            return self.pki.gateway_identity
        if app_attrs is None:
            raise AuthRefused(CLOSE_FORBIDDEN, "the app container does not exist")
        try:
            spec = decode_labels(decode_container_attrs(app_attrs))
        except LabelDecodeError as exc:
            raise AuthRefused(CLOSE_FORBIDDEN, f"the app container's mesh labels do not decode ({exc.label})")
        return self.pki.workload_identity(spec.namespace, spec.service)

    def _placement(self, hello: Hello, node_attrs: dict | None, app_attrs: dict | None, peer: str) -> str | None:
        if node_attrs is None:
            return "the node's container does not exist"
        node = decode_container_attrs(node_attrs)
        app = decode_container_attrs(app_attrs) if app_attrs is not None else None
        if hello.kind == "sidecar":
            if app is None:
                return "the app container does not exist"
            if node.name != sidecar_name(app) or hello.node != node.name:
                return "the node name is not the sidecar name of that app container"
        return check_placement(Placement(
            kind=hello.kind, node_labels=node.labels, node_network_mode=node.network_mode,
            node_running=node.running, app_id=app.id if app else "",
            app_ips=tuple(app.networks.values()) if app else (), peer_ip=peer or ""))

    # ---- the Hub's hooks -------------------------------------------------------------------

    async def authenticate(self, request, hello: Hello) -> AuthResult:
        peer = request.remote or ""
        sslobj = request.transport.get_extra_info("ssl_object") if request.transport else None
        loop = asyncio.get_running_loop()
        if hello.token:
            return await self._bootstrap(hello, peer, loop)
        identity = peer_identity(sslobj) if sslobj is not None else None
        if identity is None:
            reason = "no bootstrap token and no client certificate"
            if await self._gateway_lost(hello, peer, loop):
                reason += "; meshd recreates the gateway with a new token"
            raise AuthRefused(CLOSE_UNAUTHORIZED, reason)
        cert = sslobj.getpeercert() or {}
        try:
            serial = int(cert.get("serialNumber", ""), 16)
        except ValueError:
            raise AuthRefused(CLOSE_UNAUTHORIZED, "the client certificate has no serial number") from None
        record = self.pki.cert_record(hello.node)
        if record is None or not self.pki.cert_known(hello.node, serial):
            raise AuthRefused(CLOSE_FORBIDDEN, "the client certificate was not issued to this node")
        if record.get("identity") != identity or record.get("kind") != hello.kind \
                or record.get("container") != hello.container:
            raise AuthRefused(CLOSE_FORBIDDEN, "the client certificate is not this node's identity")
        if hello.kind == "gateway":
            if not _loopback(peer):
                raise AuthRefused(CLOSE_FORBIDDEN, "the gateway connects from loopback only")
        else:
            app_attrs = await loop.run_in_executor(None, self._inspect, hello.container)
            app = decode_container_attrs(app_attrs) if app_attrs else None
            if app is None or peer not in app.networks.values():
                raise AuthRefused(CLOSE_FORBIDDEN, f"the connection comes from {peer}, not from the app container")
        return AuthResult(identity=identity, via="certificate")

    async def _gateway_lost(self, hello: Hello, peer: str, loop) -> bool:
        """True (and meshd told to recreate it) when meshd's own gateway, from its place, comes back
        with neither a token nor a certificate: Docker restarted it after its token was spent and
        its saved certificate expired (a host down longer than a certificate's life). A sidecar in
        that state exits instead (sidecar.cli), and meshd recreates it."""
        if hello.kind != "gateway" or self.on_identity_lost is None:
            return False
        record = self.pki.token_record(hello.node)
        if record is None or record.used_at is None:
            return False
        node_attrs, app_attrs = await loop.run_in_executor(None, self._facts, hello, record.node_container)
        if self._placement(hello, node_attrs, app_attrs, peer) is not None:
            return False
        self.on_identity_lost(hello.node)
        return True

    async def _bootstrap(self, hello: Hello, peer: str, loop) -> AuthResult:
        record = self.pki.token_record(hello.node)
        reason = check_token(record, hello.kind, hello.node, hello.container, hello.token, self.pki.clock())
        if reason is not None:
            if "already used" in reason and self.on_identity_lost is not None:
                node_attrs, app_attrs = await loop.run_in_executor(None, self._facts, hello, record.node_container)
                if self._placement(hello, node_attrs, app_attrs, peer) is None:
                    self.on_identity_lost(hello.node)
                    reason += "; meshd recreates the node with a new token"
            raise AuthRefused(CLOSE_UNAUTHORIZED, reason)
        node_attrs, app_attrs = await loop.run_in_executor(None, self._facts, hello, record.node_container)
        reason = self._placement(hello, node_attrs, app_attrs, peer)
        if reason is not None:
            raise AuthRefused(CLOSE_FORBIDDEN, reason)
        identity = self._expected_identity(hello, app_attrs)
        try:
            certs = self.pki.sign_workload(hello.node, hello.kind, hello.container, hello.csr, identity)
        except CsrRejected as exc:
            raise AuthRefused(CLOSE_FORBIDDEN, exc.reason) from None
        self.pki.mark_used(hello.node)
        log.info("node_bootstrapped", node=hello.node, kind=hello.kind, identity=identity, peer=peer)
        return AuthResult(identity=identity, via="token", first=certs)

    async def sign(self, node: NodeState, identity: str, req: CsrRequest) -> Certs:
        try:
            if req.purpose == "gateway-server":
                if node.kind != "gateway":
                    raise AuthRefused(CLOSE_FORBIDDEN, "only the gateway gets a server certificate")
                return self.pki.sign_gateway_server(req.csr)
            return self.pki.sign_workload(node.node, node.kind, node.container, req.csr, identity)
        except CsrRejected as exc:
            raise AuthRefused(CLOSE_FORBIDDEN, exc.reason) from None
