"""The host a node dials meshd at: the configured one while on-link or loopback, else the default gateway."""

from __future__ import annotations

import ipaddress

import pytest

from meshcore.control_address import NoControlAddress, Route, choose_control_host, parse_proc_net_route
from sidecar.control import ControlClient

# /proc/net/route of a container on one bridge network 172.23.0.0/16 (gateway 172.23.0.1), as the
# kernel writes it: little-endian hex addresses, flags 0003 = RTF_UP|RTF_GATEWAY, 0001 = RTF_UP.
PROC_ONE_NET = """\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t010017AC\t0003\t0\t0\t0\t00000000\t0\t0\t0
eth0\t000017AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0
"""
# The same app after `docker network disconnect` + `connect` to a re-created network 172.31.0.0/16,
# plus a second network 10.9.0.0/24 without a default route through it, and a route that is down.
PROC_TWO_NETS = """\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth1\t00000000\t01001FAC\t0003\t0\t0\t0\t00000000\t0\t0\t0
eth1\t00001FAC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0
eth2\t0000090A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
eth3\t0000000B\t00000000\t0000\t0\t0\t0\t000000FF\t0\t0\t0
"""
# An `internal: true` network: on-link only, no default route.
PROC_INTERNAL = """\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t000018AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0
"""


def test_parse_proc_net_route():
    routes = parse_proc_net_route(PROC_ONE_NET)
    assert routes == [
        Route("eth0", ipaddress.IPv4Network("0.0.0.0/0"), ipaddress.IPv4Address("172.23.0.1")),
        Route("eth0", ipaddress.IPv4Network("172.23.0.0/16"), None),
    ]
    assert routes[0].is_default and not routes[1].is_default
    # the down route (flags 0000) is left out; garbage rows are skipped, not fatal
    assert len(parse_proc_net_route(PROC_TWO_NETS)) == 3
    assert parse_proc_net_route("header\nnot a route\neth0 zz zz zz 0 0 0 zz\n") == []
    assert parse_proc_net_route("") == []


@pytest.mark.parametrize("configured, table, expected", [
    ("172.23.0.1", PROC_ONE_NET, "172.23.0.1"),     # the normal case: the bridge's gateway, on-link
    ("127.0.0.1", PROC_ONE_NET, "127.0.0.1"),       # loopback (the gateway node, host network)
    ("172.22.0.1", PROC_ONE_NET, "172.23.0.1"),     # stale: an old subnet, would be routed off-host
    ("8.8.8.8", PROC_ONE_NET, "172.23.0.1"),        # never an address that needs a router
    ("meshd.example", PROC_ONE_NET, "172.23.0.1"),  # a name is never trusted: the host instead
    ("172.23.0.1", PROC_TWO_NETS, "172.31.0.1"),    # the network was re-created with a new subnet
    ("10.9.0.1", PROC_TWO_NETS, "10.9.0.1"),        # on-link on a second network
    ("172.24.0.1", PROC_INTERNAL, "172.24.0.1"),    # internal network: on-link, no default route
])
def test_choose_control_host(configured, table, expected):
    assert choose_control_host(configured, parse_proc_net_route(table)) == expected


@pytest.mark.parametrize("configured, table", [
    ("172.22.0.1", PROC_INTERNAL),   # neither on-link nor a default gateway to fall back to
    ("172.23.0.1", ""),              # no routes at all (the namespace is being torn down)
])
def test_no_control_address(configured, table):
    with pytest.raises(NoControlAddress, match=repr(configured)):
        choose_control_host(configured, parse_proc_net_route(table))


def test_client_dials_the_checked_host():
    routes = parse_proc_net_route(PROC_TWO_NETS)
    client = ControlClient("wss://172.23.0.1:15012/v1/stream", "sidecar", "n", "c", apply=lambda s: None,
                           routes=lambda: routes)
    assert client.dial_url() == "wss://172.31.0.1:15012/v1/stream"
    ok = ControlClient("wss://10.9.0.1:15012/v1/stream", "sidecar", "n", "c", apply=lambda s: None,
                       routes=lambda: routes)
    assert ok.dial_url() == "wss://10.9.0.1:15012/v1/stream"
    plain = ControlClient("wss://203.0.113.9:15012/v1/stream", "gateway", "n", "c", apply=lambda s: None)
    assert plain.dial_url() == "wss://203.0.113.9:15012/v1/stream"   # no route source: as given


async def test_the_dialled_url_is_reported_on_connect(monkeypatch):
    """What follows the control channel (the span exporter) learns the checked URL, not the configured."""
    import asyncio

    import sidecar.control as control_module

    dialled = []

    class FakeWs:
        async def __aenter__(self):
            return self

        async def __aexit__(self, *exc):
            return False

        async def send(self, data):
            raise OSError("closed")

    def fake_connect(url, **kw):
        dialled.append(url)
        return FakeWs()

    monkeypatch.setattr(control_module, "connect", fake_connect)
    routes = parse_proc_net_route(PROC_TWO_NETS)
    told = []
    client = ControlClient("wss://172.23.0.1:15012/v1/stream", "sidecar", "n", "c", apply=lambda s: None,
                           routes=lambda: routes, on_connected=told.append)
    task = asyncio.ensure_future(client.run())
    for _ in range(100):
        if told:
            break
        await asyncio.sleep(0.01)
    task.cancel()
    # Under load the client may have reconnected (FakeWs fails every send) before the poll looked:
    # every connect reports the same checked URL.
    assert told and set(told) == {"wss://172.31.0.1:15012/v1/stream"} and dialled[0] == told[0]


@pytest.mark.parametrize("now, renew_at, asked_at, server, wait", [
    (100.0, None, 0.0, False, 1.0),           # no certificate yet: look again in 1 s
    (100.0, 1000.0, 0.0, False, 30.0),        # renewal far off: at most 30 s
    (100.0, 110.0, 0.0, False, 10.0),         # renewal in 10 s: sleep until then
    (100.0, 90.0, 99.0, False, 1.0),          # due, asked 1 s ago: ask again 2 s after asking
    (100.0, 90.0, 50.0, False, 0.05),         # due, asked long ago: at once (floor)
    (100.0, 1000.0, 0.0, True, 5.0),          # a gateway also looks at its HTTPS certificate
])
def test_renew_wait(now, renew_at, asked_at, server, wait):
    from sidecar.control import renew_wait
    assert renew_wait(now, renew_at, asked_at, server) == pytest.approx(wait)
