"""sidecar.cli: a sidecar whose app's namespace has lost every interface but lo ends itself (exit 0)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from sidecar.cli import interface_names, lone_since, stop_when_orphaned

PROC_NET_DEV = """Inter-|   Receive                            |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:    1296      16    0    0    0     0          0         0     1296      16    0    0    0     0       0          0
  eth0: 1234567    8901    0    0    0     0          0         0   765432    4321    0    0    0     0       0          0
"""


def test_interface_names_from_proc_net_dev():
    assert interface_names(PROC_NET_DEV) == ["lo", "eth0"]
    assert interface_names(PROC_NET_DEV.split("  eth0")[0]) == ["lo"]
    assert interface_names("") == []


@pytest.mark.parametrize("names, since, now, expected", [
    (["lo", "eth0"], None, 10.0, None),      # the app is there
    (["lo", "eth0"], 3.0, 10.0, None),       # it came back (network reconnected)
    (["lo"], None, 10.0, 10.0),              # lo alone: from now
    (["lo"], 3.0, 10.0, 3.0),                # still alone: since then
    ([], None, 10.0, 10.0),                  # no interface at all counts as alone
    (["eth1"], 3.0, 10.0, None),             # any interface but lo
])
def test_lone_since(names, since, now, expected):
    assert lone_since(names, since, now) == expected


class Clock:
    """Time that moves only when the test says (the loop still runs)."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_stops_after_the_grace_with_lo_alone():
    async def run():
        clock, stop = Clock(), asyncio.Event()
        names = [["lo", "eth0"], ["lo"], ["lo"], ["lo"]]

        def read():
            clock.now += 2.0
            return names.pop(0) if len(names) > 1 else names[0]

        done = await asyncio.wait_for(stop_when_orphaned(stop, read=read, grace_s=3.0, poll_s=0.001,
                                                         clock=clock), 5)
        return done, stop.is_set(), clock.now

    done, stopped, now = asyncio.run(run())
    assert done and stopped
    assert now == 108.0   # lo alone seen at 104, 106 (2 s < 3 s), 108 (4 s >= 3 s)


def test_an_interface_that_comes_back_resets_the_grace():
    async def run():
        clock, stop = Clock(), asyncio.Event()
        seen = [["lo"], ["lo"], ["lo", "eth1"], ["lo"], ["lo"], ["lo"], ["lo"]]

        def read():
            clock.now += 1.0
            return seen.pop(0) if seen else ["lo"]

        await asyncio.wait_for(stop_when_orphaned(stop, read=read, grace_s=2.5, poll_s=0.001, clock=clock), 5)
        return clock.now

    # alone from 101; back at 103; alone again from 104; 3 s later (>= 2.5) at 107
    assert asyncio.run(run()) == 107.0


def test_returns_false_when_stopped_otherwise():
    async def run():
        stop = asyncio.Event()
        task = asyncio.ensure_future(stop_when_orphaned(stop, read=lambda: ["lo", "eth0"], poll_s=10.0))
        await asyncio.sleep(0.01)
        stop.set()
        return await asyncio.wait_for(task, 2)

    assert asyncio.run(run()) is False


def test_a_message_on_the_watch_socket_triggers_a_check():
    async def run():
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        stop, reads = asyncio.Event(), []

        def read():
            reads.append(1)
            return ["lo", "eth0"] if len(reads) == 1 else ["lo"]

        task = asyncio.ensure_future(stop_when_orphaned(stop, read=read, watch=ours, grace_s=0.05))
        await asyncio.sleep(0.05)
        first = len(reads)          # no polling with a watch: one read, then it waits
        theirs.send(b"link gone")   # the kernel's RTM_DELLINK
        done = await asyncio.wait_for(task, 2)
        theirs.close()
        return first, done, ours.fileno()

    first, done, fd = asyncio.run(run())
    assert first == 1 and done
    assert fd == -1                 # the watch socket is closed when the check ends
