"""HTTP/2 connection layer (sidecar.datapath.h2*): pure head tables, and on loopback a tiny forwarder
made of H2Downstream (from a real grpcio client) and H2Pool (to a real grpcio server): the four gRPC
call kinds, trailers and statuses, flow control with a slow reader, multiplexing, TLS with ALPN h2
between two forwarders and the fallback report, and garbage after the preface."""

from __future__ import annotations

import asyncio
import queue
import random
import threading
import time
from concurrent import futures

import grpc
import h2.config
import h2.connection
import h2.events
import hyperframe.frame
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from certs.ca import CertificateAuthority
from certs.holder import TlsMaterial, build_context
from certs.keys import build_csr, generate_key
from sidecar.datapath.h2 import (PREFACE, ConnectionGone, H2Error, Limits, MalformedHead, RequestHead,
                                 ResponseHead, StreamReset, h2_fields, parse_request_head,
                                 parse_response_head, preface_state, request_headers, response_headers)
from sidecar.datapath.h2conn import relay_body
from sidecar.datapath.h2client import H2Pool, NoH2
from sidecar.datapath.h2server import H2Downstream

from .loops import eventually

GUARD_S = 30
SERVICE = "meshtest.Echo"

# ---- pure tables ------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix, expected", [
    (PREFACE, True),
    (PREFACE + b"\x00\x00\x00\x04", True),
    (b"PRI * HTTP/2.0\r\n", None),
    (b"", None),
    (b"P", None),
    (b"GET / HTTP/1.1\r\n", False),
    (b"PRI * HTTP/1.1\r\n", False),
    (b"pri", False),
])
def test_preface_state(prefix, expected):
    assert preface_state(prefix) is expected


@pytest.mark.parametrize("fields, expected", [
    ([(b"content-type", b"application/grpc")], [(b"content-type", b"application/grpc")]),
    ([(b"Connection", b"close, x-hop"), (b"x-hop", b"1"), (b"x-end", b"2")], [(b"x-end", b"2")]),
    ([(b"keep-alive", b"5"), (b"transfer-encoding", b"chunked"), (b"upgrade", b"h2c"),
      (b"proxy-connection", b"x")], []),
    ([(b"te", b"trailers"), (b"te", b"gzip")], [(b"te", b"trailers")]),
    ([(b":path", b"/"), (b"X-Upper", b"v")], [(b"x-upper", b"v")]),
])
def test_h2_fields_drop_connection_specific(fields, expected):
    assert h2_fields(fields) == expected


@pytest.mark.parametrize("block, expected", [
    ([(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/p.S/M"), (b":authority", b"svc:50051"),
      (b"te", b"trailers")],
     RequestHead(b"POST", b"/p.S/M", b"svc:50051", b"http", [(b"te", b"trailers")])),
    ([(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"), (b"host", b"h")],
     RequestHead(b"GET", b"/", b"h", b"https", [(b"host", b"h")])),
    ([(b":method", b"CONNECT"), (b":authority", b"db:5432")],
     RequestHead(b"CONNECT", b"", b"db:5432", b"", [])),
    ([(b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":scheme", b"http"), (b":path", b"/ws"),
      (b":authority", b"a")],
     RequestHead(b"CONNECT", b"/ws", b"a", b"http", [], b"websocket")),
])
def test_parse_request_head(block, expected):
    assert parse_request_head(block) == expected


@pytest.mark.parametrize("block", [
    [(b":scheme", b"http"), (b":path", b"/")],                                          # no :method
    [(b":method", b"GET"), (b":path", b"/")],                                           # no :scheme
    [(b":method", b"GET"), (b":scheme", b"http")],                                      # no :path
    [(b":method", b"GET"), (b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/")],   # repeated
    [(b":method", b"GET"), (b"x", b"1"), (b":scheme", b"http"), (b":path", b"/")],      # pseudo after field
    [(b":method", b"GET"), (b":status", b"200"), (b":scheme", b"http"), (b":path", b"/")],   # response pseudo
    [(b":method", b"CONNECT"), (b":authority", b"a"), (b":path", b"/")],                # CONNECT with :path
    [(b":method", b"GET"), (b":protocol", b"ws"), (b":scheme", b"http"), (b":path", b"/")],
])
def test_parse_request_head_refuses_malformed(block):
    with pytest.raises(MalformedHead):
        parse_request_head(block)


@pytest.mark.parametrize("block, expected", [
    ([(b":status", b"200"), (b"content-type", b"application/grpc")],
     ResponseHead(200, [(b"content-type", b"application/grpc")])),
    ([(b":status", b"503")], ResponseHead(503, [])),
])
def test_parse_response_head(block, expected):
    assert parse_response_head(block) == expected


@pytest.mark.parametrize("block", [
    [], [(b"x", b"1")], [(b":status", b"20")], [(b":status", b"abc")],
    [(b":status", b"200"), (b":status", b"200")], [(b"x", b"1"), (b":status", b"200")],
    [(b":status", b"200"), (b":path", b"/")],
])
def test_parse_response_head_refuses_malformed(block):
    with pytest.raises(MalformedHead):
        parse_response_head(block)


@pytest.mark.parametrize("head, expected", [
    (RequestHead(b"POST", b"/a", b"svc", b"http", [(b"host", b"svc"), (b"connection", b"keep-alive"),
                                                   (b"x-a", b"1")]),
     [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/a"), (b":authority", b"svc"), (b"x-a", b"1")]),
    (RequestHead(b"GET", b"/", b"", b"http", [(b"host", b"h")]),
     [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b"host", b"h")]),
    (RequestHead(b"CONNECT", b"", b"db:1", b""), [(b":method", b"CONNECT"), (b":authority", b"db:1")]),
])
def test_request_headers(head, expected):
    assert request_headers(head) == expected
    assert parse_request_head(expected).method == head.method   # what is sent parses back


def test_response_headers_put_status_first():
    assert response_headers(ResponseHead(204, [(b"Upgrade", b"x"), (b"grpc-status", b"0")])) == \
        [(b":status", b"204"), (b"grpc-status", b"0")]


def test_stream_reset_retriable_only_when_refused_by_the_peer():
    assert StreamReset(7, remote=True).retriable          # REFUSED_STREAM
    assert not StreamReset(7, remote=False).retriable
    assert not StreamReset(8, remote=True).retriable      # CANCEL
    assert "REFUSED_STREAM" in str(StreamReset(7, remote=True))


# ---- the forwarder -----------------------------------------------------------------------------------

class Forwarder:
    """H2Downstream from the clients, each stream relayed to a new stream of one H2Pool."""

    def __init__(self, pool: H2Pool, limits: Limits | None = None):
        self.pool = pool
        self.limits = limits
        self.downstreams: list[H2Downstream] = []
        self.server: asyncio.AbstractServer | None = None
        self.port = 0
        self.errors: list[BaseException] = []

    async def start(self, ssl=None) -> Forwarder:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(self._accept, "127.0.0.1", 0, ssl=ssl)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def _accept(self) -> H2Downstream:
        d = H2Downstream(self.handle, self.limits)
        self.downstreams.append(d)
        return d

    @property
    def buffered_bytes(self) -> int:
        return sum(d.buffered_bytes for d in self.downstreams) + self.pool.buffered_bytes

    async def handle(self, down) -> None:
        up = await self.pool.open_stream(down.head, end=down.at_end)
        watch = asyncio.ensure_future(down.wait_closed())   # a client's reset cancels the upstream stream
        watch.add_done_callback(lambda f: up.reset() if down.error is not None else None)

        async def response() -> None:
            head = await up.response()
            down.send_head(head, end=up.at_end)
            if not up.at_end:
                await relay_body(up, down)
        try:
            await asyncio.gather(relay_body(down, up), response())
        except H2Error as exc:
            self.errors.append(exc)
            up.reset()
            down.reset()

    async def close(self) -> None:
        self.server.close()
        for d in self.downstreams:
            d.close()
        self.pool.close()
        await self.server.wait_closed()


# ---- the gRPC app ------------------------------------------------------------------------------------

class EchoService:
    """Generic gRPC handlers (no protoc): bytes in, bytes out; events prove streaming before the end."""

    def __init__(self):
        self.first_seen = threading.Event()      # client streaming: the server has the first message
        self.first_taken = threading.Event()     # server streaming: the client has the first message
        self.sent = 0                            # messages the big server stream has yielded
        self.calls = 0
        self.lock = threading.Lock()

    def unary(self, request: bytes, context) -> bytes:
        with self.lock:
            self.calls += 1
        md = dict(context.invocation_metadata())
        if request == b"fail":
            context.set_trailing_metadata((("x-why", "asked-to"),))
            context.abort(grpc.StatusCode.NOT_FOUND, "no such thing: fail")
        if "x-sleep" in md:
            time.sleep(float(md["x-sleep"]))
        context.set_trailing_metadata((("x-trailer", "t-" + md.get("x-tag", "none")),))
        return b"echo:" + request

    def server_stream(self, request: bytes, context):
        count, size = (int(x) for x in request.split(b","))
        for i in range(count):
            if i == 1 and size < 1024 and not self.first_taken.wait(GUARD_S):
                return   # small-message mode: the second message only after the client has the first
            self.sent = i + 1
            yield bytes([i % 251]) * size
        context.set_trailing_metadata((("x-count", str(count)),))

    def client_stream(self, requests, context) -> bytes:
        total = 0
        for i, r in enumerate(requests):
            total += len(r)
            if i == 0:
                self.first_seen.set()
        return b"%d" % total

    def bidi(self, requests, context):
        for r in requests:
            yield b"pong:" + r

    def handler(self):
        return grpc.method_handlers_generic_handler(SERVICE, {
            "Unary": grpc.unary_unary_rpc_method_handler(self.unary),
            "ServerStream": grpc.unary_stream_rpc_method_handler(self.server_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(self.client_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(self.bidi),
        })


GRPC_OPTIONS = [("grpc.enable_http_proxy", 0), ("grpc.max_receive_message_length", 1 << 24)]


def start_grpc_server(service: EchoService, options=()) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=80), options=list(options) + GRPC_OPTIONS)
    server.add_generic_rpc_handlers((service.handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def channel(port: int) -> grpc.Channel:
    return grpc.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS)


def method(ch: grpc.Channel, kind: str, name: str):
    return getattr(ch, kind)(f"/{SERVICE}/{name}")


class Mesh:
    """A gRPC server behind a forwarder; `ch` is a grpcio channel to the forwarder."""

    def __init__(self, server_options=(), pool_limits: Limits | None = None):
        self.service = EchoService()
        self.server_options = server_options
        self.pool_limits = pool_limits

    async def __aenter__(self) -> Mesh:
        self.server, port = start_grpc_server(self.service, self.server_options)
        self.pool = H2Pool("127.0.0.1", port, limits=self.pool_limits)
        self.fwd = await Forwarder(self.pool).start()
        self.ch = channel(self.fwd.port)
        return self

    async def __aexit__(self, *exc) -> None:
        self.ch.close()
        await self.fwd.close()
        self.server.stop(0)


def run_on_asyncio(coro_fn, *args):
    """The in-memory tests' runner (no sockets, so one loop kind is enough)."""
    with asyncio.Runner() as r:
        return r.run(asyncio.wait_for(coro_fn(*args), GUARD_S))


# ---- gRPC through the forwarder ----------------------------------------------------------------------

async def _unary_with_trailers():
    async with Mesh() as m:
        unary = method(m.ch, "unary_unary", "Unary")
        reply, call = await asyncio.to_thread(unary.with_call, b"hi", metadata=(("x-tag", "abc"),), timeout=10)
        assert reply == b"echo:hi"
        assert call.code() == grpc.StatusCode.OK
        assert ("x-trailer", "t-abc") in call.trailing_metadata()
        with pytest.raises(grpc.RpcError) as err:
            await asyncio.to_thread(unary, b"fail", timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert err.value.details() == "no such thing: fail"
        assert ("x-why", "asked-to") in err.value.trailing_metadata()
        assert m.fwd.errors == []
        assert len(m.fwd.downstreams) == 1 and m.pool.opened == 1


def test_unary_call_and_its_trailers_and_a_non_ok_status_pass_through(run):
    run(_unary_with_trailers)


async def _server_streaming():
    async with Mesh() as m:
        stream = method(m.ch, "unary_stream", "ServerStream")

        def call():
            got = []
            responses = stream(b"50,10", timeout=10)
            for r in responses:
                got.append(r)
                if len(got) == 1:
                    assert m.service.sent == 1   # the server waits for this: the first arrived before the end
                    m.service.first_taken.set()
            return got, responses.trailing_metadata(), responses.code()
        got, trailers, code = await asyncio.to_thread(call)
        assert len(got) == 50 and got[49] == bytes([49]) * 10
        assert code == grpc.StatusCode.OK and ("x-count", "50") in trailers


def test_server_streaming_messages_arrive_before_the_stream_ends(run):
    run(_server_streaming)


async def _client_streaming():
    async with Mesh() as m:
        upload = method(m.ch, "stream_unary", "ClientStream")

        def requests():
            yield b"a" * 100
            assert m.service.first_seen.wait(10)   # the server has the first before the client sends more
            for _ in range(9):
                yield b"b" * 100
        reply = await asyncio.to_thread(upload, requests(), timeout=10)
        assert reply == b"1000"


def test_client_streaming_messages_arrive_before_the_stream_ends(run):
    run(_client_streaming)


async def _bidi_ping_pong():
    async with Mesh() as m:
        bidi = method(m.ch, "stream_stream", "Bidi")
        pongs: queue.Queue = queue.Queue()

        def call():
            def pings():
                for i in range(20):
                    yield b"ping%d" % i
                    assert pongs.get(timeout=10) == b"pong:ping%d" % i   # no next ping before its pong
            replies = bidi(pings(), timeout=15)
            got = []
            for r in replies:
                got.append(r)
                pongs.put(r)
            return got, replies.code()
        got, code = await asyncio.to_thread(call)
        assert got == [b"pong:ping%d" % i for i in range(20)] and code == grpc.StatusCode.OK


def test_bidi_ping_pong_of_20_messages(run):
    run(_bidi_ping_pong)


# ---- flow control ------------------------------------------------------------------------------------

BUFFER_BOUND = 512 * 1024   # stream window + send buffer + a frame on each side + the socket's high water


async def _slow_reader():
    async with Mesh() as m:
        stream = method(m.ch, "unary_stream", "ServerStream")
        peak = 0
        done = False

        async def sample():
            nonlocal peak
            while not done:
                peak = max(peak, m.fwd.buffered_bytes)
                await asyncio.sleep(0.002)
        sampler = asyncio.ensure_future(sample())
        lag = []

        def call():
            total = 0
            for i, r in enumerate(stream(b"320,65536", timeout=25)):   # 20 MiB in 64 KiB messages
                total += len(r)
                if i % 40 == 0:
                    lag.append(m.service.sent - (i + 1))   # messages the server is ahead of the reader
                time.sleep(0.003)
            return total
        total = await asyncio.to_thread(call)
        done = True
        await sampler
        assert total == 320 * 65536
        assert 0 < peak < BUFFER_BOUND, peak
        # the server never runs far ahead of the slow reader (unchecked it would be 20 MiB ahead at once):
        # the windows on the way bound its lead, most of it the grpcio client's own (BDP-sized) window
        assert max(lag) < 128, lag
        print(f"flow control: forwarder peak buffered {peak} bytes; server lead (messages) {lag}")


def test_a_slow_reader_of_20_mib_keeps_the_forwarder_buffer_bounded(run):
    run(_slow_reader)


# ---- multiplexing ------------------------------------------------------------------------------------

async def _many_calls():
    async with Mesh(server_options=[("grpc.max_concurrent_streams", 8)]) as m:
        unary = method(m.ch, "unary_unary", "Unary")

        def call():
            futs = [unary.future(b"%d" % i, metadata=(("x-sleep", "0.2"),), timeout=15) for i in range(64)]
            return [f.result() for f in futs]
        replies = await asyncio.to_thread(call)
        assert replies == [b"echo:%d" % i for i in range(64)]
        assert len(m.fwd.downstreams) == 1 and m.fwd.downstreams[0].requests == 64   # one client connection
        # the server allows 8 streams per connection: the pool opened more and never exceeded it
        assert m.pool.opened >= 2
        assert all(c.max_streams_seen <= 8 for c in m.pool.connections)
        assert m.service.calls == 64


def test_many_concurrent_calls_multiplex_on_one_client_connection_and_spread_over_pooled_ones(run):
    run(_many_calls)


# ---- TLS with ALPN h2 --------------------------------------------------------------------------------

TD = "mesh.local"


def tls_material(ca: CertificateAuthority, sid: str) -> TlsMaterial:
    key, key_pem = generate_key()
    issued = ca.sign_csr(build_csr(key, sid), sid, 3600, time.time())
    return TlsMaterial(cert_chain_pem=issued.full_chain_pem, key_pem=key_pem, bundle_pem=ca.bundle_pem,
                       identity=sid, not_before=issued.not_before, not_after=issued.not_after,
                       serial=issued.serial)


def mesh_contexts(alpn_server: list[str]):
    """(server, client) mTLS contexts of the mesh's kind, the server offering alpn_server."""
    ca = CertificateAuthority.create(TD, time.time())
    server = build_context(tls_material(ca, f"spiffe://{TD}/ns/shop/sa/api"), server_side=True)
    client = build_context(tls_material(ca, f"spiffe://{TD}/ns/shop/sa/web"), server_side=False)
    server.set_alpn_protocols(alpn_server)
    client.set_alpn_protocols(["h2", "http/1.1"])
    return server, client


async def _tls_between_forwarders():
    service = EchoService()
    grpc_server, port = start_grpc_server(service)
    server_ctx, client_ctx = mesh_contexts(["h2", "http/1.1"])
    inbound = await Forwarder(H2Pool("127.0.0.1", port)).start(ssl=server_ctx)
    outbound_pool = H2Pool("127.0.0.1", inbound.port, ssl=client_ctx, server_hostname="api")
    outbound = await Forwarder(outbound_pool).start()
    ch = channel(outbound.port)
    try:
        unary = method(ch, "unary_unary", "Unary")
        reply, call = await asyncio.to_thread(unary.with_call, b"over-tls", metadata=(("x-tag", "tls"),),
                                              timeout=10)
        assert reply == b"echo:over-tls" and ("x-trailer", "t-tls") in call.trailing_metadata()
        assert outbound_pool.peer_alpn == "h2"
        assert inbound.downstreams[0].alpn == "h2"
    finally:
        ch.close()
        await outbound.close()
        await inbound.close()
        grpc_server.stop(0)


def test_grpc_over_tls_with_alpn_h2_between_two_forwarders(run):
    run(_tls_between_forwarders)


async def _fallback_report():
    server_ctx, client_ctx = mesh_contexts(["http/1.1"])
    accepted = []

    async def http1(reader, writer):
        accepted.append(writer)
        await reader.read()
        writer.close()
    server = await asyncio.start_server(http1, "127.0.0.1", 0, ssl=server_ctx)
    pool = H2Pool("127.0.0.1", server.sockets[0].getsockname()[1], ssl=client_ctx, server_hostname="api")
    try:
        with pytest.raises(NoH2) as err:
            await pool.open_stream(RequestHead(b"GET", b"/", b"api"), end=True)
        assert err.value.alpn == "http/1.1" and pool.peer_alpn == "http/1.1"
        assert pool.connections == []
    finally:
        server.close()
        await server.wait_closed()


def test_a_peer_offering_only_http11_is_reported_for_the_fallback(run):
    run(_fallback_report)


async def _connect_refused():
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    pool = H2Pool("127.0.0.1", port)
    with pytest.raises(ConnectionGone) as err:
        await pool.open_stream(RequestHead(b"GET", b"/", b"x"), end=True)
    assert err.value.retriable and "connect" in str(err.value)


def test_a_refused_connect_is_a_retriable_error(run):
    run(_connect_refused)


async def _dead_upstream():
    service = EchoService()
    grpc_server, port = start_grpc_server(service)
    pool = H2Pool("127.0.0.1", port)
    stream = await pool.open_stream(RequestHead(b"POST", b"/%s/Unary" % SERVICE.encode(), b"x",
                                                fields=[(b"content-type", b"application/grpc"),
                                                        (b"te", b"trailers")]))
    conn = pool.connections[0]
    conn.transport.abort()   # the connection dies with the stream open
    with pytest.raises(ConnectionGone) as err:
        await stream.response()
    assert not err.value.retriable and "connection" in str(err.value)
    await eventually(lambda: pool.connections == [], "the dead connection to leave the pool")
    grpc_server.stop(0)


def test_a_dead_connection_fails_its_streams_with_a_clear_error(run):
    run(_dead_upstream)


# ---- robustness ------------------------------------------------------------------------------------

class Transport(asyncio.Transport):
    """An in-memory transport: what the protocol writes, and whether it closed."""

    def __init__(self):
        super().__init__()
        self.out = bytearray()
        self.closing = False

    def write(self, data) -> None:
        self.out += data

    def close(self) -> None:
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name, default=None):
        return default


def frames_of(data: bytes) -> list:
    """The frames in data, as far as they parse."""
    out, pos = [], 0
    while pos + 9 <= len(data):
        frame, length = hyperframe.frame.Frame.parse_frame_header(memoryview(data[pos:pos + 9]))
        frame.parse_body(memoryview(data[pos + 9:pos + 9 + length]))
        out.append(frame)
        pos += 9 + length
    return out


async def _feed(chunks: list[bytes], client_side: bool = False) -> tuple[Transport, H2Downstream, list]:
    """Feed chunks to a server (or, client_side, a client with one stream open); what it wrote, it,
    and the loop's unhandled errors."""
    errors = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))

    async def on_request(stream):
        stream.send_head(ResponseHead(200), end=True)
    t = Transport()
    if client_side:
        from sidecar.datapath.h2client import H2Upstream
        proto = H2Upstream()
        proto.connection_made(t)
        proto.open_stream(post(), end=True)
    else:
        proto = H2Downstream(on_request)
        proto.connection_made(t)
    for c in chunks:
        proto.data_received(c)
    await asyncio.sleep(0)
    return t, proto, errors


def goaway_codes(t: Transport) -> list[int]:
    return [f.error_code for f in frames_of(bytes(t.out)) if isinstance(f, hyperframe.frame.GoAwayFrame)]


EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


@pytest.mark.parametrize("garbage, code", [
    (b"GET / HTTP/1.1\r\n\r\n", 1),                                      # not the preface at all
    (PREFACE + b"\x00\x00\x04\x08\x00\x00\x00\x00\x00\x00\x00\x00\x01", 1),   # WINDOW_UPDATE before SETTINGS
    (PREFACE + EMPTY_SETTINGS + b"\x00\x00\x05\x00\x01\x00\x00\x00\x00hello", 1),   # DATA on stream 0
    (PREFACE + EMPTY_SETTINGS + b"\xff\xff\xff\x00\x00\x00\x00\x00\x01", 6),   # larger than MAX_FRAME_SIZE
    (PREFACE + EMPTY_SETTINGS + b"\x00\x00\x03\x04\x00\x00\x00\x00\x00abc", 6),   # SETTINGS not a multiple of 6
])
def test_malformed_input_ends_the_connection_with_goaway(garbage, code):
    t, proto, errors = run_on_asyncio(_feed, [garbage])
    assert goaway_codes(t) == [code] and t.closing and proto.closed and errors == []


def test_a_valid_request_gets_its_response_from_the_in_memory_transport():
    client = h2.connection.H2Connection()
    client.initiate_connection()
    client.send_headers(1, [(":method", "GET"), (":scheme", "http"), (":path", "/"), (":authority", "a")],
                        end_stream=True)
    t, proto, errors = run_on_asyncio(_feed, [client.data_to_send()])
    events = client.receive_data(bytes(t.out))
    assert any(type(e).__name__ == "ResponseReceived" for e in events) and errors == []
    assert not t.closing and proto.requests == 1


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(garbage=st.binary(min_size=1, max_size=300), split=st.integers(min_value=0, max_value=300),
       with_settings=st.booleans())
def test_random_bytes_after_the_preface_never_raise(garbage, split, with_settings):
    head = PREFACE + (EMPTY_SETTINGS if with_settings else b"")
    data = head + garbage
    split = min(split, len(data))
    t, proto, errors = run_on_asyncio(_feed, [data[:split], data[split:]])
    assert errors == []
    codes = goaway_codes(t)
    if t.closing:   # ended: with one GOAWAY carrying an error code (or NO_ERROR after a peer's GOAWAY)
        assert len(codes) <= 1 and proto.closed
    else:           # still open: the bytes so far were valid frames or the start of one
        assert codes == [] and not proto.closed


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(garbage=st.binary(min_size=1, max_size=300))
def test_random_bytes_from_a_server_never_raise_in_the_client(garbage):
    t, proto, errors = run_on_asyncio(_feed, [EMPTY_SETTINGS + garbage], True)
    assert errors == []
    if t.closing:
        assert proto.closed and proto.streams == {}   # its stream failed with the connection
    else:
        assert goaway_codes(t) == []


def test_random_bytes_seeded_batch_end_in_goaway_or_wait():
    rng = random.Random(20)
    ended = 0
    for _ in range(200):
        garbage = bytes(rng.getrandbits(8) for _ in range(rng.randint(9, 200)))
        t, proto, errors = run_on_asyncio(_feed, [PREFACE + EMPTY_SETTINGS + garbage])
        assert errors == []
        ended += t.closing
        if t.closing:
            assert goaway_codes(t) and proto.closed
    assert ended > 100   # most random frames are errors; the rest wait for more bytes


# ---- the two sides without gRPC: resets, credit on consumption, stream limits, GOAWAY -------------------

class Served:
    """H2Downstream on loopback with a given handler; `pool` is an H2Pool to it."""

    def __init__(self, on_request, limits: Limits | None = None, pool_limits: Limits | None = None,
                 max_connections: int = 16):
        self.on_request, self.limits = on_request, limits
        self.pool_limits, self.max_connections = pool_limits, max_connections
        self.downstreams: list[H2Downstream] = []

    async def __aenter__(self) -> Served:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(self._accept, "127.0.0.1", 0)
        self.pool = H2Pool("127.0.0.1", self.server.sockets[0].getsockname()[1], limits=self.pool_limits,
                           max_connections=self.max_connections)
        return self

    def _accept(self) -> H2Downstream:
        d = H2Downstream(self.on_request, self.limits)
        self.downstreams.append(d)
        return d

    async def __aexit__(self, *exc) -> None:
        self.pool.close()
        for d in self.downstreams:
            d.close()
        self.server.close()
        await self.server.wait_closed()


def post(path: bytes = b"/") -> RequestHead:
    return RequestHead(b"POST", path, b"svc", b"http", [(b"content-type", b"application/octet-stream")])


async def _resets_both_ways():
    seen: list = []

    async def on_request(stream):
        if stream.head.path == b"/refuse":
            stream.reset(7)   # REFUSED_STREAM
            return
        try:
            while await stream.read():
                pass
        except StreamReset as exc:
            seen.append(exc)
            raise
    async with Served(on_request) as s:
        refused = await s.pool.open_stream(post(b"/refuse"), end=True)
        with pytest.raises(StreamReset) as err:
            await refused.response()
        assert err.value.remote and err.value.retriable
        cancelled = await s.pool.open_stream(post(b"/wait"))
        await cancelled.send_data(b"x" * 100)
        cancelled.reset()   # CANCEL
        await eventually(lambda: seen, "the server's read to see the reset")
        assert seen[0].remote and seen[0].code == 8 and not seen[0].retriable
        with pytest.raises(StreamReset):
            await cancelled.send_data(b"more")
        assert len(s.downstreams) == 1 and not s.downstreams[0].closed   # stream errors spare the connection


def test_rst_stream_both_ways_fails_the_stream_only(run):
    run(_resets_both_ways)


async def _credit_on_consumption():
    limits = Limits(stream_window=65535, send_buffer=65536)
    gate = asyncio.Event()
    streams = []

    async def on_request(stream):
        streams.append(stream)
        await gate.wait()             # a slow consumer: nothing read until the gate opens
        total = 0
        while chunk := await stream.read():
            total += len(chunk)
        stream.send_head(ResponseHead(200))
        await stream.send_data(b"%d" % total, end=True)
    async with Served(on_request, limits=limits, pool_limits=limits) as s:
        up = await s.pool.open_stream(post())
        sent = 0

        async def produce():
            nonlocal sent
            for _ in range(64):       # 1 MiB in 16 KiB chunks
                await up.send_data(b"z" * 16384)
                sent += 16384
            up.end()
        producer = asyncio.ensure_future(produce())
        await eventually(lambda: streams and streams[0].buffered >= 65535 - 16384, "the window to fill")
        await asyncio.sleep(0.1)
        # unread: the server holds at most the stream window; the client at most its send buffer and
        # one chunk; the producer waits
        assert not producer.done()
        assert streams[0].buffered <= 65535
        assert up.buffered <= 65536 + 16384
        assert sent <= 65535 + 65536 + 16384
        gate.set()
        await producer
        head = await up.response()
        assert head.status == 200 and await up.read() == b"%d" % (64 * 16384) and await up.read() == b""


def test_received_data_is_credited_only_when_consumed(run):
    run(_credit_on_consumption)


async def _stream_limit():
    gate = asyncio.Event()
    active = []

    async def on_request(stream):
        active.append(stream.stream_id)
        await gate.wait()
        stream.send_head(ResponseHead(200), end=True)
    async with Served(on_request, limits=Limits(max_concurrent_streams=2), max_connections=1) as s:
        first = [await s.pool.open_stream(post(), end=True) for _ in range(2)]
        third = asyncio.ensure_future(s.pool.open_stream(post(), end=True))
        await asyncio.sleep(0.1)
        assert not third.done() and len(active) == 2   # the peer allows 2; max_connections=1: it waits
        gate.set()
        for stream in first + [await third]:
            assert (await stream.response()).status == 200
        assert s.pool.opened == 1 and len(active) == 3


def test_streams_beyond_the_peers_limit_wait_for_a_slot(run):
    run(_stream_limit)


async def _graceful_goaway():
    gate = asyncio.Event()

    async def on_request(stream):
        if stream.head.path == b"/slow":
            await gate.wait()
        stream.send_head(ResponseHead(200))
        await stream.send_data(b"done:" + stream.head.path, end=True)
    async with Served(on_request) as s:
        slow = await s.pool.open_stream(post(b"/slow"), end=True)
        await eventually(lambda: s.downstreams and s.downstreams[0].requests == 1, "the request")
        first_conn = s.pool.connections[0]
        s.downstreams[0].goaway()   # drain: the open stream finishes, new ones go elsewhere
        await eventually(lambda: first_conn.goaway_received, "the GOAWAY to arrive")
        fresh = await s.pool.open_stream(post(b"/fresh"), end=True)
        assert (await fresh.response()).status == 200 and await fresh.read() == b"done:/fresh"
        assert s.pool.opened == 2
        gate.set()
        assert (await slow.response()).status == 200 and await slow.read() == b"done:/slow"
        await eventually(lambda: first_conn.closed and s.downstreams[0].closed, "the drained connection to close")
        assert "drained" in s.downstreams[0].close_reason


def test_goaway_drains_open_streams_and_the_pool_moves_on(run):
    run(_graceful_goaway)


async def _header_list_limit():
    async def on_request(stream):
        stream.send_head(ResponseHead(200), end=True)
    async with Served(on_request, limits=Limits(max_header_list_size=4096)) as s:
        ok = await s.pool.open_stream(post(), end=True)
        assert (await ok.response()).status == 200
        big = RequestHead(b"GET", b"/", b"svc", b"http", [(b"x-big", b"v" * 8192)])
        refused = await s.pool.open_stream(big, end=True)
        with pytest.raises(ConnectionGone) as err:
            await refused.response()
        assert "ENHANCE_YOUR_CALM" in str(err.value)   # RFC 9113 10.5.1: the connection ends, loudly
        assert s.downstreams[0].closed


def test_a_header_list_over_the_limit_ends_the_connection(run):
    run(_header_list_limit)


async def _excess_streams():
    gate = asyncio.Event()

    async def on_request(stream):
        await gate.wait()
    proto = H2Downstream(on_request, Limits(max_concurrent_streams=2))
    t = Transport()
    proto.connection_made(t)
    client = h2.connection.H2Connection()
    client.initiate_connection()
    for sid in (1, 3, 5):   # a burst before the client has seen the server's SETTINGS
        client.send_headers(sid, [(":method", "GET"), (":scheme", "http"), (":path", "/"),
                                  (":authority", "a")], end_stream=True)
    proto.data_received(client.data_to_send())
    await asyncio.sleep(0)
    events = client.receive_data(bytes(t.out))
    resets = [(e.stream_id, e.error_code) for e in events if type(e).__name__ == "StreamReset"]
    assert resets == [(5, 7)] and not t.closing and sorted(proto.streams) == [1, 3]
    assert client.remote_settings.max_concurrent_streams == 2   # advertised all the same
    gate.set()


def test_streams_over_the_advertised_limit_are_refused_not_the_connection():
    run_on_asyncio(_excess_streams)


async def _goaway_then_data_in_one_read():
    from sidecar.datapath.h2client import H2Upstream
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    server.initiate_connection()
    proto = H2Upstream()
    t = Transport()
    proto.connection_made(t)
    proto.data_received(server.data_to_send())
    await proto.ready
    first = proto.open_stream(post(b"/a"), end=True)
    second = proto.open_stream(post(b"/b"), end=True)
    await asyncio.sleep(0)
    server.receive_data(bytes(t.out))
    # GOAWAY naming stream 1 as the last processed, then stream 1's response, all in one read
    goaway = hyperframe.frame.GoAwayFrame(0, last_stream_id=1, error_code=0).serialize()
    server.send_headers(1, [(b":status", b"200")])
    server.send_data(1, b"still here", end_stream=True)
    proto.data_received(goaway + server.data_to_send())
    assert (await first.response()).status == 200 and await first.read() == b"still here"
    with pytest.raises(ConnectionGone) as err:
        await second.response()
    assert err.value.retriable   # stream 3 was above the last-stream-id: never processed
    await asyncio.sleep(0)
    assert proto.closed and t.closing   # nothing left open: the connection ends


def test_a_goaway_lets_the_streams_it_covers_finish_even_in_the_same_read():
    run_on_asyncio(_goaway_then_data_in_one_read)


def grpc_frame(message: bytes) -> bytes:
    """One gRPC length-prefixed message (uncompressed)."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


async def _slow_h2_reader():
    async with Mesh() as m:
        client = H2Pool("127.0.0.1", m.fwd.port)
        head = RequestHead(b"POST", b"/%s/ServerStream" % SERVICE.encode(), b"fwd", b"http",
                           [(b"content-type", b"application/grpc"), (b"te", b"trailers")])
        call = await client.open_stream(head)
        await call.send_data(grpc_frame(b"160,65536"), end=True)   # 10 MiB in 64 KiB messages
        assert (await call.response()).status == 200
        got, lead, peak = 0, 0, 0
        while chunk := await call.read():
            got += len(chunk)
            lead = max(lead, m.service.sent * (65536 + 5) - got)   # bytes the server is ahead of the reader
            peak = max(peak, m.fwd.buffered_bytes)
            await asyncio.sleep(0.0005)
        assert got == 160 * (65536 + 5)
        assert dict(call.trailers)[b"grpc-status"] == b"0"
        assert peak < BUFFER_BOUND, peak
        # the reader's 64 KiB window, the forwarder's buffers and the gRPC server's own queue: the server
        # stays within a few windows of the reader instead of running 10 MiB ahead
        assert lead < 1024 * 1024, lead
        print(f"slow h2 reader: forwarder peak {peak} bytes, server lead {lead} bytes")
        client.close()


def test_a_slow_h2_reader_holds_back_the_grpc_server_through_the_forwarder(run):
    run(_slow_h2_reader)


class Sniffer(asyncio.Protocol):
    """An HTTP/1 port's first protocol: hands a connection that opens with the HTTP/2 preface to
    H2Downstream (with the bytes already read), answers anything else as HTTP/1."""

    def __init__(self, on_request, taken: list):
        self.on_request, self.taken = on_request, taken
        self.first = b""

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.first += data
        verdict = preface_state(self.first)
        if verdict is None:
            return
        if verdict:
            h2proto = H2Downstream(self.on_request)
            self.taken.append(h2proto)
            self.transport.set_protocol(h2proto)
            h2proto.connection_made(self.transport)
            h2proto.data_received(self.first)
        else:
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhttp1")
            self.transport.close()


async def _sniffed():
    async with Mesh() as m:
        taken: list = []
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: Sniffer(m.fwd.handle, taken), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        ch = channel(port)
        try:
            unary = method(ch, "unary_unary", "Unary")
            assert await asyncio.to_thread(unary, b"sniffed", timeout=10) == b"echo:sniffed"
            assert len(taken) == 1 and taken[0].requests == 1
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            assert (await reader.read()).endswith(b"http1")
            writer.close()
        finally:
            ch.close()
            server.close()
            await server.wait_closed()


def test_a_connection_sniffed_as_http2_is_handed_to_h2downstream_with_its_first_bytes(run):
    run(_sniffed)


async def _data_before_head():
    async def on_request(stream):
        await stream.send_data(b"body before any head")   # a handler's bug: the stream is reset
    async with Served(on_request) as s:
        st = await s.pool.open_stream(post(), end=True)
        with pytest.raises(StreamReset) as err:
            await st.response()
        assert err.value.remote and err.value.code == 2   # INTERNAL_ERROR, and the connection lives on
        ok = await s.pool.open_stream(post(), end=True)
        with pytest.raises(StreamReset):
            await ok.response()
        assert s.pool.opened == 1 and not s.downstreams[0].closed


def test_a_handler_error_resets_its_stream_and_spares_the_connection(run):
    run(_data_before_head)


async def _a_connection_per_slot():
    gate = asyncio.Event()

    async def on_request(stream):
        await gate.wait()
        stream.send_head(ResponseHead(200), end=True)
    async with Served(on_request, limits=Limits(max_concurrent_streams=1), max_connections=32) as s:
        streams = await asyncio.gather(*[s.pool.open_stream(post(), end=True) for _ in range(12)])
        assert s.pool.opened == 12 and len(s.downstreams) == 12   # the peer allows 1 stream each
        assert len({st.conn for st in streams}) == 12
        gate.set()
        assert [(await st.response()).status for st in streams] == [200] * 12
        more = await s.pool.open_stream(post(), end=True)   # slots free again: no new connection
        assert (await more.response()).status == 200 and s.pool.opened == 12


def test_concurrent_openers_share_connects_and_reuse_freed_slots(run):
    run(_a_connection_per_slot)


async def _stalled_streams():
    async def on_request(stream):
        if stream.head.path == b"/stall":
            await asyncio.Event().wait()   # never reads: its window stays full
        total = 0
        while chunk := await stream.read():
            total += len(chunk)
        stream.send_head(ResponseHead(200))
        await stream.send_data(b"%d" % total, end=True)
    async with Served(on_request) as s:
        stalled = [await s.pool.open_stream(post(b"/stall")) for _ in range(30)]
        for st in stalled:
            await st.send_data(b"s" * 65535)   # 30 full stream windows: ~2 MiB unread at the server
        await eventually(lambda: s.downstreams[0].buffered_bytes >= 30 * 65535, "the windows to fill")
        live = await s.pool.open_stream(post(b"/echo"))
        await live.send_data(b"l" * 200_000, end=True)
        assert (await live.response()).status == 200 and await live.read() == b"200000"
        assert s.downstreams[0].buffered_bytes <= 31 * 65535   # each stream holds at most its window


def test_streams_whose_readers_stall_do_not_starve_the_others(run):
    run(_stalled_streams)


async def _request_trailers():
    async def on_request(stream):
        body = b"".join([chunk async for chunk in stream.body()])
        stream.send_head(ResponseHead(200, [(b"x-len", b"%d" % len(body))]))
        await stream.send_data(body)
        stream.send_trailers(stream.trailers + [(b"x-server", b"done")])   # the request's, echoed
    async with Served(on_request) as s:
        st = await s.pool.open_stream(post())
        await st.send_data(b"abc")
        st.send_trailers([(b"x-checksum", b"42"), (b"connection", b"close")])   # connection-specific: dropped
        head = await st.response()
        assert head.status == 200 and head.get(b"x-len") == b"3"
        assert await st.read() == b"abc" and await st.read() == b""
        assert st.trailers == [(b"x-checksum", b"42"), (b"x-server", b"done")]
        assert st.finished and st.error is None and await st.wait_closed() is None


def test_request_and_response_trailers_pass_both_ways(run):
    run(_request_trailers)


async def _answered_then_stop_sending():
    """A server that answers whole before the request's end, then RST_STREAM(NO_ERROR) (RFC 9113 8.1:
    'stop sending, without error'), as grpcio does: the answer and its trailers stay readable."""
    async def serve(reader, writer):
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        while data := await reader.read(65536):
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    sid = event.stream_id
                    conn.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc")])
                    conn.send_data(sid, b"hello")
                    conn.send_headers(sid, [(b"grpc-status", b"0")], end_stream=True)
                    conn.reset_stream(sid, error_code=0)
            writer.write(conn.data_to_send())
            await writer.drain()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    pool = H2Pool("127.0.0.1", server.sockets[0].getsockname()[1])
    try:
        stream = await pool.open_stream(RequestHead(b"POST", b"/s/m", b"svc", b"http", [(b"te", b"trailers")]))
        await stream.send_data(b"part one")   # the request is not ended: the server answers anyway
        head = await stream.response()
        assert head.status == 200
        assert await stream.read() == b"hello"
        assert await stream.read() == b""
        assert stream.trailers == [(b"grpc-status", b"0")] and stream.error is None
        await stream.send_data(b"part two")   # the rest of the request is dropped, without an error
        stream.end()
    finally:
        pool.close()
        server.close()


def test_an_answer_followed_by_rst_no_error_stays_readable(run):
    run(_answered_then_stop_sending)
