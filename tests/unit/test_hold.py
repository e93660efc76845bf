"""Start-up ordering: which apps meshd holds at start, and when it lets each go (meshd.hold)."""

from __future__ import annotations

import pytest

from meshcore.labels import wants_hold
from meshd.hold import FORGET, HOLD_MAX_S, RELEASE, TIMEOUT, Holds, decide
from meshd.store import Store


@pytest.mark.parametrize("labels, held", [
    ({"mesh.enable": "true"}, True),                                  # the default: held
    ({"mesh.enable": "true", "mesh.hold": "false"}, False),           # opted out
    ({"mesh.enable": "true", "mesh.hold": "maybe"}, False),           # bad value: not held, reported by decode
    ({"mesh.enable": "false"}, False),
    ({}, False),
    ({"mesh.enable": "true", "mesh.owner": "meshd", "mesh.role": "sidecar"}, False),  # our own sidecar
])
def test_wants_hold(labels, held):
    assert wants_hold(labels) is held


T0 = 1000.0


@pytest.mark.parametrize("now, listed, running, wants, ready, verdict", [
    (T0 + 0.1, False, False, False, False, None),       # not re-listed yet: keep holding
    (T0 + 1.0, True, True, True, False, None),          # sidecar not ready yet
    (T0 + 1.5, True, True, True, True, RELEASE),        # ready: let it go
    (T0 + 0.5, True, True, False, False, RELEASE),      # mesh.hold=false or bad labels: no reason to hold
    (T0 + 2.0, True, False, True, False, FORGET),       # stopped while held: nothing to unpause
    (T0 + HOLD_MAX_S, True, True, True, False, TIMEOUT),  # never ready: released anyway
    (T0 + HOLD_MAX_S, False, False, True, False, TIMEOUT),  # never listed either
])
def test_decide(now, listed, running, wants, ready, verdict):
    assert decide(T0, now, listed=listed, running=running, wants_hold=wants, ready=ready) == verdict


def test_holds_survive_a_restart(tmp_path):
    store = Store(str(tmp_path / "state.db"))
    holds = Holds(store)
    holds.add("a" * 64, T0)
    holds.add("b" * 64, T0 + 1)
    holds.drop("a" * 64)
    holds.drop("never-held")
    assert Holds(Store(str(tmp_path / "state.db"))).since == {"b" * 64: T0 + 1}
