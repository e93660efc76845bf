"""meshd's event log: what happened to the mesh, for people (meshctl events, the dashboard).

Kinds: error_rate_spike / error_rate_recovered, latency_jump / latency_recovered, ejection (from the
data plane's ejection counter, when it has one), nack (a node refused a snapshot), cert_near_expiry,
adaptive_tighten / adaptive_relax (the control loop's actions, with their reason), problem /
problem_cleared (a part of a rebuild, such as a sidecar, a listener or an mDNS interface, started
failing or works again: meshd.problems), node_refused (the control channel refused a hello: a replayed
or unknown bootstrap token, a node in the wrong place; `first_in_window` keeps one a minute per peer,
node and reason).

Kept in meshd's store under one key, the last MAX_EVENTS, so they survive a meshd restart. Events
are rare (edges of alarms, not samples): writing the bounded list on each one is cheap.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

from .store import Store

STORE_KEY = "events"
MAX_EVENTS = 1000
KINDS = ("problem", "problem_cleared", "error_rate_spike", "error_rate_recovered", "latency_jump",
         "latency_recovered", "ejection", "nack", "cert_near_expiry", "adaptive_tighten", "adaptive_relax",
         "node_refused")
REFUSAL_WINDOW_S = 60.0
MAX_KEYS = 1000


def first_in_window(seen: dict, key: Any, now: float, window_s: float = REFUSAL_WINDOW_S,
                    max_keys: int = MAX_KEYS) -> bool:
    """True when `key` was not seen in the last `window_s` (then it is noted at `now`); `seen` keeps
    at most `max_keys` keys (the stale ones go first), so a flood of new keys cannot grow it."""
    last = seen.get(key)
    if last is not None and now - last < window_s:
        return False
    if len(seen) >= max_keys:
        for old in [k for k, t in seen.items() if now - t >= window_s] or sorted(seen, key=seen.get)[:1]:
            del seen[old]
    seen[key] = now
    return True


class EventLog:
    """A bounded, persisted, timestamped list of events; ids only grow."""

    def __init__(self, store: Store | None, max_events: int = MAX_EVENTS, clock: Callable[[], float] = time.time):
        self.store = store
        self.max_events = max_events
        self.clock = clock
        self._lock = threading.Lock()
        raw = store.get(STORE_KEY, []) if store is not None else []
        self.events: list[dict[str, Any]] = [e for e in raw if isinstance(e, dict) and "id" in e][-max_events:]
        self._next_id = max((int(e["id"]) for e in self.events), default=0) + 1

    def add(self, kind: str, message: str, service: str | None = None, version: str | None = None,
            **details: Any) -> dict[str, Any]:
        """Record one event now; returns it."""
        with self._lock:
            event = {"id": self._next_id, "ts": round(self.clock(), 3), "kind": kind, "service": service,
                     "version": version, "message": message}
            if details:
                event["details"] = details
            self._next_id += 1
            self.events.append(event)
            if len(self.events) > self.max_events:
                del self.events[: len(self.events) - self.max_events]
            snapshot = list(self.events)
        if self.store is not None:
            self.store.put(STORE_KEY, snapshot)
        return event

    def since(self, ts: float | None = None, after_id: int | None = None, limit: int = MAX_EVENTS) -> list[dict]:
        """Events newer than `ts` (wall clock seconds) and/or with an id above `after_id`; oldest first."""
        with self._lock:
            out = [e for e in self.events
                   if (ts is None or e["ts"] > ts) and (after_id is None or e["id"] > after_id)]
        return out[-limit:] if limit > 0 else []
