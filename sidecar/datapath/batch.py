"""Writes held to the end of the event loop's turn while the node is busy (`WriteBatch`), so that a
peer is woken once per turn, not once per request.

Why: under load one turn handles the events of many connections. Written at once, each request or
response wakes its reader (the app, the client, the peer sidecar), which on a busy machine preempts
this process to handle that one message, then sleeps again: two context switches per message. Held
to the end of the turn, the turn's writes leave back to back and each reader finds several messages
when it runs. Idle, one turn carries one write, and holding it only costs a scheduled callback: the
batch then writes at once and holds one write in PROBE_EVERY for a turn, to see whether others join
it (docs/PERFORMANCE.md, decision 16).

Ordering: the bytes held for a transport are written before anything else is done to it. A write
that bypasses the batch (a large body, a tunnel's bytes), a close or a protocol switch calls
`settle` first; an abort drops them, as it drops the transport's own buffer.
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("sidecar.proxy")

# Held mode: this many turns in a row that wrote one transport (or none) go back to writing at once.
DIRECT_AFTER = 4
# Direct mode: every PROBE_EVERY-th write is held for its turn, to see whether the node is busy again.
PROBE_EVERY = 32


class WriteBatch:
    """The node's writes of one event loop, held to the end of the turn while turns carry several
    (`holding`), else written at once. `call_soon`: the loop's (default: the running loop's, bound at
    the first hold)."""

    __slots__ = ("held", "armed", "holding", "countdown", "singles", "call_soon", "_flush", "turns", "writes")

    def __init__(self, call_soon=None):
        self.held: dict = {}      # transport -> bytes to write at the end of this turn (in the order first written)
        self.armed = False        # a flush is scheduled for the end of this turn
        self.holding = False      # busy: every write waits for the end of its turn
        self.countdown = PROBE_EVERY
        self.singles = 0          # turns in a row that wrote one transport, while holding
        self.call_soon = call_soon
        self._flush = self.flush
        self.turns = 0            # flushes so far (for tests and diagnostics)
        self.writes = 0           # transports written by them

    def write(self, transport, data: bytes) -> None:
        """Write `data` to `transport`: now, or at the end of this turn if writes are being held."""
        if not self.armed:
            if not self.holding:
                self.countdown -= 1
                if self.countdown > 0:
                    transport.write(data)
                    return
                self.countdown = PROBE_EVERY
            if not self._arm():
                transport.write(data)
                return
            self.held[transport] = data
            return
        held = self.held.get(transport)
        self.held[transport] = data if held is None else held + data

    def settle(self, transport) -> None:
        """Write what is held for `transport` now (before a write that bypasses the batch, a close, a
        protocol switch)."""
        if self.armed:
            data = self.held.pop(transport, None)
            if data is not None:
                transport.write(data)

    def flush(self) -> None:
        """The end of the turn: write what is held, and choose between holding and writing at once."""
        held = self.held
        self.held = {}
        self.armed = False
        n = len(held)
        for transport, data in held.items():
            try:
                transport.write(data)
            except Exception as exc:   # one transport's failure must not keep the others' bytes
                log.debug("held write to %r failed: %r", transport, exc)
        self.turns += 1
        self.writes += n
        if n > 1:
            self.holding = True
            self.singles = 0
        elif self.holding:
            self.singles += 1
            if self.singles >= DIRECT_AFTER:
                self.holding = False
                self.singles = 0
                self.countdown = PROBE_EVERY

    def _arm(self) -> bool:
        """Schedule the flush at the end of this turn; False when no event loop runs (write at once)."""
        call_soon = self.call_soon
        if call_soon is not None:
            try:
                call_soon(self._flush)
                self.armed = True
                return True
            except RuntimeError:   # that loop is closed (a state that outlived its loop, in tests)
                pass
        try:
            call_soon = asyncio.get_running_loop().call_soon
        except RuntimeError:
            return False
        self.call_soon = call_soon
        call_soon(self._flush)
        self.armed = True
        return True
