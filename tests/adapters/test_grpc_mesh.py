"""gRPC through a sidecar pair on loopback: a grpcio client (h2c, prior knowledge) -> outbound
(transparent: the preface makes the connection HTTP/2, each stream an exchange of the layers) ->
mutual TLS, HTTP/1.1 chunked with trailers -> inbound of a `grpc` service -> a grpcio server (h2c).
Every call kind streams through; trailers and statuses arrive; calls on one channel are balanced per
call across endpoints; the exchanges are counted by both sidecars."""

from __future__ import annotations

import asyncio
import threading
import time
from contextlib import AsyncExitStack

import grpc
import pytest

import dataclasses

from certs.ca import CertificateAuthority
from certs.holder import build_context
from certs.keys import build_server_csr, generate_key
from meshcore.authz import Policy, make_rule
from meshcore.limits import Limits
from meshcore.policy import decode_traffic_policy
from gateway.server import start_gateway
from meshcore.snapshot import Endpoint, GatewayRoute, MeshConfig, ServiceConfig, Snapshot
from sidecar.mtls import Authorizer, start_mesh_inbound
from sidecar.proxy import ProxyState, start_outbound
from sidecar.routing import build_route_table
from sidecar.tlsagent import MeshTls, ServerCert
from tests.adapters.loops import GUARD_S
from tests.adapters.test_h2_datapath import EchoService, channel, method, start_grpc_server
from tests.adapters.test_mtls import ORDERS, PAYMENTS, SVC_PORT, make_agent, metric

class HopSpy(MeshTls):
    """The inbound's TLS hook, noting the TLS connection and the ALPN protocol of each request's hop."""

    def __init__(self, agent):
        super().__init__(agent)
        self.hops: list[tuple[int, str | None]] = []

    def inbound_peer(self, ssl_object):
        self.hops.append((id(ssl_object), ssl_object.selected_alpn_protocol() if ssl_object else None))
        return super().inbound_peer(ssl_object)


class Http1OnlyPeer(HopSpy):
    """A peer whose inbound offers ALPN http/1.1 alone (an older sidecar, another mesh's proxy)."""

    def server_context(self):
        return build_context(self.holder.material, server_side=True, alpn=["http/1.1"])


class GrpcMesh:
    """`n` payments endpoints (grpcio server + inbound sidecar each) and the orders outbound sidecar;
    `ch` is a grpcio channel from "orders" to payments through them."""

    def __init__(self, stack: AsyncExitStack, ca, n: int = 1, labels: dict | None = None,
                 service_type: type = EchoService, inbound_tls: type = None, limits: Limits | None = None):
        self.stack, self.ca, self.n, self.service_type = stack, ca, n, service_type
        self.policy = decode_traffic_policy(labels or {})   # payments' mesh.* labels
        self.inbound_tls = inbound_tls or HopSpy   # the payments sidecars' TLS hook
        self.limits = limits

    async def start(self) -> GrpcMesh:
        self.services, self.inbounds, ports = [], [], []
        pay_agent = await make_agent(self.ca, PAYMENTS)
        for _ in range(self.n):
            service = self.service_type()
            server, app_port = start_grpc_server(service)
            self.stack.callback(server.stop, 0)
            state = ProxyState("payments", "v1", tls=self.inbound_tls(pay_agent))
            if self.limits is not None:
                state.limits = self.limits
            state.authz = Authorizer("payments")
            self.stack.callback(state.close)
            inbound = await start_mesh_inbound(state, "127.0.0.1", 0, app_port=app_port, protocol="grpc")
            self.stack.callback(inbound.close)
            self.services.append(service)
            self.inbounds.append(state)
            ports.append(inbound.sockets[0].getsockname()[1])
        services = {"payments": ServiceConfig("payments", "shop", "grpc", SVC_PORT, PAYMENTS, policy=self.policy),
                    "orders": ServiceConfig("orders", "shop", "http", SVC_PORT, ORDERS)}
        endpoints = {"payments": tuple(Endpoint(f"pay-{i}", "127.0.0.1", p, "v1", PAYMENTS)
                                       for i, p in enumerate(ports))}
        routes = (GatewayRoute(service="payments", path="/meshtest.Echo", host=None, strip_prefix=False),)
        snap = self.snapshot = Snapshot(version=1, config=MeshConfig(services=services, endpoints=endpoints,
                                                                     gateway_routes=routes))
        for state in self.inbounds:
            state.apply_snapshot(snap)
            state.authz.update(snap)
        self.outbound = ProxyState("orders", "v1", table=build_route_table(snap),
                                   tls=MeshTls(await make_agent(self.ca, ORDERS)))
        self.outbound.apply_snapshot(snap)
        self.stack.callback(self.outbound.close)
        # What transparent capture reports for the app's connection: the service's VIP (its DNS answer).
        vip = self.outbound.vips.vip("payments", "shop")
        out = await start_outbound(self.outbound, "127.0.0.1", 0, mode="transparent",
                                   original_dst=lambda transport: (vip, SVC_PORT))
        self.stack.callback(out.close)
        self.ch = channel(out.sockets[0].getsockname()[1])
        self.stack.callback(self.ch.close)
        return self


def call(fn, *args, **kw):
    return asyncio.to_thread(fn, *args, timeout=GUARD_S, **kw)


async def _unary_and_statuses(ca):
    async with AsyncExitStack() as stack:
        mesh = await GrpcMesh(stack, ca).start()
        unary = method(mesh.ch, "unary_unary", "Unary")
        reply, outcome = await call(unary.with_call, b"hi", metadata=(("x-tag", "abc"),))
        assert reply == b"echo:hi"
        assert ("x-trailer", "t-abc") in outcome.trailing_metadata()   # trailers across both hops
        with pytest.raises(grpc.RpcError) as failed:
            await call(unary, b"fail")
        assert failed.value.code() == grpc.StatusCode.NOT_FOUND
        assert failed.value.details() == "no such thing: fail"
        assert ("x-why", "asked-to") in failed.value.trailing_metadata()
        for state, reporter in ((mesh.outbound, "source"), (mesh.inbounds[0], "destination")):
            # Istio's labels of a gRPC call: HTTP 200 both times, the outcome in grpc_response_status.
            for grpc_status in ("0", "5"):
                assert metric(state, "istio_requests_total", reporter=reporter, destination_service="payments",
                              request_protocol="grpc", response_code="200",
                              grpc_response_status=grpc_status) == 1, (reporter, grpc_status)


def test_grpc_unary_calls_trailers_and_statuses_cross_the_mesh(run, ca):
    run(_unary_and_statuses, ca)


async def _streams(ca):
    async with AsyncExitStack() as stack:
        mesh = await GrpcMesh(stack, ca).start()
        service = mesh.services[0]
        # Server streaming: the second message is sent only once the client has the first, so the
        # call completes only if each message passes both sidecars before the stream ends.
        stream = method(mesh.ch, "unary_stream", "ServerStream")

        def read_all() -> list:
            out = []
            for i, message in enumerate(stream(b"5,10", timeout=GUARD_S)):
                out.append(message)
                if i == 0:
                    service.first_taken.set()
            return out

        assert await asyncio.to_thread(read_all) == [bytes([i]) * 10 for i in range(5)]
        # Client streaming: the server holds the first message while the client still sends.
        proceed = threading.Event()

        def requests():
            yield b"a" * 100
            assert proceed.wait(GUARD_S)
            yield b"b" * 50

        total = asyncio.create_task(call(method(mesh.ch, "stream_unary", "ClientStream"), requests()))
        assert await asyncio.to_thread(service.first_seen.wait, GUARD_S)
        proceed.set()
        assert await total == b"150"
        # Bidi: 20 round trips, each answer before the next message is sent.
        bidi = method(mesh.ch, "stream_stream", "Bidi")

        def ping_pong() -> int:
            outbox: list = []
            ready = threading.Event()

            def messages():
                for i in range(20):
                    yield b"%d" % i
                    ready.wait(GUARD_S)
                    ready.clear()

            answers = 0
            for answer in bidi(messages(), timeout=GUARD_S):
                outbox.append(answer)
                answers += 1
                ready.set()
            assert outbox == [b"pong:%d" % i for i in range(20)]
            return answers

        assert await asyncio.to_thread(ping_pong) == 20


def test_grpc_streaming_calls_pass_message_by_message(run, ca):
    run(_streams, ca)


async def _balanced_per_call(ca):
    async with AsyncExitStack() as stack:
        mesh = await GrpcMesh(stack, ca, n=2).start()
        unary = method(mesh.ch, "unary_unary", "Unary")
        for i in range(40):   # one channel: one HTTP/2 connection from the client
            assert await call(unary, b"%d" % i) == b"echo:%d" % i
        calls = [service.calls for service in mesh.services]
        assert sum(calls) == 40 and min(calls) >= 8, calls   # each endpoint took its share


def test_calls_on_one_grpc_channel_are_balanced_per_call(run, ca):
    run(_balanced_per_call, ca)


async def _local_errors_are_grpc_statuses(ca):
    async with AsyncExitStack() as stack:
        mesh = await GrpcMesh(stack, ca).start()
        unary = method(mesh.ch, "unary_unary", "Unary")
        cfg = mesh.snapshot.config
        # Denied by the callee's sidecar (403 RBAC on HTTP): PERMISSION_DENIED, as a trailers-only answer.
        denied = Snapshot(version=2, config=dataclasses.replace(
            cfg, policies=Policy(rules=(make_rule("deny", "orders", "payments"),))))
        mesh.inbounds[0].apply_snapshot(denied)
        mesh.inbounds[0].authz.update(denied)
        with pytest.raises(grpc.RpcError) as failed:
            await call(unary, b"x")
        assert failed.value.code() == grpc.StatusCode.PERMISSION_DENIED, failed.value
        assert "RBAC" in failed.value.details()
        # No endpoint left (503 UH on HTTP): UNAVAILABLE, from the caller's own sidecar.
        mesh.outbound.apply_snapshot(Snapshot(version=3, config=dataclasses.replace(cfg, endpoints={"payments": ()})))
        with pytest.raises(grpc.RpcError) as failed:
            await call(unary, b"x")
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value
        assert mesh.services[0].calls == 0   # neither reached the app


def test_errors_the_mesh_answers_itself_are_grpc_statuses(run, ca):
    run(_local_errors_are_grpc_statuses, ca)


class FlakyEcho(EchoService):
    """Fails a call UNAVAILABLE (trailers-only, as grpcio's abort does) unless it is every third one."""

    def unary(self, request: bytes, context) -> bytes:
        with self.lock:
            self.calls += 1
            n = self.calls
        if n % 3:
            context.abort(grpc.StatusCode.UNAVAILABLE, "try again")
        return b"echo:" + request


async def _retried_on_grpc_status(ca):
    async with AsyncExitStack() as stack:
        labels = {"mesh.retries.attempts": "3", "mesh.retries.on": "unavailable", "mesh.retries.backoff": "1ms,5ms"}
        mesh = await GrpcMesh(stack, ca, labels=labels, service_type=FlakyEcho).start()
        unary = method(mesh.ch, "unary_unary", "Unary")
        for i in range(5):   # each call: two UNAVAILABLE answers, retried by the caller's sidecar, then OK
            assert await call(unary, b"%d" % i) == b"echo:%d" % i
        assert mesh.services[0].calls == 15
        assert metric(mesh.inbounds[0], "istio_requests_total", reporter="destination",
                      grpc_response_status="14") == 10
        assert metric(mesh.outbound, "istio_requests_total", reporter="source", grpc_response_status="0") == 5


def test_a_grpc_status_named_in_retries_on_is_retried(run, ca):
    run(_retried_on_grpc_status, ca)


class DeadlineEcho(EchoService):
    """Records the deadline each call arrived with (what grpc-timeout said, as grpcio reads it)."""

    def __init__(self):
        super().__init__()
        self.remaining: list[float] = []

    def unary(self, request: bytes, context) -> bytes:
        self.remaining.append(context.time_remaining())
        return super().unary(request, context)


SLACK_S = 0.02   # grpc-timeout's units round a deadline up (gRPC over HTTP/2: TimeoutValue)


async def _grpc_timeout_capped(ca):
    async with AsyncExitStack() as stack:
        mesh = await GrpcMesh(stack, ca, labels={"mesh.timeout": "500ms"}, service_type=DeadlineEcho).start()
        unary = method(mesh.ch, "unary_unary", "Unary")
        # The client allows 10 s; the mesh's 500 ms is the cap: the app is told at most that...
        assert await asyncio.to_thread(unary, b"quick", timeout=10) == b"echo:quick"
        assert 0 < mesh.services[0].remaining[0] <= 0.5 + SLACK_S, mesh.services[0].remaining
        # ... and a call that takes longer ends at the mesh's deadline, as DEADLINE_EXCEEDED.
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(grpc.RpcError) as failed:
            await asyncio.to_thread(unary, b"slow", metadata=(("x-sleep", "3"),), timeout=10)
        assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, failed.value
        assert loop.time() - started < 2.5
        # A client deadline under the cap passes as it is.
        assert await asyncio.to_thread(unary, b"short", timeout=0.3) == b"echo:short"
        assert 0 < mesh.services[0].remaining[-1] <= 0.3 + SLACK_S, mesh.services[0].remaining


def test_grpc_timeout_is_honoured_with_the_mesh_timeout_as_its_cap(run, ca):
    run(_grpc_timeout_capped, ca)


async def _through_the_gateway(ca):
    async with AsyncExitStack() as stack:
        mesh = await GrpcMesh(stack, ca, n=2).start()
        gw_state = ProxyState("gateway", "v1", tls=MeshTls(await make_agent(ca, ORDERS)))
        gw_state.apply_snapshot(mesh.snapshot)
        stack.callback(gw_state.close)
        gw = await start_gateway(gw_state, "127.0.0.1", 0)
        stack.callback(gw.close)
        ch = channel(gw.sockets[0].getsockname()[1])   # h2c from outside, routed by the gRPC path
        stack.callback(ch.close)
        unary = method(ch, "unary_unary", "Unary")
        for i in range(20):
            assert await call(unary, b"%d" % i) == b"echo:%d" % i
        assert min(service.calls for service in mesh.services) >= 3   # balanced per call here too
        assert metric(gw_state, "istio_requests_total", reporter="source", destination_service="payments",
                      request_protocol="grpc", grpc_response_status="0") == 20


def test_grpc_from_outside_through_the_gateway_h2c(run, ca):
    run(_through_the_gateway, ca)


async def _gateway_https(ca):
    web_ca = CertificateAuthority.create("mesh.local", time.time())
    key, key_pem = generate_key()
    issued = web_ca.sign_server_csr(build_server_csr(key, ("localhost",)), ("localhost",), 3600, time.time())
    server = ServerCert()
    await server.aload_pem(issued.full_chain_pem, key_pem)
    async with AsyncExitStack() as stack:
        mesh = await GrpcMesh(stack, ca).start()
        gw_state = ProxyState("gateway", "v1", tls=MeshTls(await make_agent(ca, ORDERS)))
        gw_state.apply_snapshot(mesh.snapshot)
        stack.callback(gw_state.close)
        gw = await start_gateway(gw_state, "127.0.0.1", 0, ssl_context=server.front)
        stack.callback(gw.close)
        # grpcio over TLS offers ALPN h2 only: it connects only if the gateway picks h2
        creds = grpc.ssl_channel_credentials(root_certificates=web_ca.bundle_pem)
        ch = grpc.secure_channel(f"localhost:{gw.sockets[0].getsockname()[1]}", creds)
        stack.callback(ch.close)
        unary = method(ch, "unary_unary", "Unary")
        for i in range(5):
            assert await call(unary, b"%d" % i) == b"echo:%d" % i
        assert metric(gw_state, "istio_requests_total", reporter="source", destination_service="payments",
                      request_protocol="grpc", grpc_response_status="0") == 5


def test_grpc_from_outside_through_the_gateway_over_tls_alpn_h2(run, ca):
    run(_gateway_https, ca)


async def _hop(ca, inbound_tls: type) -> list:
    async with AsyncExitStack() as stack:
        mesh = await GrpcMesh(stack, ca, inbound_tls=inbound_tls).start()
        unary = method(mesh.ch, "unary_unary", "Unary")
        answers = await asyncio.gather(*(call(unary, b"%d" % i) for i in range(16)))
        assert answers == [b"echo:%d" % i for i in range(16)]
        assert metric(mesh.inbounds[0], "istio_requests_total", reporter="destination",
                      grpc_response_status="0") == 16
        return mesh.inbounds[0].tls.hops, metric(mesh.inbounds[0], "mesh_tls_connections_total",
                                                 direction="inbound", tls_version="TLSv1.3")


def test_the_hop_to_a_grpc_service_is_http2_over_mtls_by_alpn(run, ca):
    hops, tls_connections = run(_hop, ca, HopSpy)
    assert {alpn for _, alpn in hops} == {"h2"}
    assert tls_connections == 1   # counted per TLS connection, not per stream
    # 16 calls at once as streams of one TLS connection (HTTP/1.1 would need one connection per call):
    # the connection is identified once, then each stream.
    assert len(hops) == 1 + 16 and len({conn for conn, _ in hops}) == 1, hops


def test_a_peer_without_h2_gets_the_calls_over_http1(run, ca):
    hops, _ = run(_hop, ca, Http1OnlyPeer)
    assert {alpn for _, alpn in hops} == {"http/1.1"}
    assert len({conn for conn, _ in hops}) > 1


class SlowBidi(EchoService):
    """Answers each bidi message after a pause longer than the inbound's body timeout."""

    def bidi(self, requests, context):
        for request in requests:
            threading.Event().wait(1.0)
            yield b"late:" + request


async def _quiet_stream(ca):
    async with AsyncExitStack() as stack:
        mesh = await GrpcMesh(stack, ca, service_type=SlowBidi,
                              limits=Limits(body_timeout=0.3, idle_timeout=0.3)).start()
        bidi = method(mesh.ch, "stream_stream", "Bidi")
        answered = threading.Event()

        def messages():   # the request stays open, and silent, while each answer takes its second
            for m in (b"a", b"b"):
                yield m
                assert answered.wait(GUARD_S)
                answered.clear()

        def talk() -> list:
            out = []
            for answer in bidi(messages(), timeout=GUARD_S):
                out.append(answer)
                answered.set()
            return out

        assert await asyncio.to_thread(talk) == [b"late:a", b"late:b"]


def test_a_stream_quiet_longer_than_the_body_timeout_is_not_cut(run, ca):
    """HTTP/2 streams are out of the HTTP/1 listener's timers: flow control and the route's timeout
    govern them (a bidi call may be silent for a while)."""
    run(_quiet_stream, ca)


class NamedEcho(EchoService):
    """Answers with its endpoint's name, after the x-sleep the call asks for."""

    names = iter(f"pay-{i}" for i in range(100))

    def __init__(self):
        super().__init__()
        self.name = next(NamedEcho.names)

    def unary(self, request: bytes, context) -> bytes:
        return self.name.encode() + b":" + super().unary(request, context)


def silent_socket_to(port: int):
    """A TCP_INFO reader that reports the connection to `port` as a vanished peer's (data in flight,
    no ACK for ages), read from the socket as the real reader is; the truth for the others."""
    from sidecar.proxy import TcpInfo, read_tcp_info

    def reader(transport):
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.getpeername()[1] == port:
            return TcpInfo(state=1, unacked=1, last_ack_recv_ms=10**6)
        return read_tcp_info(transport)
    return reader


async def _withdrawn_h2_endpoint(ca):
    async with AsyncExitStack() as stack:
        mesh = await GrpcMesh(stack, ca, n=2, service_type=NamedEcho).start()
        names = {ep.port: svc.name for ep, svc in zip(mesh.snapshot.config.endpoints["payments"], mesh.services)}
        unary = method(mesh.ch, "unary_unary", "Unary")
        for i in range(4):   # both endpoints' HTTP/2 connections made and pooled
            await call(unary, b"warm%d" % i)
        calls = [svc.calls for svc in mesh.services]
        task = asyncio.ensure_future(call(unary.with_call, b"x", metadata=(("x-sleep", "2.0"),)))
        deadline = time.monotonic() + GUARD_S
        while sum(svc.calls for svc in mesh.services) == sum(calls) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        first = next(i for i, svc in enumerate(mesh.services) if svc.calls > calls[i])
        endpoints = mesh.snapshot.config.endpoints["payments"]
        gone = endpoints[first]
        # The replica stopped, its namespace gone with the stream unacknowledged; meshd withdraws it.
        mesh.outbound.tcp_info = silent_socket_to(gone.port)
        config = dataclasses.replace(mesh.snapshot.config, endpoints={
            "payments": tuple(ep for ep in endpoints if ep is not gone)})
        mesh.outbound.apply_snapshot(Snapshot(version=2, config=config))
        reply, _ = await task
        other = names[endpoints[1 - first].port]
        assert reply == other.encode() + b":echo:x", (reply, names[gone.port])
        assert mesh.outbound.undelivered_total == 1


def test_a_call_on_a_withdrawn_http2_endpoint_that_never_got_it_is_retried_on_another(run, ca):
    """The HTTP/2 hop as the HTTP/1.1 one: a stream written to an endpoint that a snapshot withdraws,
    with no ACK since, is proven undelivered (TCP_INFO of the stream's connection) and retried."""
    run(_withdrawn_h2_endpoint, ca)
