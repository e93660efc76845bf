"""Writes held to the end of the turn (sidecar/datapath/batch.py) on loopback: under concurrent load the
batch holds them, and with every write held from the first one the data path gives the same answers,
in the same order, with the same closes, as when it writes at once."""

from __future__ import annotations

import asyncio
import json
from contextlib import AsyncExitStack

import pytest

from sidecar.datapath import batch

from .test_proxy import (
    SVC_PORT, Mesh, _backpressure_request, _backpressure_response, _chunked_both_ways, _connection_close,
    _expect_continue, _five_megabytes, _head_and_204, _keepalive_reuse, _malformed, _nothing_after_close,
    _pipelined, _until_close_response, raw_call, sample,
)
from .test_upgrade import _refused_upgrade_closes, _websocket_echo

SCENARIOS = (_keepalive_reuse, _pipelined, _connection_close, _chunked_both_ways, _five_megabytes, _head_and_204,
             _expect_continue, _until_close_response, _backpressure_response, _backpressure_request, _malformed,
             _nothing_after_close)


@pytest.fixture
def hold_every_write(monkeypatch):
    """Every write waits for the end of its turn, and the batch never goes back to writing at once."""
    monkeypatch.setattr(batch, "PROBE_EVERY", 1)
    monkeypatch.setattr(batch, "DIRECT_AFTER", 10**9)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda f: f.__name__.strip("_"))
def test_the_same_answers_with_every_write_held(run, hold_every_write, scenario):
    run(scenario)


@pytest.mark.parametrize("scenario", (_websocket_echo, _refused_upgrade_closes), ids=lambda f: f.__name__.strip("_"))
def test_upgrades_with_every_write_held(run, ca, hold_every_write, scenario):
    run(scenario, ca)


async def _held_then_closed():
    async with AsyncExitStack() as stack:
        mesh = await Mesh(stack).start(mode="transparent", original_dst=lambda t: None)
        # One read: two answers held in the same turn, then a request whose answer closes.
        reqs = b"GET /echo?n=1 HTTP/1.1\r\nHost: payments\r\n\r\nGET /echo?n=2 HTTP/1.1\r\nHost: payments\r\n\r\n"
        reqs += b"GET /echo?n=3 HTTP/1.1\r\nHost: payments\r\nConnection: close\r\n\r\n"
        items, closed = await raw_call(mesh.out_port, reqs, n=3)
        assert [json.loads(i["body"])["query"] for i in items] == ["n=1", "n=2", "n=3"] and closed
        # A bad request after a held answer: the answer first, then the 400, then the close.
        items, closed = await raw_call(mesh.out_port, b"GET /echo?n=4 HTTP/1.1\r\nHost: payments\r\n\r\n"
                                                      b"BAD\x00 / HTTP/1.1\r\n\r\n", n=2)
        assert [i["status"] for i in items] == [200, 400] and closed
        for state in (mesh.out_state, mesh.inbound_state):
            assert state.writes.turns > 0 and state.writes.held == {}


def test_held_answers_leave_before_a_close(run, hold_every_write):
    run(_held_then_closed)


async def _busy_turns_hold():
    async with AsyncExitStack() as stack:
        mesh = await Mesh(stack).start()
        s = await mesh.session()

        async def client(c: int) -> list:
            got = []
            for i in range(20):
                async with s.get(f"http://payments:{SVC_PORT}/echo?c={c}&i={i}", proxy=mesh.proxy) as r:
                    got.append((r.status, (await r.json())["query"]))
            return got

        results = await asyncio.gather(*(client(c) for c in range(10)))
        for c, got in enumerate(results):
            assert got == [(200, f"c={c}&i={i}") for i in range(20)]
        # Turns that carried several connections' writes: the batch held them and wrote them together,
        # and the node's metrics say so.
        for state in (mesh.out_state, mesh.inbound_state):
            w = state.writes
            assert w.turns > 0 and w.writes > w.turns, (w.turns, w.writes)
            assert sample(state, "mesh_sidecar_held_write_turns_total") == w.turns
            assert sample(state, "mesh_sidecar_held_writes_total") == w.writes


def test_concurrent_clients_have_their_writes_held_per_turn(run):
    run(_busy_turns_hold)
