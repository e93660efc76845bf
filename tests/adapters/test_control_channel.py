"""The control channel on loopback: meshd's Hub (server) and a real sidecar ControlClient.

Each client runs on its own event loop in its own thread, as a separate process would: a slow or
blocked `apply` then stalls only the node, not meshd.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Callable

import aiohttp
import pytest
from aiohttp import web

from meshcore.protocol import (
    CONTROL_PATH, Ack, Hello, Nack, SnapshotPush, decode_message, encode_message,
)
from meshcore.snapshot import Endpoint, MeshConfig, ServiceConfig, Snapshot, encode_snapshot
from meshd.control import Hub
from sidecar.control import ControlClient

DEADLINE_S = 3.0
ID = "spiffe://mesh.local/ns/shop/sa/"


def snap(version: int) -> Snapshot:
    """A small snapshot whose contents differ per version (one endpoint address per version)."""
    services = {
        "orders": ServiceConfig("orders", "shop", "http", 8080, ID + "orders", ("orders-api",)),
        "catalog": ServiceConfig("catalog", "shop", "tcp", 9000, ID + "catalog"),
    }
    endpoints = {"orders": (Endpoint("a" * 64, f"172.20.0.{version % 250 + 2}", 15006, "v1", ID + "orders"),)}
    return Snapshot(version=version, config=MeshConfig(services=services, endpoints=endpoints))


async def eventually(cond: Callable[[], object], what: str, timeout: float = DEADLINE_S):
    """Poll `cond` until truthy; fail naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


class NodeThread:
    """A real ControlClient on its own loop and thread; records every snapshot given to `apply`."""

    def __init__(self, url: str, node: str, reject: dict[int, Exception] | None = None):
        self.node = node
        self.seen: list[int] = []
        self.reject = reject or {}
        self.gate = threading.Event()       # cleared: apply blocks (a slow node)
        self.gate.set()
        self.in_apply = threading.Event()
        self.rand_calls = 0                 # one per reconnect delay
        self.client = ControlClient(url, "sidecar", node, f"ctr-{node}", self._apply, rand=self._rand)
        self.loop = asyncio.new_event_loop()
        self.task = self.loop.create_task(self.client.run())
        self.thread = threading.Thread(target=self._run, name=f"node-{node}", daemon=True)
        self.thread.start()

    def _rand(self) -> float:
        self.rand_calls += 1
        return 0.1   # reconnect after 20 ms, 40 ms, 80 ms, ... (capped at 0.5 s)

    def _apply(self, snapshot: Snapshot) -> None:
        self.in_apply.set()
        self.gate.wait(10)
        self.seen.append(snapshot.version)
        if snapshot.version in self.reject:
            raise self.reject[snapshot.version]

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.task)
        except BaseException:
            pass
        finally:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    @property
    def version(self) -> int | None:
        cur = self.client.current
        return cur.version if cur else None

    def stop(self) -> None:
        self.gate.set()
        if not self.loop.is_closed():
            try:
                self.loop.call_soon_threadsafe(self.task.cancel)
            except RuntimeError:
                pass
        self.thread.join(5)


class Mesh:
    """A Hub served on 127.0.0.1 (ephemeral port, kept across server restarts) plus its nodes."""

    def __init__(self):
        self.hub = Hub()
        self.port = 0
        self.runner: web.AppRunner | None = None
        self.nodes: list[NodeThread] = []

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}{CONTROL_PATH}"

    async def start_server(self, hub: Hub | None = None) -> None:
        if hub is not None:
            self.hub = hub
        app = web.Application()
        app.router.add_get(CONTROL_PATH, self.hub.handle)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self.runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self.port = sock.getsockname()[1]
        await web.SockSite(self.runner, sock).start()

    async def stop_server(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    def node(self, name: str, **kw) -> NodeThread:
        n = NodeThread(self.url, name, **kw)
        self.nodes.append(n)
        return n

    def state(self, name: str):
        return self.hub.nodes.get(name)

    def acked(self, name: str) -> int | None:
        st = self.state(name)
        return st.acked_version if st else None

    async def close(self) -> None:
        for n in self.nodes:
            n.gate.set()
        await asyncio.get_running_loop().run_in_executor(None, lambda: [n.stop() for n in self.nodes])
        await self.stop_server()


@pytest.fixture
async def mesh():
    m = Mesh()
    await m.start_server()
    try:
        yield m
    finally:
        await m.close()


def status_of(hub: Hub, node: str) -> dict:
    [row] = [r for r in hub.status() if r["node"] == node]
    return row


# ---- tests ------------------------------------------------------------------------------------

async def test_connect_receive_and_ack(mesh):
    mesh.hub.publish(snap(1))
    n = mesh.node("orders-1-mesh")
    await eventually(lambda: mesh.acked("orders-1-mesh") == 1, "ACK of version 1")
    assert n.client.current == snap(1)          # the whole config arrived intact
    assert n.client.connected and n.client.ready.is_set()
    row = status_of(mesh.hub, "orders-1-mesh")
    assert row["connected"] is True and row["kind"] == "sidecar" and row["container"] == "ctr-orders-1-mesh"
    assert (row["acked_version"], row["nacked_version"], row["nack_reason"]) == (1, None, None)


async def test_node_connected_before_first_publish_gets_it(mesh):
    n = mesh.node("early")
    await eventually(lambda: mesh.state("early") is not None and mesh.state("early").connected, "connection")
    assert n.version is None and mesh.acked("early") is None
    mesh.hub.publish(snap(1))
    await eventually(lambda: mesh.acked("early") == 1, "ACK of version 1")


async def test_new_publish_reaches_node(mesh):
    mesh.hub.publish(snap(1))
    n = mesh.node("orders-1-mesh")
    await eventually(lambda: mesh.acked("orders-1-mesh") == 1, "ACK of version 1")
    mesh.hub.publish(snap(2))
    await eventually(lambda: mesh.acked("orders-1-mesh") == 2, "ACK of version 2")
    assert n.client.current == snap(2)
    assert n.seen == [1, 2]


async def test_rejected_snapshot_is_nacked_and_last_good_kept(mesh):
    n = mesh.node("orders-1-mesh", reject={2: ValueError("route orders: no healthy endpoint")})
    mesh.hub.publish(snap(1))
    await eventually(lambda: mesh.acked("orders-1-mesh") == 1, "ACK of version 1")
    mesh.hub.publish(snap(2))
    await eventually(lambda: status_of(mesh.hub, "orders-1-mesh")["nacked_version"] == 2, "NACK of version 2")
    row = status_of(mesh.hub, "orders-1-mesh")
    assert row["nack_reason"] == "route orders: no healthy endpoint"
    assert row["acked_version"] == 1 and row["connected"] is True
    assert n.client.current == snap(1) and n.client.nacks == 1
    # the node is not stuck: the next good snapshot is applied
    mesh.hub.publish(snap(3))
    await eventually(lambda: mesh.acked("orders-1-mesh") == 3, "ACK of version 3")
    assert n.seen == [1, 2, 3] and n.version == 3


async def test_apply_failing_with_any_error_is_nacked_and_client_survives(mesh):
    n = mesh.node("orders-1-mesh", reject={2: KeyError("orders")})
    mesh.hub.publish(snap(1))
    await eventually(lambda: mesh.acked("orders-1-mesh") == 1, "ACK of version 1")
    mesh.hub.publish(snap(2))
    await eventually(lambda: status_of(mesh.hub, "orders-1-mesh")["nacked_version"] == 2, "NACK of version 2")
    assert "orders" in status_of(mesh.hub, "orders-1-mesh")["nack_reason"]
    assert n.version == 1 and not n.task.done()
    mesh.hub.publish(snap(3))
    await eventually(lambda: mesh.acked("orders-1-mesh") == 3, "ACK of version 3")


def _bad_schema(body):
    body["schema"] = 99


def _bad_port(body):
    body["endpoints"]["orders"][0]["port"] = "15006"


def _bad_protocol(body):
    body["services"]["catalog"]["protocol"] = "udp"


def _missing_services(body):
    del body["services"]


def _version_mismatch(body):
    body["version"] = 7


def _policy_as_labels(body):
    # the shape of an older meshd: the service's policy as mesh.* label strings
    body["services"]["orders"]["policy"] = {"mesh.retries.attempts": "3"}


def _bad_retry_attempts(body):
    body["services"]["orders"]["policy"]["retries"]["attempts"] = -1


@pytest.mark.parametrize("mutate, field", [
    (_bad_schema, "snapshot.schema"),
    (_bad_port, "endpoints.orders[0].port"),
    (_bad_protocol, "services.catalog.protocol"),
    (_missing_services, "snapshot.services"),
    (_version_mismatch, "snapshot.version"),
    (_policy_as_labels, "services.orders.policy: label strings (mesh.retries.attempts) instead of typed fields"),
    (_bad_retry_attempts, "services.orders.policy.retries.attempts: expected an integer 0..10, got -1"),
], ids=["schema", "port", "protocol", "missing", "version", "policy-labels", "policy-field"])
async def test_malformed_snapshot_is_nacked_naming_the_field(mesh, mutate, field):
    n = mesh.node("orders-1-mesh")
    mesh.hub.publish(snap(1))
    await eventually(lambda: mesh.acked("orders-1-mesh") == 1, "ACK of version 1")
    body = encode_snapshot(snap(2))
    mutate(body)
    # meshd never encodes a bad body itself: replace the encoded push before the sender runs
    mesh.hub.publish(snap(2))
    mesh.hub._latest_text = encode_message(SnapshotPush(version=2, snapshot=body))
    await eventually(lambda: status_of(mesh.hub, "orders-1-mesh")["nacked_version"] == 2, "NACK of version 2")
    reason = status_of(mesh.hub, "orders-1-mesh")["nack_reason"]
    assert reason.startswith(field), reason
    assert n.seen == [1]                      # apply never saw the malformed body
    assert n.client.current == snap(1) and mesh.acked("orders-1-mesh") == 1


async def test_slow_node_gets_only_the_latest(mesh):
    n = mesh.node("slow-mesh")
    fast = mesh.node("fast-mesh")
    n.gate.clear()                            # the slow node blocks inside apply
    mesh.hub.publish(snap(1))
    await eventually(n.in_apply.is_set, "slow node applying version 1")
    for v in range(2, 21):
        mesh.hub.publish(snap(v))
        await asyncio.sleep(0.005)            # rapid, but meshd's sender gets to run between publishes
    # the healthy node keeps up meanwhile
    await eventually(lambda: mesh.acked("fast-mesh") == 20, "fast node ACK of version 20")
    n.gate.set()
    await eventually(lambda: mesh.acked("slow-mesh") == 20, "slow node ACK of version 20")
    assert n.version == 20 and n.seen[0] == 1 and n.seen[-1] == 20
    assert len(n.seen) < 20, f"slow node was sent every version: {n.seen}"
    assert n.seen == sorted(set(n.seen))


async def test_node_reconnects_with_last_version_and_keeps_snapshot(mesh):
    n = mesh.node("orders-1-mesh")
    mesh.hub.publish(snap(5))
    await eventually(lambda: mesh.acked("orders-1-mesh") == 5, "ACK of version 5")
    await mesh.stop_server()
    await eventually(lambda: not n.client.connected, "client noticing the server is gone")
    calls = n.rand_calls
    await eventually(lambda: n.rand_calls >= calls + 2, "two failed reconnect attempts")
    assert n.client.current == snap(5)        # the data path keeps its last good snapshot meanwhile
    # meshd comes back with no state (a restart): the hello tells it what the node holds
    hellos: list[int] = []
    await mesh.start_server(Hub(on_hello_version=hellos.append))
    await eventually(lambda: hellos, "hello after reconnect")
    assert hellos == [5]
    assert mesh.acked("orders-1-mesh") == 5 and status_of(mesh.hub, "orders-1-mesh")["connected"] is True
    assert n.client.current == snap(5)
    mesh.hub.publish(snap(6))
    await eventually(lambda: mesh.acked("orders-1-mesh") == 6, "ACK of version 6 after reconnect")
    assert n.client.current == snap(6)


async def test_disconnect_shows_in_status(mesh):
    n = mesh.node("orders-1-mesh")
    mesh.hub.publish(snap(1))
    await eventually(lambda: mesh.acked("orders-1-mesh") == 1, "ACK of version 1")
    await asyncio.get_running_loop().run_in_executor(None, n.stop)
    await eventually(lambda: not status_of(mesh.hub, "orders-1-mesh")["connected"], "disconnect")
    assert status_of(mesh.hub, "orders-1-mesh")["acked_version"] == 1


async def test_ack_latency_per_node(mesh):
    mesh.node("a-mesh")
    mesh.node("b-mesh")
    await eventually(lambda: len(mesh.hub.nodes) == 2 and all(s.connected for s in mesh.hub.nodes.values()),
                     "two connected nodes")
    mesh.hub.publish(snap(1))
    await eventually(lambda: mesh.acked("a-mesh") == 1 and mesh.acked("b-mesh") == 1, "both ACKs")
    lat = mesh.hub.ack_latency(1)
    assert set(lat) == {"a-mesh", "b-mesh"}
    assert all(0 <= v < DEADLINE_S for v in lat.values()), lat
    assert mesh.hub.ack_latency(99) == {}


# ---- raw websocket peers: what a sidecar does not do on its own ----------------------------------

async def _raw_hello(session, url, node, last_version=0):
    ws = await session.ws_connect(url)
    await ws.send_str(encode_message(Hello(kind="sidecar", node=node, container="ctr", last_version=last_version)))
    return ws


async def _recv_push(ws) -> SnapshotPush:
    msg = await ws.receive(timeout=DEADLINE_S)
    assert msg.type == aiohttp.WSMsgType.TEXT, msg
    push = decode_message(msg.data)
    assert isinstance(push, SnapshotPush)
    return push


async def test_first_message_must_be_hello(mesh):
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(mesh.url)
        await ws.send_str(encode_message(Ack(version=1)))
        msg = await ws.receive(timeout=DEADLINE_S)
        assert msg.type == aiohttp.WSMsgType.CLOSE and ws.close_code == 4400
        ws2 = await session.ws_connect(mesh.url)
        await ws2.send_str('{"type":"hello","kind":"robot","node":"x","container":"","last_version":0}')
        await ws2.receive(timeout=DEADLINE_S)
        assert ws2.close_code == 4400
    assert mesh.hub.nodes == {}


async def test_same_node_reconnecting_while_old_connection_lingers(mesh):
    """A recreated sidecar reconnects under the same name before meshd noticed the old connection died."""
    mesh.hub.publish(snap(1))
    async with aiohttp.ClientSession() as session:
        old = await _raw_hello(session, mesh.url, "orders-1-mesh")
        assert (await _recv_push(old)).version == 1
        await old.send_str(encode_message(Ack(version=1)))
        new = await _raw_hello(session, mesh.url, "orders-1-mesh", last_version=0)
        assert (await _recv_push(new)).version == 1
        await new.send_str(encode_message(Ack(version=1)))
        await eventually(lambda: mesh.acked("orders-1-mesh") == 1, "ACK of version 1")
        mesh.hub.publish(snap(2))
        # the live connection must get version 2, whatever the lingering one does
        assert (await _recv_push(new)).version == 2
        await new.send_str(encode_message(Nack(version=2, reason="nope")))
        await eventually(lambda: status_of(mesh.hub, "orders-1-mesh")["nacked_version"] == 2, "NACK of 2")
        await old.close()                     # the old connection finally goes away
        mesh.hub.publish(snap(3))
        assert (await _recv_push(new)).version == 3
        await new.send_str(encode_message(Ack(version=3)))
        await eventually(lambda: mesh.acked("orders-1-mesh") == 3, "ACK of 3")
        # ending the old connection must not mark the node's live connection as gone
        assert status_of(mesh.hub, "orders-1-mesh")["connected"] is True
        await new.close()
    await eventually(lambda: not status_of(mesh.hub, "orders-1-mesh")["connected"], "disconnect")
