"""Start-up ordering: a meshed app is paused from its start until its sidecar is ready.

Compose starts the app before meshd can give it a sidecar. In that window the app's calls would leave
without the mesh: plaintext, refused by STRICT peers. Like Istio's holdApplicationUntilProxyStarts,
meshd holds the app: it pauses the container (the cgroup freezer) as soon as Docker reports its
start, starts the sidecar in its network namespace, and unpauses it once the sidecar's
/healthz/ready answers 200 (config, listeners, certificate). The holds are kept in meshd's store by
container id (never reused), so a meshd restarted meanwhile still releases them, and a container
the user paused by hand is never unpaused by meshd.
"""

from __future__ import annotations

from typing import Any

HOLD_MAX_S = 30.0       # a hold never outlasts this: the app runs unmeshed rather than not at all
STORE_KEY = "holds"

RELEASE = "release"     # the sidecar is ready (or the app is not held after all): unpause
TIMEOUT = "timeout"     # held too long: unpause anyway, and say so
FORGET = "forget"       # the container stopped: nothing to unpause


def decide(since: float, now: float, *, listed: bool, running: bool, wants_hold: bool, ready: bool,
           max_s: float = HOLD_MAX_S) -> str | None:
    """What to do with one held app now; None: keep holding. `listed`: meshd's Docker view has the
    container (a hold comes from the start event, before the re-list that shows it)."""
    if listed and not running:
        return FORGET
    if listed and (not wants_hold or ready):
        return RELEASE
    if now - since >= max_s:
        return TIMEOUT
    return None


class Holds:
    """The apps meshd paused and has not released yet: container id -> wall time of the pause."""

    def __init__(self, store: Any | None):
        self.store = store
        raw = store.get(STORE_KEY, {}) if store is not None else {}
        self.since: dict[str, float] = {str(k): float(v) for k, v in (raw or {}).items()
                                        if isinstance(v, (int, float))}

    def add(self, container_id: str, now: float) -> None:
        self.since[container_id] = now
        self._save()

    def drop(self, container_id: str) -> None:
        if self.since.pop(container_id, None) is not None:
            self._save()

    def _save(self) -> None:
        if self.store is not None:
            self.store.put(STORE_KEY, dict(self.since))
