"""WriteBatch (sidecar/datapath/batch.py): which writes go at once and which wait for the end of the
turn, in what order the held bytes leave, and when the batch switches between the two modes."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.datapath import batch
from sidecar.datapath.batch import DIRECT_AFTER, PROBE_EVERY, WriteBatch
from sidecar.datapath.wire import JOIN_MAX, _send


class Transport:
    """Records what was written to it, in one log shared by all (the order across transports)."""

    def __init__(self, name: str, log: list, fail: bool = False):
        self.name, self.log, self.fail = name, log, fail

    def write(self, data):
        if self.fail:
            raise RuntimeError("transport is closed")
        self.log.append((self.name, bytes(data)))

    def writelines(self, parts):
        self.log.append((self.name, [bytes(p) for p in parts]))


class Turns:
    """A fake loop's call_soon: the callbacks scheduled in this turn, run by end_turn()."""

    def __init__(self):
        self.soon = []

    def __call__(self, callback):
        self.soon.append(callback)

    def end_turn(self) -> None:
        soon, self.soon = self.soon, []
        for callback in soon:
            callback()


def _batch(holding: bool = False):
    log, turns = [], Turns()
    b = WriteBatch(turns)
    b.holding = holding
    return b, turns, log


def test_idle_writes_go_at_once_until_the_probe_holds_one_for_its_turn():
    b, turns, log = _batch()
    a = Transport("a", log)
    for i in range(PROBE_EVERY - 1):
        b.write(a, b"%d" % i)
    assert len(log) == PROBE_EVERY - 1 and not turns.soon   # at once, nothing scheduled
    b.write(a, b"probe")
    assert log[-1] != ("a", b"probe") and b.armed and len(turns.soon) == 1
    turns.end_turn()
    assert log[-1] == ("a", b"probe")
    assert not b.holding and b.countdown == PROBE_EVERY   # a turn of one transport: still idle


def test_a_probe_turn_with_two_transports_starts_holding():
    b, turns, log = _batch()
    a, c = Transport("a", log), Transport("c", log)
    b.countdown = 1
    b.write(a, b"1")        # the probe
    b.write(c, b"2")        # same turn: joins it
    b.write(a, b"3")        # same transport again: after its first bytes, one write
    assert log == []
    turns.end_turn()
    assert log == [("a", b"13"), ("c", b"2")] and b.holding
    b.write(c, b"4")        # holding: the next turn's writes wait too
    assert log[-1] == ("c", b"2") and len(turns.soon) == 1


@pytest.mark.parametrize("turns_of_one, holding", [
    (DIRECT_AFTER - 1, True),
    (DIRECT_AFTER, False),
])
def test_holding_ends_after_turns_of_one_transport_in_a_row(turns_of_one, holding):
    b, turns, log = _batch(holding=True)
    a, c = Transport("a", log), Transport("c", log)
    b.write(a, b"x")
    b.write(c, b"y")
    turns.end_turn()          # a busy turn resets the count
    for _ in range(turns_of_one):
        b.write(a, b"z")
        turns.end_turn()
    assert b.holding is holding
    assert log.count(("a", b"z")) == turns_of_one   # every held byte left


def test_settle_writes_one_transports_held_bytes_now_and_leaves_the_others():
    b, turns, log = _batch(holding=True)
    a, c = Transport("a", log), Transport("c", log)
    b.write(a, b"response 1")
    b.write(c, b"other")
    b.settle(a)
    assert log == [("a", b"response 1")]
    b.settle(a)   # nothing more held for it
    turns.end_turn()
    assert log == [("a", b"response 1"), ("c", b"other")]


def test_a_failing_transport_does_not_keep_the_others_bytes():
    b, turns, log = _batch(holding=True)
    bad, good = Transport("bad", log, fail=True), Transport("good", log)
    b.write(bad, b"lost")
    b.write(good, b"kept")
    turns.end_turn()
    assert log == [("good", b"kept")] and not b.armed and b.held == {}


def test_without_a_running_loop_the_probe_write_goes_at_once():
    log = []
    b = WriteBatch()   # no call_soon, no running loop
    a = Transport("a", log)
    b.countdown = 1
    b.write(a, b"now")
    assert log == [("a", b"now")] and not b.armed


def test_a_closed_loop_is_replaced_by_the_running_one():
    log = []
    old = asyncio.new_event_loop()
    old.close()
    b = WriteBatch(old.call_soon)
    b.holding = True
    a = Transport("a", log)

    async def turn():
        b.write(a, b"held")
        assert log == []
        await asyncio.sleep(0)   # the end of the turn
        assert log == [("a", b"held")]

    asyncio.run(turn())


@pytest.mark.parametrize("parts, expect", [
    ([b"a", b"b"], [("t", b"earlierab")]),                                      # joined, one write after what was held
    ([b"h" * 100, b"b" * JOIN_MAX], [("t", b"earlier"), ("t", [b"h" * 100, b"b" * JOIN_MAX])]),   # large: settle, writelines
])
def test_send_keeps_the_order_of_held_bytes(parts, expect):
    b, turns, log = _batch(holding=True)
    t = Transport("t", log)
    b.write(t, b"earlier")
    _send(b, t, parts)
    turns.end_turn()
    assert log == expect


def test_send_without_a_batch_writes_at_once():
    log = []
    _send(None, Transport("t", log), (b"5\r\n", b"hello", b"\r\n"))
    assert log == [("t", b"5\r\nhello\r\n")]


def test_the_constants_are_the_modules():
    assert batch.PROBE_EVERY == PROBE_EVERY > 1 and batch.DIRECT_AFTER == DIRECT_AFTER >= 1
