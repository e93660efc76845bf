"""sidecar.guard's sweep as a table: each connection phase and age against the limits, on stand-in
connections (no sockets, no loop): what the guard does to each."""

from __future__ import annotations

from time import monotonic
from types import SimpleNamespace

import pytest

from meshcore.limits import Limits
from sidecar.guard import _BODY, _IDLE, ConnectionGuard

LIMITS = Limits(head_timeout=10.0, idle_timeout=300.0, body_timeout=60.0, max_connections=2)


class Conn(SimpleNamespace):
    """A stand-in _Downstream that records what was done to it."""

    __hash__ = object.__hash__   # a dict key by identity, as the real one
    __eq__ = object.__eq__

    def __init__(self, **kw):
        base = dict(closing=False, switched=False, cur=None, queue=[], raw=None, paused=0, done=[],
                    transport=SimpleNamespace(write=lambda data: self.done.append(data[:12]),
                                              abort=lambda: self.done.append("abort")))
        super().__init__(**{**base, **kw})

    def _close(self):
        self.done.append("close")

    def _abort(self):
        self.done.append("abort")

    def _reply(self, ex, status, flags, body, close):
        self.done.append((status, flags, close))


def exchange(head_done: bool, age: float, dispatched: bool = True, resp_started: bool = False):
    return SimpleNamespace(head_done=head_done, start=monotonic() - age, dispatched=dispatched,
                           resp_started=resp_started)


def head(age, first=True):
    """A connection in the middle of a head begun `age` seconds before the test runs (not collection)."""
    def conn():
        ex = exchange(False, age)
        return {"cur": ex, "queue": [ex] if first else [exchange(True, 1), ex]}
    return conn


def body(**kw):
    ex = exchange(True, 1, **kw)
    return {"cur": ex, "queue": [ex]}


@pytest.mark.parametrize("conn, phase, age, quiet, expected", [
    (head(5), 0, 0, None, []),                                         # a head under way
    (head(11), 0, 0, None, [b"HTTP/1.1 408", "close"]),                # slowloris: 408, closed
    (head(11, first=False), 0, 0, None, ["abort"]),                    # behind unanswered requests
    ({}, _IDLE, 301, 400.0, ["close"]),                                # idle too long
    ({}, _IDLE, 301, 2.0, []),                                         # ...but data came 2 s ago
    ({}, _IDLE, 301, None, ["close"]),                                 # TCP_INFO unreadable: our clock
    ({}, _IDLE, 100, 400.0, []),                                       # idle, not yet long
    ({}, 0, 0, 400.0, []),                                             # first seen idle: the clock starts
    (body(), _BODY, 61, 61.0, [(408, "SI", True)]),                    # a stalled body
    (body(resp_started=True), _BODY, 61, 61.0, ["abort"]),            # ...whose response began
    (body(dispatched=False), _BODY, 61, 61.0, ["abort"]),             # ...pipelined, not dispatched
    ({**body(), "paused": 1}, _BODY, 61, 61.0, []),                    # our backpressure, not a stall
    (body(), _IDLE, 61, 61.0, []),                                     # idle -> body: the clock restarts
    ({"queue": [exchange(True, 1)]}, 0, 500, 500.0, []),               # waiting for its response
    ({"raw": bytearray()}, 0, 500, 500.0, []),                         # sniffing: its own timer
    ({"closing": True}, _IDLE, 500, 500.0, []),
    ({"switched": True}, _IDLE, 500, 500.0, []),                       # a byte tunnel now
])
def test_sweep(conn, phase, age, quiet, expected):
    guard = ConnectionGuard(LIMITS, quiet_for=lambda _t: quiet)
    down = Conn(**(conn() if callable(conn) else conn))
    guard.conns[down] = (phase, monotonic() - age)
    loop = SimpleNamespace(call_later=lambda *a: None)
    guard._sweep(loop)
    assert down.done == expected
    if down.closing or down.switched:
        assert down not in guard.conns


def test_admission_counts_the_listeners_open_connections():
    guard = ConnectionGuard(LIMITS)
    timers = []
    for n, admitted in ((1, True), (2, True), (3, False)):
        down = Conn(stack=SimpleNamespace(gauge=SimpleNamespace(get=lambda n=n: n)),
                    loop=SimpleNamespace(call_later=lambda *a: timers.append(a) or "timer"))
        assert guard.admit(down) is admitted
        assert down.done == ([] if admitted else ["abort"])
    assert guard.refused == 1 and len(guard.conns) == 2 and len(timers) == 1   # one timer per listener
    assert guard.tick == 1.0


def test_no_timeouts_no_sweep():
    guard = ConnectionGuard(Limits(head_timeout=0, idle_timeout=0, body_timeout=0))
    down = Conn(stack=SimpleNamespace(gauge=SimpleNamespace(get=lambda: 1)), loop=None)
    assert guard.admit(down) and guard.conns == {} and guard.tick == 0.0
