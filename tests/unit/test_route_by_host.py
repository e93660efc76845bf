"""sidecar.proxy.route_by_host, the outbound route layer: Host header first (looked up as bytes in
an index of the table's host names), else the original destination; no sockets."""

from __future__ import annotations

import pytest

from sidecar.proxy import (
    Exchange, ProxyState, Reply, _Downstream, _Listener, build_outbound_stack, host_index, route_by_host,
)
from sidecar.routing import PASSTHROUGH, build_route_table

from .test_routing import snapshot, svc


def exchange(state: ProxyState, host: bytes | None, orig_dst=None) -> tuple[_Downstream, Exchange]:
    down = _Downstream(state, build_outbound_stack(state), _Listener(None, 0.3))
    down.orig_dst = orig_dst
    ex = Exchange(down)
    ex.host = host
    return down, ex


def test_host_index_is_the_tables_hosts_by_latin1_bytes():
    table = build_route_table(snapshot())
    index = host_index(table)
    assert {k.decode("latin-1"): v for k, v in index.items()} == dict(table.hosts)
    assert index[b"pay"] is table.clusters["payments"]


def test_a_host_name_no_header_can_carry_is_left_out():
    snap = snapshot()
    services = {**snap.config.services, "caf\u0113": svc("caf\u0113")}   # not latin-1
    table = build_route_table(type(snap)(version=4, config=type(snap.config)(services=services)))
    assert "caf\u0113" in table.hosts and all(isinstance(k, bytes) for k in host_index(table))
    carried = {name for name in table.hosts if "\u0113" not in name}
    assert len(carried) < len(table.hosts)   # caf\u0113 and its qualified names
    assert {k.decode("latin-1") for k in host_index(table)} == carried


@pytest.mark.parametrize("host, expect", [
    (b"payments", "payments"), (b"pay", "payments"), (b"Payments:8080", "payments"),
    (b"empty", "empty"), (b"unknown.example", PASSTHROUGH),
])
def test_route_by_host(host, expect):
    state = ProxyState("orders", table=build_route_table(snapshot()))
    down, ex = exchange(state, host, orig_dst=("10.9.9.9", 80))
    assert route_by_host(down, ex).name == expect


def test_no_host_and_no_destination_is_no_route():
    state = ProxyState("orders", table=build_route_table(snapshot()))
    down, ex = exchange(state, None)
    assert route_by_host(down, ex).__class__ is Reply


def test_a_new_table_is_indexed_at_its_first_request():
    state = ProxyState("orders", table=build_route_table(snapshot()))
    down, ex = exchange(state, b"payments")
    first = route_by_host(down, ex)
    state.table = build_route_table(snapshot(version=9))   # swapped without apply_snapshot
    second = route_by_host(down, ex)
    assert second is state.table.clusters["payments"] and second is not first
    assert state.host_index_of is state.table
