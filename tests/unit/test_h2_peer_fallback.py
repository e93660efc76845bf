"""H2PeerConnector's memory of peers that answered ALPN with http/1.1 stays bounded (MAX_PEER_POOLS)."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.datapath import h2upstream
from sidecar.datapath.h2client import NoH2


class _Http1OnlyPool:
    """An H2Pool whose every peer picked http/1.1."""

    def __init__(self, host, port, **_kw):
        self._closed = False
        self.connections = []
        self._pending = None

    async def connection(self):
        raise NoH2("peer chose http/1.1")

    def close(self):
        self._closed = True


class _Tls:
    client_context_h2 = object()


class _Loop:
    def __init__(self):
        self.now = 1000.0

    def time(self):
        return self.now

    async def create_connection(self, factory, host, port, ssl=None, server_hostname=None):
        return ("transport", host, port), factory()


@pytest.mark.parametrize("peers, advance_s, expect", [
    (10, 0.0, 10),                                        # under the bound: each remembered
    (h2upstream.MAX_PEER_POOLS + 5, 0.0, h2upstream.MAX_PEER_POOLS),   # over it, none expired: capped
    (h2upstream.MAX_PEER_POOLS + 5, h2upstream.NO_H2_RECHECK_S + 1, 1),   # expired ones dropped first
])
def test_http1_memory_is_bounded(monkeypatch, peers, advance_s, expect):
    monkeypatch.setattr(h2upstream, "H2Pool", _Http1OnlyPool)
    loop = _Loop()
    conn = h2upstream.H2PeerConnector(_Tls(), 1.0)

    async def run():
        for i in range(peers):
            if i == peers - 1:
                loop.now += advance_s
            transport, _ = await conn(loop, lambda: "proto", f"10.0.{i // 250}.{i % 250}", 8443, None, "peer",
                                      lambda t: None)
            assert transport[1:] == (f"10.0.{i // 250}.{i % 250}", 8443)   # served over HTTP/1.1

    asyncio.run(run())
    assert len(conn.http1_until) == expect
    assert ("10.0.{}.{}".format((peers - 1) // 250, (peers - 1) % 250), 8443) in conn.http1_until   # the newest kept
