"""What is wrong right now with one part of the mesh (a network, a listener, a sidecar), for status.

A rebuild does many independent things (create a sidecar, listen on a bridge, browse mDNS on it); one
that fails must degrade only itself. Each failure is kept here under (kind, subject) until the step
succeeds again, so `meshctl status` lists what is broken and since when, and the event log gets one
event when a problem appears and one when it clears (not one per retry).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass
class Problem:
    """One failing part: what, which one, the last error, since when and how many tries."""

    kind: str        # e.g. control_listen, mdns_browse, sidecar_create, sidecar_remove, docker_list
    subject: str     # the address, container or network it concerns
    message: str
    since: float
    last: float
    attempts: int = 1

    def describe(self) -> dict:
        return {"kind": self.kind, "subject": self.subject, "message": self.message,
                "since": round(self.since, 3), "last": round(self.last, 3), "attempts": self.attempts}


class Problems:
    """The current problems; `on_change(event_kind, problem)` is told of each appearance and clearance."""

    def __init__(self, on_change: Callable[[str, Problem], None] | None = None):
        self.current: dict[tuple[str, str], Problem] = {}
        self.on_change = on_change

    def fail(self, kind: str, subject: str, message: str, now: float) -> Problem:
        """Record a failure of (kind, subject); a new problem is announced, a repeat only counted."""
        key = (kind, subject)
        problem = self.current.get(key)
        if problem is None:
            problem = self.current[key] = Problem(kind, subject, message, since=now, last=now)
            if self.on_change is not None:
                self.on_change("problem", problem)
        else:
            problem.message, problem.last = message, now
            problem.attempts += 1
        return problem

    def ok(self, kind: str, subject: str) -> None:
        """(kind, subject) works (again)."""
        problem = self.current.pop((kind, subject), None)
        if problem is not None and self.on_change is not None:
            self.on_change("problem_cleared", problem)

    def keep_only(self, kind: str, subjects: set[str]) -> None:
        """Forget problems of `kind` whose subject no longer exists (a removed network or container)."""
        for key in [k for k in self.current if k[0] == kind and k[1] not in subjects]:
            del self.current[key]

    def describe(self) -> list[dict]:
        """Every current problem, oldest first."""
        return [p.describe() for p in sorted(self.current.values(), key=lambda p: (p.since, p.kind, p.subject))]
