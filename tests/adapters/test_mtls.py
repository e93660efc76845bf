"""Zero trust on loopback with throwaway CAs: mTLS between two ProxyStates, authorization, rotation,
and the bootstrap of node identities over meshd's Hub with a real ControlClient."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from contextlib import AsyncExitStack

import aiohttp
import pytest
from aiohttp import web

from certs.ca import CertificateAuthority
from meshcore.authz import Policy, make_rule
from meshcore.bootstrap import hash_token
from meshcore.protocol import CONTROL_PATH, Certs
from meshcore.snapshot import Endpoint, MeshConfig, ServiceConfig, Snapshot
from meshd.auth import NodeAuthenticator
from meshd.control import Hub
from meshd.pki import Pki
from meshd.store import Store
from sidecar.control import ControlClient
from sidecar.mtls import Authorizer, start_mesh_inbound
from sidecar.proxy import ProxyState, start_outbound
from sidecar.routing import build_route_table
from sidecar.tlsagent import CertAgent, MeshTls
from tests.adapters.loops import GUARD_S, eventually
from tests.adapters.test_proxy import App, port_of

TD = "mesh.local"
ORDERS = "spiffe://mesh.local/ns/shop/sa/orders"
PAYMENTS = "spiffe://mesh.local/ns/shop/sa/payments"
INVENTORY = "spiffe://mesh.local/ns/shop/sa/inventory"
SVC_PORT = 8080


async def issue(agent: CertAgent, ca: CertificateAuthority, ttl: float = 3600, identity: str | None = None) -> None:
    """What meshd does for a node: sign its CSR, send `certs` (key, CSR and reading: the certs worker process)."""
    csr = await agent.new_csr()
    issued = ca.sign_csr(csr.encode(), identity or agent.identity, ttl, time.time())
    await agent.install(Certs(cert_chain=issued.full_chain_pem.decode(), bundle=ca.bundle_pem.decode(),
                        not_after=issued.not_after))


async def make_agent(ca: CertificateAuthority, identity: str, cert_identity: str | None = None) -> CertAgent:
    agent = CertAgent(cert_identity or identity, ca.bundle_pem, tls_dir=None)
    await issue(agent, ca)
    agent.identity = identity
    return agent


def snapshot(mtls: str = "strict", policy: Policy | None = None, allow=None, port: int = 0,
             version: int = 1) -> Snapshot:
    services = {
        "payments": ServiceConfig("payments", "shop", "http", SVC_PORT, PAYMENTS, mtls=mtls, allow=allow),
        "orders": ServiceConfig("orders", "shop", "http", SVC_PORT, ORDERS),
    }
    endpoints = {"payments": (Endpoint("pay-1", "127.0.0.1", port, "v1", PAYMENTS),)}
    cfg = MeshConfig(services=services, endpoints=endpoints, policies=policy or Policy())
    return Snapshot(version=version, config=cfg)


class Pair:
    """client -> outbound (orders) -> mTLS -> inbound 15006 (payments) -> app."""

    def __init__(self, stack: AsyncExitStack, ca: CertificateAuthority):
        self.stack = stack
        self.ca = ca

    async def start(self, *, server_identity: str = PAYMENTS, mtls: str = "strict",
                    policy: Policy | None = None) -> "Pair":
        self.app = await App().start()
        self.stack.push_async_callback(self.app.stop)
        self.pay_agent = await make_agent(self.ca, PAYMENTS, cert_identity=server_identity)
        self.inbound = ProxyState("payments", "v1", tls=MeshTls(self.pay_agent))
        self.inbound.authz = Authorizer("payments")
        self.stack.callback(self.inbound.close)
        self.server = await start_mesh_inbound(self.inbound, "127.0.0.1", 0, app_port=self.app.port)
        self.stack.callback(self.server.close)
        self.port = self.server.sockets[0].getsockname()[1]
        self.apply(snapshot(mtls, policy, port=self.port))
        self.orders_agent = await make_agent(self.ca, ORDERS)
        self.outbound = ProxyState("orders", "v1", table=self.table, tls=MeshTls(self.orders_agent))
        self.stack.callback(self.outbound.close)
        out = await start_outbound(self.outbound, "127.0.0.1", 0, mode="explicit")
        self.stack.callback(out.close)
        self.proxy = f"http://127.0.0.1:{port_of(out)}"
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=GUARD_S))
        self.stack.push_async_callback(self.session.close)
        return self

    def apply(self, snap: Snapshot) -> None:
        self.table = build_route_table(snap)
        self.inbound.apply_snapshot(snap)
        self.inbound.authz.update(snap)
        if hasattr(self, "outbound"):
            self.outbound.apply_snapshot(snap)

    async def get(self, path: str = "/echo", method: str = "GET"):
        async with self.session.request(method, f"http://payments:{SVC_PORT}{path}", proxy=self.proxy) as r:
            return r.status, dict(r.headers), await r.read()


def metric(state: ProxyState, name: str, **labels) -> float:
    """Sum of the samples of `name` whose labels include `labels` (request and TLS series)."""
    total = 0.0
    families = list(state.telemetry.registry.collect())
    if state.tls is not None and state.tls.stats.registry is not state.telemetry.registry:
        families += list(state.tls.stats.registry.collect())
    for family in families:
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total



# ---- mTLS on the data path ----------------------------------------------------------------------

async def _mtls_ok(ca):
    async with AsyncExitStack() as stack:
        pair = await Pair(stack, ca).start()
        status, _, body = await pair.get()
        assert status == 200, body
        import json
        headers = json.loads(body)["headers"]
        assert headers["x-forwarded-client-cert"] == f"URI={ORDERS}"      # the verified caller
        assert metric(pair.inbound, "istio_requests_total", reporter="destination", source_workload="orders",
                      response_code="200", connection_security_policy="mutual_tls") == 1
        assert metric(pair.outbound, "istio_requests_total", reporter="source", destination_service="payments",
                      response_code="200", connection_security_policy="mutual_tls") == 1
        assert metric(pair.inbound, "mesh_tls_connections_total", direction="inbound", tls_version="TLSv1.3") == 1
        assert metric(pair.outbound, "mesh_tls_connections_total", direction="outbound", tls_version="TLSv1.3") == 1


def test_mtls_call_succeeds_and_the_inbound_sees_the_verified_caller(run, ca):
    run(_mtls_ok, ca)


async def _raw(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        return await asyncio.wait_for(reader.read(), 5)
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


async def _plaintext_refused(ca):
    async with AsyncExitStack() as stack:
        pair = await Pair(stack, ca).start()
        assert await _raw(pair.port, b"GET /echo HTTP/1.1\r\nhost: payments\r\n\r\n") == b""
        assert pair.app.peers == set()
        assert metric(pair.inbound, "mesh_tls_refused_total", direction="inbound", reason="plaintext") == 1


def test_plaintext_to_a_strict_inbound_is_refused(run, ca):
    run(_plaintext_refused, ca)


async def _other_ca_refused(ca):
    other = CertificateAuthority.create(TD, time.time())   # same trust domain, another root
    async with AsyncExitStack() as stack:
        pair = await Pair(stack, ca).start()
        rogue = await make_agent(other, ORDERS)
        ctx = rogue.holder.client_context()
        with pytest.raises((ssl.SSLError, ConnectionResetError, asyncio.IncompleteReadError)):
            reader, writer = await asyncio.open_connection("127.0.0.1", pair.port, ssl=ctx, server_hostname="payments")
            writer.write(b"GET /echo HTTP/1.1\r\nhost: payments\r\n\r\n")
            data = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            if not data:
                raise ConnectionResetError("closed without an answer")
        # A client without any certificate (but trusting the mesh CA) is refused too.
        bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        bare.check_hostname = False
        bare.load_verify_locations(cadata=ca.bundle_pem.decode())
        with pytest.raises((ssl.SSLError, ConnectionResetError, asyncio.IncompleteReadError)):
            reader, writer = await asyncio.open_connection("127.0.0.1", pair.port, ssl=bare)
            writer.write(b"GET /echo HTTP/1.1\r\nhost: payments\r\n\r\n")
            data = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            if not data:
                raise ConnectionResetError("closed without an answer")
        assert pair.app.peers == set()


def test_a_certificate_of_another_ca_or_none_is_refused(run, ca):
    run(_other_ca_refused, ca)


async def _wrong_identity(ca):
    async with AsyncExitStack() as stack:
        # The inbound at payments' address presents inventory's (valid, same CA) certificate.
        pair = await Pair(stack, ca).start(server_identity=INVENTORY)
        status, headers, _ = await pair.get()
        assert status == 503 and headers["x-mesh-flags"] == "UF"
        assert pair.app.peers == set()
        assert metric(pair.outbound, "mesh_tls_refused_total", direction="outbound", reason="peer_identity") >= 1


def test_a_peer_with_the_wrong_spiffe_id_is_refused_by_check_peer(run, ca):
    run(_wrong_identity, ca)


async def _permissive(ca):
    async with AsyncExitStack() as stack:
        pair = await Pair(stack, ca).start(mtls="permissive")
        raw = await _raw(pair.port, b"GET /echo HTTP/1.1\r\nhost: payments\r\nx-mesh-source: orders\r\n"
                                    b"connection: close\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 200"), raw[:200]
        assert b"x-forwarded-client-cert" not in raw                 # no verified identity
        assert (await pair.get())[0] == 200                           # mTLS still works
        assert metric(pair.inbound, "mesh_tls_connections_total", direction="inbound", tls_version="plaintext") == 1
        # The plaintext caller is unauthenticated: a mesh.allow label keeps it out.
        pair.apply(snapshot("permissive", allow=("orders",), port=pair.port, version=2))
        raw = await _raw(pair.port, b"GET /echo HTTP/1.1\r\nhost: payments\r\nx-mesh-source: orders\r\n"
                                    b"connection: close\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 403") and b"x-mesh-denied: unauthenticated caller" in raw
        assert (await pair.get())[0] == 200                           # orders over mTLS is allowed


def test_permissive_accepts_plaintext_and_mtls(run, ca):
    run(_permissive, ca)


async def _deny(ca):
    async with AsyncExitStack() as stack:
        pair = await Pair(stack, ca).start()
        assert (await pair.get())[0] == 200
        deny = Policy(rules=(make_rule("deny", "orders", "payments"),))
        pair.apply(snapshot(policy=deny, port=pair.port, version=2))
        status, headers, body = await pair.get()
        assert status == 403 and headers["x-mesh-flags"] == "RBAC"
        assert headers["x-mesh-denied"] == "rule deny orders -> payments", headers
        assert metric(pair.inbound, "istio_requests_total", reporter="destination", source_workload="orders",
                      response_code="403", response_flags="RBAC") == 1
        # A path rule: POST /pay allowed only; deny wins over allow; the default applies last.
        policy = Policy(default="deny", rules=(make_rule("allow", "orders", "payments", "/echo", "GET"),))
        pair.apply(snapshot(policy=policy, port=pair.port, version=3))
        assert (await pair.get("/echo"))[0] == 200
        status, headers, _ = await pair.get("/echo", "POST")
        assert status == 403 and headers["x-mesh-denied"] == "default deny"


def test_authorization_deny_is_403_with_a_reason_and_counted_as_rbac(run, ca):
    run(_deny, ca)


async def _rotation(ca):
    async with AsyncExitStack() as stack:
        pair = await Pair(stack, ca).start()
        failures = []
        serials = set()
        for i in range(200):
            if i in (50, 120):
                await issue(pair.pay_agent, ca)       # new key and certificate on the inbound
                await issue(pair.orders_agent, ca)    # and on the caller
            if i == 150:
                pair.outbound.pools.close()      # pooled connections close: new handshakes
            status, _, body = await pair.get()
            if status != 200:
                failures.append((i, status, body[:100]))
            serials.add(pair.pay_agent.material.serial)
        assert failures == []
        assert len(serials) == 3 and pair.pay_agent.installed == 3


def test_rotation_mid_stream_fails_no_request(run, ca):
    run(_rotation, ca)


# ---- bootstrap over the control channel -------------------------------------------------------------

class FakeDocker:
    """docker.DockerClient.api.inspect_container for one app and its sidecar."""

    def __init__(self, containers: dict[str, dict]):
        self.api = self
        self.containers = containers

    def inspect_container(self, name_or_id):
        import docker.errors
        for key, attrs in self.containers.items():
            if name_or_id in (key, attrs["Id"]):
                return attrs
        raise docker.errors.NotFound("no such container")


def attrs(cid: str, name: str, labels: dict, network_mode: str = "", ip: str = "127.0.0.1") -> dict:
    return {"Id": cid, "Name": "/" + name, "Config": {"Labels": labels, "ExposedPorts": {"8080/tcp": {}}},
            "State": {"Running": True}, "HostConfig": {"NetworkMode": network_mode},
            "NetworkSettings": {"Networks": {"shop_default": {"IPAddress": ip}}}}


APP_ID = "a" * 64
OTHER_ID = "b" * 64


class ControlPlane:
    """meshd's Hub with the real authenticator, on a TLS listener of loopback."""

    def __init__(self, tmp_path, ttl: str = "1h"):
        self.store = Store(str(tmp_path / "state.db"))
        self.pki = Pki(str(tmp_path), TD, self.store, cert_ttl=ttl)
        docker = FakeDocker({
            "shop-orders-1": attrs(APP_ID, "shop-orders-1", {"mesh.enable": "true", "com.docker.compose.project": "shop",
                                                             "com.docker.compose.service": "orders"}),
            "shop-orders-1-mesh": attrs("c" * 64, "shop-orders-1-mesh",
                                        {"mesh.owner": "meshd", "mesh.role": "sidecar", "mesh.sidecar.for": APP_ID},
                                        network_mode=f"container:{APP_ID}"),
            "shop-users-1": attrs(OTHER_ID, "shop-users-1", {"mesh.enable": "true", "com.docker.compose.project": "shop",
                                                             "com.docker.compose.service": "users"}),
            "shop-users-1-mesh": attrs("d" * 64, "shop-users-1-mesh",
                                       {"mesh.owner": "meshd", "mesh.role": "sidecar", "mesh.sidecar.for": OTHER_ID},
                                       network_mode=f"container:{OTHER_ID}"),
            "meshd-gateway": attrs("e" * 64, "meshd-gateway", {"mesh.owner": "meshd", "mesh.role": "gateway"},
                                   network_mode="host"),
        })
        self.lost: list[str] = []
        self.refused: list[tuple] = []   # what meshd turns into node_refused events
        self.hub = Hub(auth=NodeAuthenticator(self.pki, docker, on_identity_lost=self.lost.append),
                       on_refused=lambda hello, peer, exc: self.refused.append((hello.node, peer, exc.code, exc.reason)))

    async def start(self, stack: AsyncExitStack, port: int = 0) -> "ControlPlane":
        app = web.Application()
        app.router.add_get(CONTROL_PATH, self.hub.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        self.pki.control_tls.ensure([])
        if not port:
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            sock.close()
        self.port = port
        await web.TCPSite(runner, "127.0.0.1", self.port, ssl_context=self.pki.control_tls.front,
                          reuse_address=True).start()
        cfg = MeshConfig(services={"orders": ServiceConfig("orders", "shop", "http", 8080, ORDERS)})
        self.hub.publish(Snapshot(version=1, config=cfg))
        return self

    @property
    def url(self) -> str:
        return f"wss://127.0.0.1:{self.port}{CONTROL_PATH}"

    def node(self, token: str, identity: str = ORDERS, node: str = "shop-orders-1-mesh",
             container: str = APP_ID) -> tuple[ControlClient, CertAgent]:
        agent = CertAgent(identity, self.pki.ca.bundle_pem, token, tls_dir=None)
        client = ControlClient(self.url, "sidecar", node, container, apply=lambda s: None, rand=lambda: 0.05,
                               agent=agent)
        return client, agent


async def _bootstrap(tmp_path):
    async with AsyncExitStack() as stack:
        cp = await ControlPlane(tmp_path, ttl="6s").start(stack)
        token = cp.pki.issue_token("sidecar", "shop-orders-1-mesh", APP_ID)
        assert cp.pki.token_record("shop-orders-1-mesh").token_hash == hash_token(token)
        assert token not in (tmp_path / "state.db").read_bytes().decode("latin-1")   # stored hashed only
        client, agent = cp.node(token)
        task = asyncio.ensure_future(client.run())
        stack.callback(task.cancel)
        await eventually(lambda: agent.has_valid_cert() and client.current is not None, "the first certificate")
        assert agent.material.identity == ORDERS
        first_serial = agent.material.serial
        node = cp.hub.nodes["shop-orders-1-mesh"]
        assert node.auth_via == "token" and node.identity == ORDERS
        assert cp.pki.token_record("shop-orders-1-mesh").used_at is not None

        # Replay: the same token again (another process that read it from `docker inspect`).
        thief, thief_agent = cp.node(token)
        t2 = asyncio.ensure_future(thief.run())
        stack.callback(t2.cancel)
        await eventually(lambda: thief.refusals >= 1, "the replayed token to be refused")
        assert "already used" in thief.last_refusal and not thief_agent.has_valid_cert()
        # It came from the app's own address and the real sidecar container (loopback here): that is
        # the node itself having lost its key, so meshd is told to recreate it with a new token.
        assert cp.lost and set(cp.lost) == {"shop-orders-1-mesh"} and "recreates" in thief.last_refusal
        assert [r[:3] for r in cp.refused][:1] == [("shop-orders-1-mesh", "127.0.0.1", 4401)], cp.refused
        assert "already used" in cp.refused[0][3] and token not in repr(cp.refused)

        # A token of another container, and a CSR for another identity, get nothing either.
        other = cp.pki.issue_token("sidecar", "shop-users-1-mesh", OTHER_ID)
        c3, a3 = cp.node(other, node="shop-orders-1-mesh")
        t3 = asyncio.ensure_future(c3.run())
        stack.callback(t3.cancel)
        await eventually(lambda: c3.refusals >= 1, "a token of another node to be refused")
        assert not a3.has_valid_cert()
        c4, a4 = cp.node(other, identity=ORDERS, node="shop-users-1-mesh", container=OTHER_ID)
        t4 = asyncio.ensure_future(c4.run())
        stack.callback(t4.cancel)
        await eventually(lambda: c4.refusals >= 1, "a CSR for another identity to be refused")
        assert not a4.has_valid_cert()
        assert "expected 'spiffe://mesh.local/ns/shop/sa/users'" in c4.last_refusal, c4.last_refusal
        assert cp.pki.token_record("shop-users-1-mesh").used_at is None     # nothing signed, token unspent

        # Renewal over the authenticated channel: the 6 s certificate renews at ~3 s, with a new key.
        await eventually(lambda: agent.material.serial != first_serial, "a renewal", timeout=10)
        assert agent.installed >= 2
        assert cp.pki.cert_record("shop-orders-1-mesh")["renewals"] >= 1
        # A reconnect authenticates with the certificate (no token needed any more).
        await cp.hub.drop("shop-orders-1-mesh")
        await eventually(lambda: cp.hub.nodes.get("shop-orders-1-mesh") is not None
                         and cp.hub.nodes["shop-orders-1-mesh"].auth_via == "certificate"
                         and cp.hub.nodes["shop-orders-1-mesh"].connected, "a reconnect with the certificate")


def test_bootstrap_token_once_replay_and_foreign_identity_refused_renewal_over_the_channel(tmp_path):
    asyncio.run(asyncio.wait_for(_bootstrap(tmp_path), 30))


async def _gateway_restarted_without_credentials(tmp_path):
    async with AsyncExitStack() as stack:
        cp = await ControlPlane(tmp_path).start(stack)

        def gateway(token: str) -> tuple[ControlClient, CertAgent]:
            agent = CertAgent(cp.pki.gateway_identity, cp.pki.ca.bundle_pem, token, tls_dir=None)
            return ControlClient(cp.url, "gateway", "gateway", "", apply=lambda s: None, rand=lambda: 0.05,
                                 agent=agent), agent

        token = cp.pki.issue_token("gateway", "gateway", "")
        early, _ = gateway("")           # no token, no certificate, before the token was spent
        t0 = asyncio.ensure_future(early.run())
        stack.callback(t0.cancel)
        await eventually(lambda: early.refusals >= 1, "a hello without credentials refused")
        assert cp.lost == [] and "recreates" not in early.last_refusal, early.last_refusal
        t0.cancel()
        first, agent = gateway(token)
        t1 = asyncio.ensure_future(first.run())
        await eventually(lambda: agent.has_valid_cert(), "the gateway's first certificate")
        t1.cancel()
        # Docker restarted it after its certificate expired: no token (spent, its file deleted), no
        # certificate. meshd recreates it with a new token instead of refusing it forever.
        restarted, _ = gateway("")
        t2 = asyncio.ensure_future(restarted.run())
        stack.callback(t2.cancel)
        await eventually(lambda: restarted.refusals >= 1, "the restarted gateway refused")
        # (each retry asks again; meshd itself recreates a node at most once a minute)
        assert set(cp.lost) == {"gateway"} and "recreates the gateway" in restarted.last_refusal, restarted.last_refusal


def test_a_gateway_restarted_without_token_nor_certificate_is_recreated(tmp_path):
    asyncio.run(asyncio.wait_for(_gateway_restarted_without_credentials(tmp_path), 30))


async def _root_rotation(tmp_path):
    async with AsyncExitStack() as stack:
        cp = await ControlPlane(tmp_path).start(stack)
        client, agent = cp.node(cp.pki.issue_token("sidecar", "shop-orders-1-mesh", APP_ID))
        task = asyncio.ensure_future(client.run())
        stack.callback(task.cancel)
        await eventually(lambda: agent.has_valid_cert(), "the first certificate")
        old_root = cp.pki.ca.roots[0]
        rot = cp.pki.start_rotation(cp.hub, root=True)
        await eventually(lambda: rot.state != "running", "the root rotation", timeout=20)
        assert rot.state == "done", rot.to_dict()
        steps = [e["step"] for e in rot.log]
        assert steps == ["distributing_bundle", "switching_signer", "renewing", "retiring_old_root", "done"]
        assert cp.pki.ca.roots[0] != old_root and len(cp.pki.ca.roots) == 1
        assert agent.material.bundle_pem == cp.pki.ca.bundle_pem          # new-only bundle installed
        assert cp.pki.cert_record("shop-orders-1-mesh")["issuer"] == rot.new_root


def test_root_rotation_bundle_then_leaves_then_retire(tmp_path):
    asyncio.run(asyncio.wait_for(_root_rotation(tmp_path), 40))


async def _root_rotation_resumed(tmp_path, phase: str):
    """meshd stops inside `phase` of a root rotation; the next meshd (same state) finishes it."""
    async with AsyncExitStack() as stack:
        first_stack = AsyncExitStack()
        cp = await ControlPlane(tmp_path).start(first_stack)
        port = cp.port
        client, agent = cp.node(cp.pki.issue_token("sidecar", "shop-orders-1-mesh", APP_ID))
        task = asyncio.ensure_future(client.run())
        stack.callback(task.cancel)
        await eventually(lambda: agent.has_valid_cert(), "the first certificate")
        old_root = cp.pki.ca.roots[0]
        # The step that runs in `phase` never returns: meshd is stopped there.
        stuck = asyncio.Event()
        hang_in, pushes = {"distributing_bundle": ("_push_bundle", 1), "renewing": ("_renew_all", 1),
                           "retiring_old_root": ("_push_bundle", 2)}[phase], [0]
        real = getattr(cp.pki, hang_in[0])

        async def step(*args):
            pushes[0] += 1
            if pushes[0] == hang_in[1]:
                stuck.set()
                await asyncio.Event().wait()
            await real(*args)

        setattr(cp.pki, hang_in[0], step)
        cp.pki.start_rotation(cp.hub, root=True)
        await asyncio.wait_for(stuck.wait(), 20)
        assert cp.pki.interrupted_root_rotation()["phase"] == phase
        cp.pki._rotation_task.cancel()
        await cp.hub.close_all()   # as meshd does when it stops
        await first_stack.aclose()
        cp.store.close()

        cp2 = await ControlPlane(tmp_path).start(stack, port=port)
        assert cp2.pki.interrupted_root_rotation()["phase"] == phase
        await eventually(lambda: (n := cp2.hub.nodes.get("shop-orders-1-mesh")) is not None and n.connected
                         and n.authenticated, "the node reconnected to the new meshd", timeout=20)
        await cp2.pki.resume_root_rotation(cp2.hub, after_s=0)
        rot = cp2.pki.rotation
        await eventually(lambda: rot.state != "running", "the resumed root rotation", timeout=20)
        assert rot.state == "done", rot.to_dict()
        assert [e["step"] for e in rot.log][0] == "resumed" and rot.log[-1]["step"] == "done"
        assert len(cp2.pki.ca.roots) == 1 and cp2.pki.ca.roots[0] != old_root
        assert cp2.pki.cert_record("shop-orders-1-mesh")["issuer"] == rot.new_root
        await eventually(lambda: agent.material.bundle_pem == cp2.pki.ca.bundle_pem, "the new-only bundle installed")
        assert cp2.pki.interrupted_root_rotation() is None and not (tmp_path / "ca-staged").exists()
        task.cancel()
        await cp2.hub.close_all()


@pytest.mark.parametrize("phase", ["distributing_bundle", "renewing", "retiring_old_root"])
def test_root_rotation_interrupted_by_a_meshd_restart_is_resumed(tmp_path, phase):
    asyncio.run(asyncio.wait_for(_root_rotation_resumed(tmp_path, phase), 60))


async def _tcp_authz(ca):
    async def echo(reader, writer):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()

    async with AsyncExitStack() as stack:
        app = await asyncio.start_server(echo, "127.0.0.1", 0)
        stack.callback(app.close)
        pay_agent = await make_agent(ca, PAYMENTS)
        inbound = ProxyState("payments", "v1", tls=MeshTls(pay_agent))
        inbound.authz = Authorizer("payments")
        stack.callback(inbound.close)
        server = await start_mesh_inbound(inbound, "127.0.0.1", 0, app_port=app.sockets[0].getsockname()[1],
                                          protocol="tcp")
        stack.callback(server.close)
        port = server.sockets[0].getsockname()[1]
        ctx = (await make_agent(ca, ORDERS)).holder.client_context()

        async def talk() -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
            try:
                writer.write(b"ping")
                return await asyncio.wait_for(reader.read(4), 5)
            except (ConnectionResetError, ssl.SSLError):
                return b""
            finally:
                writer.close()

        assert await talk() == b"ping"
        snap = snapshot(policy=Policy(rules=(make_rule("deny", "orders", "payments"),)))
        inbound.authz.update(snap)
        assert await talk() == b""
        assert inbound.authz.denied == 1


def test_tcp_inbound_is_authorized_per_connection(run, ca):
    run(_tcp_authz, ca)


async def _short_certs_after_a_rotation(tmp_path):
    """A node with a 1 h certificate gets 4 s ones from a leaf rotation: its renew loop, asleep
    until the old certificate's renew time, wakes at the install and renews every ~2 s from then on."""
    async with AsyncExitStack() as stack:
        cp = await ControlPlane(tmp_path, ttl="1h").start(stack)
        client, agent = cp.node(cp.pki.issue_token("sidecar", "shop-orders-1-mesh", APP_ID))
        task = asyncio.ensure_future(client.run())
        stack.callback(task.cancel)
        await eventually(lambda: agent.has_valid_cert(), "the first certificate")
        await asyncio.sleep(1.5)      # the renew loop (1 s steps until the first certificate) now sleeps 30 s
        cp.pki.cert_ttl_s = 4.0
        rot = cp.pki.start_rotation(cp.hub, root=False)
        await eventually(lambda: rot.state != "running", "the leaf rotation", timeout=10)
        after_rotation = cp.pki.cert_record("shop-orders-1-mesh")["renewals"]
        await eventually(lambda: cp.pki.cert_record("shop-orders-1-mesh")["renewals"] >= after_rotation + 3,
                         "three renewals of the 4 s certificate", timeout=12)
        assert agent.has_valid_cert()
        task.cancel()
        await cp.hub.close_all()


def test_a_rotation_to_short_certificates_wakes_the_renew_loop(tmp_path):
    asyncio.run(asyncio.wait_for(_short_certs_after_a_rotation(tmp_path), 40))
