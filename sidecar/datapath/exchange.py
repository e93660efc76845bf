"""One request and its response as the data path carries it (`Exchange`), and what the connections
of one listener share (`_Listener`)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from ..guard import DEFAULT_LIMITS, ConnectionGuard   # limits (meshcore.limits)
from ..routing import Cluster
from ..telemetry import NO_FLAGS
from .speedups import monotonic

if TYPE_CHECKING:
    from .layers.base import _Lane
    from .respond import _Responder
    from .upstream import _Upstream


class Exchange:
    """One request and its response. Layers read its parsed fields (`method`, `target`, `host`,
    `dest`, `xff`, `source`; the header fields through http1.HeaderLines(`lines`)), may set `target`
    (origin-form bytes) and add request header fields with `add_field` / `add_fields`: fields, never
    wire lines, so that the protocol's codec writes them. `flags` are the Envoy response flags of
    the request (metrics `response_flags`, access logs)."""

    __slots__ = (
        "down", "start", "method", "target", "lines", "host", "dest", "xff", "added", "source",
        "source_version", "conn_tokens", "head_size", "http10", "keep_alive", "chunked", "body", "expect",
        "is_head", "is_connect", "bad", "head_done", "req_done", "dispatched", "cluster", "index",
        "key", "excluded", "tries_left", "up", "pending", "pending_bytes", "held", "held_bytes",
        "reused", "fresh_retry", "got_body", "status", "flags", "resp_started", "resp_done", "discard",
        "close_after", "dead", "fields", "body_seen", "upgrade", "trailers", "grpc_status", "grpc_timeout",
        # traffic layers
        "traffic", "subset", "mirror", "admitted", "budgeted", "keep_held", "resend", "attempt", "retry_on",
        "in_retry", "timer", "try_timer", "wait", "fault_abort", "lane",
        # tracing
        "tp", "ts", "b3", "trace", "traceparent", "trace_fields", "at", "route",
    )

    def __init__(self, down: _Responder):
        self.down = down
        self.start = monotonic()
        self.method = b""
        self.target = b""
        self.lines: list = []
        self.host: bytes | None = None
        self.dest: tuple[str, int] | None = None   # absolute-form authority (explicit proxy)
        self.xff: bytes | None = None
        self.added: tuple | None = None           # (name, value) fields the layers add (add_field)
        self.source: bytes | None = None
        self.source_version: bytes | None = None
        self.conn_tokens: set | None = None
        self.head_size = 0
        self.http10 = False
        self.keep_alive = True
        self.chunked = False
        self.body = False
        self.expect = False
        self.is_head = False
        self.is_connect = False
        self.bad = False
        self.head_done = False
        self.req_done = False
        self.dispatched = False
        self.cluster: Cluster | None = None
        self.index: int | None = None
        self.key: tuple[str, int] | None = None   # endpoint counted in state.in_flight
        self.excluded: set | None = None
        self.tries_left = 0
        self.up: _Upstream | None = None
        self.pending: list | None = []            # body not yet written upstream; None once attached
        self.pending_bytes = 0
        self.held: list | None = []               # body kept for one retry; None when not retryable
        self.held_bytes = 0
        self.reused = False
        self.fresh_retry = False
        self.got_body = False
        self.status = 0
        self.flags = NO_FLAGS
        self.resp_started = False
        self.resp_done = False
        self.discard = False
        self.close_after = False
        self.dead = False
        self.fields = 0                           # header fields (limits: max_headers)
        self.body_seen = 0                        # body bytes, counted where a limit applies (gateway)
        self.upgrade: bytes | None = None         # Upgrade of a request asking to switch protocols (RFC 9110 7.8)
        self.trailers: list | None = None         # a chunked body's trailer lines (gRPC's over HTTP/1.1)
        self.grpc_status: str | None = None       # the answer's grpc-status: a gRPC call (metrics)
        self.grpc_timeout: bytes | None = None    # the call's grpc-timeout, as sent on (the timeout layer caps it)
        self.traffic = None                       # sidecar.traffic.ServiceTraffic of a mesh destination
        self.lane: _Lane | None = None            # what the traffic layers read of it (_Lane)
        self.subset = None                        # the version subset chosen by the rules layer
        self.mirror = None                        # subset to mirror to, until the copy is sent
        self.admitted = False                     # holds a circuit-breaker request slot
        self.budgeted = False                     # counted in the retry budget's active requests
        self.keep_held = False                    # keep `held` past the first try (retry, mirror)
        self.resend = False                       # a retry: send `held` as the body
        self.attempt = 0                          # retries started (also the try's generation)
        self.retry_on: frozenset | None = None    # statuses worth a retry decision; None: no retries
        self.in_retry = False                     # holds a retry-budget slot
        self.timer: asyncio.TimerHandle | None = None      # whole-request timeout
        self.try_timer: asyncio.TimerHandle | None = None  # per-try timeout
        self.wait: asyncio.TimerHandle | None = None       # fault delay or retry backoff
        self.fault_abort = 0
        self.tp: bytes | None = None              # the request's traceparent
        self.ts: bytes | None = None              # its tracestate (vendor entries, passed on)
        self.b3: dict | None = None               # the request's B3 headers, by lowercase name
        self.trace = None                         # meshcore.tracing.TraceContext of this hop
        self.traceparent: bytes | None = None     # the value of the traceparent that carries it to the next hop
        self.trace_fields: tuple | None = None    # and the other (name, value) fields that do (B3, tracestate)
        self.at = 0                               # the next layer of the chain to run (_proceed)
        self.route = None                         # what the route layer matched, for the layers after it

    def add_field(self, name: bytes, value: bytes) -> None:
        """Add the header field `name: value` to the request sent on (lowercase `name`)."""
        self.add_fields(((name, value),))

    def add_fields(self, fields: tuple) -> None:
        """Add header fields, (name, value) pairs, to the request sent on. A tuple, kept as it is
        when it is the first: a connection's fields (the verified caller's) are made once."""
        self.added = fields if self.added is None else self.added + fields


class _Listener:
    """What the connections of one listener share: the original-destination hook, the sniff timeout,
    its limits (sidecar.guard) and the event loop it was made in (asyncio.get_running_loop() costs a
    getpid() system call, once per connection if each asked)."""

    __slots__ = ("original_dst", "sniff_timeout", "loop", "guard", "max_head", "max_fields", "max_line", "max_body")

    def __init__(self, original_dst, sniff_timeout: float, limits=DEFAULT_LIMITS, gateway: bool = False):
        self.original_dst = original_dst
        self.sniff_timeout = sniff_timeout
        self.guard = ConnectionGuard(limits)         # limits: timeouts and connections
        self.max_head = limits.max_header_bytes      # limits: sizes, read per request
        self.max_fields = limits.max_headers
        self.max_line = limits.max_request_line
        self.max_body = limits.gateway_max_body if gateway else 0
        try:
            self.loop = asyncio.get_running_loop()
        except RuntimeError:   # made outside a loop (tests): each connection asks
            self.loop = None

