"""The data path: an HTTP/1.1 forwarding engine on asyncio Protocols and httptools parsers.

Used by the sidecar's outbound (15001) and inbound (15006) listeners and by the gateway.

Shape of one request (one `Exchange`): `_Downstream` (client side) parses the head, then runs its
`Stack.chain`, a tuple of `Layer` objects, in order (`_Downstream._proceed`); the builders below
(`outbound_chain`, `inbound_chain`; the gateway's in gateway.server) write the order, and
`python -m sidecar.datapath.chain` prints it:

    outbound: trace context -> route by host -> traffic state -> rules + split -> timeout -> fault
              -> circuit breaker -> retries + budget -> mirror -> balance + connect (pool)
    inbound:  trace context -> rate limit -> authorize -> route to the local app -> balance + connect

A layer's on_request goes on (NEXT) or answers / holds the request (HELD; a fault delay resumes the
chain after it); the layers that hold per-request state release it in on_end when the exchange
ends. The last layer picks an endpoint and connects (connect-retry on others:
meshcore.lb.connect_tries; a pooled keep-alive connection or a new one). `_Upstream` (server side)
streams the response back; its head first goes past the retry decision (a retried answer is read
and dropped, not sent).

Bodies are streamed both ways (Content-Length as is, chunked re-encoded from httptools' de-chunked
`on_body`; trailers dropped). Backpressure: a side whose peer transport's write buffer is above its
high-water mark stops reading until `resume_writing`. Hop-by-hop headers (RFC 9110 7.6.1) are
dropped while parsing. Compiled (WHOLE_HEADS), a head that arrives whole in plain syntax, with a
Content-Length body or none, is split in one pass (scan_fields) instead of by httptools' per-header
callbacks; every other message (chunked, Upgrade, CONNECT, 1xx, split across reads...) is httptools'.
Per request the Python work is: the bytes of each field (a name that may have an action is compared
with the few action names of its length and first letter), one join for the head, one dict lookup +
inc/observe for metrics; the trace context object only when a span or log line needs it.

Non-HTTP traffic (services with protocol "tcp", passthrough of unknown destinations, CONNECT) is
plain byte forwarding between two `_Pipe` protocols.
"""

from __future__ import annotations

import asyncio
import logging
from binascii import hexlify
import math
from random import random as _uniform  # not `import random`: ProxyState.random would shadow it (Cython)
from collections import deque
from dataclasses import dataclass
from time import monotonic
from typing import Any, Callable, Collection

from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser, HttpResponseParser

from meshcore.grpc import (
    GRPC_CONTENT_TYPE, cap_grpc_timeout, is_grpc_content_type, is_retriable_grpc_status, local_reply_status, parse_grpc_status,
    percent_encode_message,
)
from meshcore.lb import DEFAULT_MAX_TRIES, connect_tries, merge_exclusions, pick_p2c
from meshcore.resilience import DI, FI, RL, UO, URX, UT, backoff_delay, should_retry
from meshcore.snapshot import Snapshot
from meshcore.telemetry_settings import ACCESS_FULL
from meshcore.tracecontext import B3_MULTI, B3_SINGLE, TRACEPARENT, TRACESTATE, TraceContext

from ..routing import (
    EMPTY_TABLE, PASSTHROUGH, UNKNOWN, Cluster, RouteTable, build_route_table, find_by_address,
    local_cluster, passthrough_cluster, route_outbound, split_host,
)
from .http1 import (
    H_B3, H_CL, H_CONNECTION, H_DROP, H_EXPECT, H_FLAGS, H_HOST, H_SOURCE, H_SOURCE_VERSION, H_TE,
    H_GRPC_STATUS, H_GRPC_TIMEOUT, H_TRACEPARENT, H_TRACESTATE, H_UPGRADE, H_XFF, HEADER_ACTIONS, HOP_BY_HOP, HeaderLines, connection_tokens,
    drop_named,
    read_request_head, read_response_head, status_line,
)
from .speedups import bucket_of, cut, head_end, join, name_table
from .h2bridge import H2_PROTOCOLS, H2AppConnector, H2PeerConnector, is_preface_start, serve_h2
from .peers import (
    ACK_SLACK_MS, DEAD_PEER_S, UNDELIVERED_AFTER_S, PeerProbe, TcpInfo, TcpInfoReader, TlsProvider, check_peer, hop_tls,
    open_upstream, probe_peer, read_tcp_info, reset_connection, stop_probing,
)
from ..dns import VipAllocator
from ..egress import EgressControl, http_egress_blocked, tunnel_egress_blocked   # egress control
from ..guard import DEFAULT_LIMITS, ConnectionGuard, body_over_limit   # limits (meshcore.limits)
from ..mirror import MirrorSender, shadow_host
from ..telemetry import DURATION_BOUNDS, MUTUAL_TLS, NO_FLAGS, NO_TLS, REPORTER_DESTINATION, REPORTER_SOURCE, Telemetry
from ..tracing import Tracing
from ..traffic import (
    LB_LEAST_REQUEST, LB_RING_HASH, ServiceTraffic, TrafficRegistry, balance_subset, choose_mirror_subset,
    choose_subset, fault_of, request_header,
)

log = logging.getLogger("sidecar.proxy")

# glibc serves allocations at or above its mmap threshold (128 KiB at first) with mmap, and raises the
# threshold only to the size of a freed mapping: uvloop's TLS reads (256 KiB buffers, resized to the
# bytes read) would then cost mmap + mremap + munmap on every read, for ever. One freed 1 MiB block
# raises it above them (the dynamic threshold of mallopt(3)); other allocators ignore this.
bytearray(1 << 20)  # allocated and freed at once

SO_ORIGINAL_DST = 80          # linux/netfilter_ipv4.h
CONNECT_TIMEOUT_S = 1.0
POOL_MAX_IDLE = 64            # idle keep-alive connections kept per endpoint
POOL_IDLE_TIMEOUT_S = 60.0
HOLD_LIMIT = 64 * 1024        # request body kept for one retry on a fresh connection
PENDING_LIMIT = 64 * 1024     # request body buffered while connecting; above it reading pauses
# What one re-encoded chunk costs held or pending beyond its data (its size line and the list slots
# and bytes objects of its three parts), counted against HOLD_LIMIT and PENDING_LIMIT: a flood of
# one-byte chunks was otherwise kept ~100 times over (tests/adapters/test_attacks.py, chunk_flood).
CHUNK_COST = 96
MAX_HEAD = 64 * 1024          # compiled: a longer head is httptools', whose callbacks apply the limits
SNIFF_LIMIT = 64 * 1024       # bytes kept while deciding whether an unknown destination speaks HTTP
SNIFF_TIMEOUT_S = 0.3         # no first byte from the client by then: a server-first protocol, pass through
WRITE_HIGH_WATER = 64 * 1024
# Pieces written together up to this size are joined first: uvloop's TLS transport makes each piece of
# writelines() a TLS record of its own (RFC 8446 5.1: at most 2^14 bytes of data per record), which the
# peer then decrypts and reads one at a time; a response head and a small body go as one record.
JOIN_MAX = 16 * 1024
EJECT_S = 10.0                # an endpoint that refused a connect is skipped this long (if others remain)

# Envoy's response flags used here.
FLAG_NO_HEALTHY_UPSTREAM = "UH"
FLAG_CONNECT_FAILURE = "UF"
FLAG_UPSTREAM_RESET = "UC"
FLAG_UPSTREAM_PROTOCOL_ERROR = "UPE"
FLAG_NO_ROUTE = "NR"
FLAG_DOWNSTREAM_PROTOCOL_ERROR = "DPE"
FLAG_DOWNSTREAM_CLOSED = "DC"
FLAG_OVERFLOW = UO                 # circuit breaker
FLAG_RETRY_LIMIT = URX             # retries exhausted, the last answer was retriable
FLAG_RATE_LIMITED = RL
FLAG_FAULT_ABORT = FI
FLAG_FAULT_DELAY = DI
FLAG_UPSTREAM_TIMEOUT = UT
_PEER_UNREACHABLE = (b"UF", b"UH")  # a peer inbound's x-mesh-flags when its app was not reached

MESH_SOURCE = b"x-mesh-source"
MESH_SOURCE_VERSION = b"x-mesh-source-version"

TEXT = b"text/plain; charset=utf-8"
JSON = b"application/json"

# The header actions (sidecar.datapath.http1) are C ints here once compiled (engine.pxd), so that taking
# a header is a C switch and not a chain of object comparisons; the module dict gets them here too, for
# importers (the gateway's table, tests).
globals().update(HEADER_ACTIONS)
_SLASH = 47   # "/", the first byte of an origin-form target (a C int once compiled)

_REQUEST_BASE = {**HOP_BY_HOP, b"content-length": H_CL, b"host": H_HOST, b"expect": H_EXPECT,
                 TRACEPARENT: H_TRACEPARENT, TRACESTATE: H_TRACESTATE, B3_SINGLE: H_B3, b"grpc-timeout": H_GRPC_TIMEOUT,
                 **{name: H_B3 for name in B3_MULTI}}
# Outbound: the app's own x-mesh-source headers are dropped; ours are added on mesh hops.
XFCC = b"x-forwarded-client-cert"   # set by the inbound from the verified peer certificate (Envoy's name)
OUTBOUND_REQUEST_HEADERS = {**_REQUEST_BASE, MESH_SOURCE: H_DROP, MESH_SOURCE_VERSION: H_DROP, XFCC: H_DROP}
INBOUND_REQUEST_HEADERS = {**_REQUEST_BASE, MESH_SOURCE: H_SOURCE, MESH_SOURCE_VERSION: H_SOURCE_VERSION,
                           XFCC: H_DROP}
FLAG_RBAC = "RBAC"   # Envoy's response flag of a request denied by authorization
RESPONSE_HEADERS = {**HOP_BY_HOP, b"content-length": H_CL, b"x-mesh-flags": H_FLAGS, b"grpc-status": H_GRPC_STATUS}



# ---- whole heads (the compiled build) ------------------------------------------------------------
# Compiled, a head that arrives whole and in plain RFC 9112 syntax is split here in one pass, its
# fields handed to the same header actions as httptools' callbacks (which cost more than the rest of
# the head's handling: a Python call, two bytes objects and their concatenation per header). Anything
# else, and every head when this runs as Python (a byte loop in bytecode is slower than httptools), is
# parsed by httptools, which also keeps chunked bodies, Upgrade, CONNECT, 1xx and read-until-close.
try:
    import cython
    COMPILED = cython.compiled
except ImportError:  # Cython absent: this is the Python source
    COMPILED = False
WHOLE_HEADS = COMPILED



_RESPONSE_TABLE = name_table(RESPONSE_HEADERS)


class _Stop(Exception):
    """Raised inside a parser callback to stop parsing the rest of the buffer."""


def _join_flags(have: str, new: str) -> str:
    """Envoy-style response flags: a comma list, each flag once (sorted, as Envoy prints them)."""
    if have == NO_FLAGS or have == new:
        return new
    return ",".join(sorted(set(have.split(",")) | set(new.split(","))))


# Trailer fields not passed on (RFC 9110 6.5.1: framing, routing, connection-specific).
TRAILER_DROP = frozenset((*HOP_BY_HOP, b"content-length", b"host", b"trailer", b"content-type"))


def is_grpc_call(lines: list) -> bool:
    """Whether a request's fields (the flat list) say gRPC: content-type application/grpc[+...]."""
    value = HeaderLines(lines).get(b"content-type")
    return value is not None and is_grpc_content_type(value)


def last_chunk(trailers: list | None) -> bytes:
    """The end of a chunked body, with its trailer lines (name, ": ", value, CRLF pieces) if any."""
    return b"0\r\n\r\n" if trailers is None else join([b"0\r\n", *trailers, b"\r\n"])


def _send(transport: asyncio.Transport, parts: list | tuple) -> None:
    """Write `parts` in order: one write of their join when small (see JOIN_MAX), else writelines."""
    if len(parts) == 1:
        transport.write(parts[0])
        return
    size = 0
    for part in parts:  # not sum(map(len, parts)): a loop of C additions once compiled
        size += len(part)
    if size <= JOIN_MAX:
        transport.write(join(parts, size))
    else:
        transport.writelines(parts)


# ---- trace context ------------------------------------------------------------------------------

_MASK64, _MASK128 = (1 << 64) - 1, (1 << 128) - 1
# 1 for a lowercase hex digit (W3C Trace Context 3.2.2: ids and flags are lowercase hex), else 0
_LOWER_HEX = bytes(1 if c in b"0123456789abcdef" else 0 for c in range(256))
_ODD_HEX = bytes(1 if c in b"13579bdf" else 0 for c in range(256))   # trace-flags bit 0: sampled
_DASH = 0x2D


def _trace_id_ok(tp: bytes, start: int, end: int) -> bool:
    """tp[start:end] is lowercase hex digits, not all zeros (W3C Trace Context 3.2.2.3, 3.2.2.4)."""
    p = tp
    table = _LOWER_HEX
    hexes = table
    zero = True
    i = start
    while i < end:
        c = p[i]
        if not hexes[c]:
            return False
        if c != 0x30:
            zero = False
        i += 1
    return not zero


def canonical_traceparent(tp: bytes) -> bool:
    """`tp` is a version-00 `traceparent` in canonical form, as meshcore.tracing.continue_traceparent
    takes it: `00-`, 32 and 16 lowercase hex digits, `-`, 2 hex digits (W3C Trace Context 3.2.2),
    neither id all zeros."""
    if len(tp) != 55:
        return False
    p = tp
    table = _LOWER_HEX
    hexes = table
    if p[0] != 0x30 or p[1] != 0x30 or p[2] != _DASH or p[35] != _DASH or p[52] != _DASH:
        return False
    if not (hexes[p[53]] and hexes[p[54]]):
        return False
    return _trace_id_ok(tp, 3, 35) and _trace_id_ok(tp, 36, 52)


def begin_trace(tracing: Tracing, tp: bytes | None, b3: dict | None) -> tuple:
    """`tracing.begin_hop(tp, b3)`: (this hop's context, its header lines), its two common cases done
    here, in the compiled data path: no trace headers (a new trace) and a canonical `traceparent`
    without B3 (every mesh hop after the first; compiled only). In those the context is None, made by
    trace_of(tp, header lines) only when asked for: most requests are neither sampled nor logged. The
    same randomness is drawn in the same order and gives the same context and header lines
    (tests/unit/test_begin_trace.py); anything else is begin_hop's."""
    if b3 is not None:
        return tracing.begin_hop(tp, b3)
    if tp is None:   # meshcore.tracing.start_hop with no parent, then encode_trace_headers
        sampled = tracing.rand() < tracing.rate
        bits = tracing.bits
        trace_id = (bits(128) & _MASK128) or 1
        span_id = (bits(64) & _MASK64) or 1
        if not COMPILED:
            return None, b"".join((b"traceparent: 00-", hexlify(trace_id.to_bytes(16, "big")), b"-",
                                   hexlify(span_id.to_bytes(8, "big")), b"-01\r\n" if sampled else b"-00\r\n"))
        # Compiled: the ids written as hex into a copy of the line's template (no bytes per id).
        line = _traceparent_template()
        w = PyBytes_AS_STRING(line)  # noqa: F821 - C API, compiled only
        put_hex64(w + _TRACE_ID_AT, trace_id >> 64)
        put_hex64(w + _TRACE_ID_AT + 16, trace_id & _MASK64)
        put_hex64(w + _SPAN_ID_AT, span_id)
        if sampled:
            w[_SAMPLED_AT] = 0x31
        return None, line
    if not (COMPILED and canonical_traceparent(tp)):
        # As Python, begin_hop's continue_traceparent (bytes methods in C) beats this byte loop 3:1.
        return tracing.begin_hop(tp, b3)
    # meshcore.tracing.continue_traceparent: the caller's trace and sampling decision, a new span
    span_id = (tracing.bits(64) & _MASK64) or 1
    t = tp
    table = _ODD_HEX
    odd = table
    line = _traceparent_template()
    w = PyBytes_AS_STRING(line)  # noqa: F821
    memcpy(w + _TRACE_ID_AT - 3, t, 36)  # noqa: F821 - the caller's `00-` trace-id `-`
    put_hex64(w + _SPAN_ID_AT, span_id)
    if odd[t[54]]:
        w[_SAMPLED_AT] = 0x31
    return None, line


# The traceparent line begin_trace writes (`traceparent: 00-` trace-id `-` span-id `-0` flag CRLF),
# the offsets of its parts, and the lowercase hex digits it writes them with (W3C Trace Context 3.2.2).
_TRACEPARENT_LINE = b"traceparent: 00-" + b"0" * 32 + b"-" + b"0" * 16 + b"-00\r\n"


def _traceparent_template() -> bytes:
    """Compiled only: a new bytes object holding _TRACEPARENT_LINE, for begin_trace to write into."""
    template = _TRACEPARENT_LINE
    src = template
    return PyBytes_FromStringAndSize(src, len(template))  # noqa: F821


# Offsets in the traceparent line begin_trace writes: `traceparent: 00-` trace-id `-` span-id `-0` flag.
_TRACE_ID_AT, _SPAN_ID_AT, _SAMPLED_AT = 16, 49, 67


def trace_of(tp: bytes | None, header: bytes) -> TraceContext:
    """The context begin_trace(tracing, tp, None) returned as None, from the header lines it
    returned with it (which start with this hop's traceparent line)."""
    span_id = int(header[_SPAN_ID_AT:_SPAN_ID_AT + 16], 16)
    sampled = header[_SAMPLED_AT] == 0x31   # b"-01": sampled, b"-00": not
    if tp is None:
        return TraceContext(int(header[_TRACE_ID_AT:_TRACE_ID_AT + 32], 16), span_id, None, sampled)
    ctx = TraceContext(0, span_id, None, sampled)
    ctx._header = tp   # the caller's canonical traceparent: its ids are decoded when read
    return ctx


def count_request(telemetry: Telemetry, reporter: str, source: str, source_version: str, destination: str,
                  version: str, status: int, flags: str, ms: float, grpc_status: str | None = None,
                  security: str = NO_TLS) -> None:
    """telemetry.record_request(reporter, source, source_version, destination, destination, version,
    status, flags, ms, protocol, grpc_status, security): a series already there is counted here,
    compiled; a new one by record_request. A gRPC call (its answer has a grpc-status) is
    request_protocol grpc."""
    series = telemetry.series
    if grpc_status is None:
        s = series.get((reporter, source, source_version, destination, destination, version, "http", status,
                        flags, "", security))
    else:
        s = series.get((reporter, source, source_version, destination, destination, version, "grpc", status,
                        flags, grpc_status, security))
    if s is None:
        telemetry.record_request(reporter, source, source_version, destination, destination, version, status,
                                 flags, ms, "http" if grpc_status is None else "grpc", grpc_status or "", security)
        return
    s.count += 1
    s.sum += ms
    s.buckets[bucket_of(ms)] += 1


def _dec(counts: dict, key: Any) -> None:
    n = counts.get(key, 0) - 1
    if n > 0:
        counts[key] = n
    else:
        counts.pop(key, None)


# ---- state --------------------------------------------------------------------------------------

class UpstreamPools:
    """Idle keep-alive upstream connections, per endpoint key (address, port); newest reused first.

    `live` registers every open HTTP upstream connection per key (idle or carrying an exchange;
    added when connected, removed when lost: no work per request), so that the exchanges in flight
    to an endpoint a snapshot removes can be found (`ProxyState.apply_snapshot`).
    """

    def __init__(self, max_idle: int = POOL_MAX_IDLE, idle_timeout: float = POOL_IDLE_TIMEOUT_S):
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.idle: dict[tuple[str, int], list[_Upstream]] = {}
        self.live: dict[tuple[str, int], set[_Upstream]] = {}
        self.count = 0      # idle connections now
        self.opened = 0     # upstream connections ever opened (HTTP)
        self._timer: asyncio.TimerHandle | None = None

    def acquire(self, key: tuple[str, int]) -> _Upstream | None:
        lst = self.idle.get(key)
        if not lst:
            return None
        now = monotonic()
        while lst:
            up = lst.pop()
            self.count -= 1
            up.pooled = False
            if up.closed or now - up.idle_since > self.idle_timeout:
                up.close()
                continue
            return up
        return None

    def release(self, up: _Upstream) -> None:
        if up.closed or up.doomed or up.transport.is_closing():
            up.close()
            return
        if up.read_paused:
            up.read_paused = False
            up.transport.resume_reading()
        lst = self.idle.get(up.key)
        if lst is None:
            lst = self.idle[up.key] = []
        if len(lst) >= self.max_idle:
            up.close()
            return
        up.idle_since = monotonic()
        up.pooled = True
        lst.append(up)
        self.count += 1
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._sweep_every(), self._sweep)

    def register(self, up: _Upstream) -> None:
        conns = self.live.get(up.key)
        if conns is None:
            conns = self.live[up.key] = set()
        conns.add(up)

    def unregister(self, up: _Upstream) -> None:
        conns = self.live.get(up.key)
        if conns is not None:
            conns.discard(up)
            if not conns:
                del self.live[up.key]

    def discard(self, up: _Upstream) -> None:
        if up.pooled:
            up.pooled = False
            lst = self.idle.get(up.key)
            if lst is not None and up in lst:
                lst.remove(up)
                self.count -= 1

    def _sweep_every(self) -> float:
        return max(0.05, min(15.0, self.idle_timeout / 2))

    def _sweep(self) -> None:
        self._timer = None
        limit = monotonic() - self.idle_timeout
        for key, lst in list(self.idle.items()):
            keep = [up for up in lst if not up.closed and up.idle_since >= limit]
            for up in lst:
                if up.closed or up.idle_since < limit:
                    up.pooled = False
                    up.close()
            self.count -= len(lst) - len(keep)
            if keep:
                self.idle[key] = keep
            else:
                del self.idle[key]
        if self.count:
            self._timer = asyncio.get_running_loop().call_later(self._sweep_every(), self._sweep)

    def drop(self, gone: set) -> None:
        """Close idle connections to endpoints that left the mesh: a peer whose network namespace
        vanished sends no FIN, so its pooled connections would swallow requests silently."""
        for key in [k for k in self.idle if k in gone]:
            for up in self.idle.pop(key):
                up.pooled = False
                up.close()
                self.count -= 1

    def close(self) -> None:
        """Close every idle connection (in-use ones close when their exchange ends)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for lst in self.idle.values():
            for up in lst:
                up.pooled = False
                up.close()
        self.idle.clear()
        self.count = 0


def _mesh_keys(table: RouteTable) -> set:
    return {key for cluster in table.clusters.values() for key in cluster.keys}


class ProxyState:
    """What every listener of one node shares; `table` may be replaced at any time (atomic swap).

    Dead peers. A peer whose network namespace vanished sends no FIN or RST; requests written to it
    get no answer. Two detectors, for mesh exchanges (those with traffic state) that have no
    response byte yet:
    - a snapshot removes the endpoint: every exchange in flight to it is checked once its request
      is `undelivered_after` old; every connection to it is closed when its exchange ends.
    - meshd is silent (no snapshot): a request written on a reused pooled connection is checked once
      it is `dead_peer_after` old (a sweep every quarter of that, only while such requests wait).
    The check reads TCP_INFO (`tcp_info`): data unacknowledged and no ACK at all since the request
    was written, that long, means the request never reached the peer's application: the connection
    is reset (RST, nothing retransmitted) and the request retried on another endpoint like a connect
    failure (`should_retry` with connect-failure, not sent: any method; budget and attempts
    counted). Otherwise the request was delivered (or TCP_INFO is unreadable): it is left to finish,
    and `probe` makes the kernel probe the peer (keepalive); a peer that stops answering probes ends
    the connection with ETIMEDOUT after ~3 s: 503 UC, or retried when the policy retries a reset of
    a sent request (idempotent with reset in mesh.retries.on, or non-idempotent allowed). A slow but
    alive app is never cut: its kernel acknowledges the request and answers the probes.
    """

    def __init__(self, service: str, version: str = "v1", *, table: RouteTable | None = None,
                 telemetry: Telemetry | None = None, tls: TlsProvider | None = None,
                 connect_timeout: float = CONNECT_TIMEOUT_S, pool_max_idle: int = POOL_MAX_IDLE,
                 pool_idle_timeout: float = POOL_IDLE_TIMEOUT_S, eject_seconds: float = EJECT_S,
                 rand: Callable[[], float] = _uniform, tcp_info: TcpInfoReader = read_tcp_info,
                 probe: PeerProbe = probe_peer, undelivered_after: float = UNDELIVERED_AFTER_S,
                 dead_peer_after: float = DEAD_PEER_S):
        self.service = service
        self.version = version
        self.namespace: str | None = None   # the node's project: bare names resolve there first
        self.table: RouteTable = table if table is not None else EMPTY_TABLE
        self.host_index: dict = {}          # route_by_host: host_index(host_index_of)
        self.host_index_of: RouteTable | None = None
        self.telemetry = telemetry if telemetry is not None else Telemetry()
        self.tls = tls
        self.authz = None   # sidecar.mtls.Authorizer: the inbound's authorization decision, or None
        self.connect_timeout = connect_timeout
        self.random = rand
        self.in_flight: dict[tuple[str, int], int] = {}   # endpoint key -> requests/connections in flight
        self.pools = UpstreamPools(pool_max_idle, pool_idle_timeout)
        self.connect_failures = 0
        self.eject_seconds = eject_seconds
        self.ejected: dict[tuple[str, int], float] = {}   # endpoint key -> monotonic time it returns
        self.traffic = TrafficRegistry()    # per destination service: policy, rules, breaker, outlier...
        self.lanes: dict = {}               # service name -> _Lane of its traffic state (the Traffic layer)
        self.vips = VipAllocator()          # service virtual IPs, answered by the DNS proxy (sidecar.dns)
        self.mirrors = MirrorSender(self._mirror_connect, self._mirror_result)
        self.tracing = Tracing(service, version, registry=self.telemetry.registry)  # spans, access logs
        self.tcp_info = tcp_info                  # dead peers (see the class docstring)
        self.probe = probe
        self.undelivered_after = undelivered_after
        self.dead_peer_after = dead_peer_after
        self.undelivered_total = 0                # requests found undelivered to a silent peer (retried)
        self.probed_total = 0                     # delivered requests whose peer the kernel was set to probe
        self._watched: set[_Upstream] = set()     # reused connections whose request waits for an answer
        self._watchdog: asyncio.TimerHandle | None = None
        self.inbound_limiter = None         # mesh.ratelimit of this node's own service (limit_inbound)
        self.egress = EgressControl(service, self.telemetry.registry)   # egress control (sidecar.egress)
        self.limits = DEFAULT_LIMITS        # meshcore.limits of the listeners started after it is set
        if table is not None:
            self.traffic.apply(table)
            self._sync_local()
        pools = self.pools
        self.telemetry.watch_pool(lambda: pools.count)

    def apply_snapshot(self, snapshot: Snapshot) -> RouteTable:
        """Build the route table of a snapshot and swap it in; returns it."""
        table = build_route_table(snapshot, self.vips.assign(snapshot.config.services),
                                  (self.service, self.namespace) if self.namespace else None)
        self.tracing.configure(snapshot.config.telemetry)
        self.egress.update(snapshot.config)   # egress control (sidecar.egress)
        old, self.table = self.table, table
        self.traffic.apply(table)
        self._sync_local()
        pools = self.pools
        if pools.idle or pools.live:
            gone = _mesh_keys(old) - _mesh_keys(table)
            if gone:
                if pools.idle:
                    pools.drop(gone)
                if pools.live:
                    self._gone_in_flight(gone)
        if self.ejected:
            now = monotonic()
            self.ejected = {k: t for k, t in self.ejected.items() if t > now}
        return table

    # -- dead peers (see the class docstring)

    def _gone_in_flight(self, gone: set) -> None:
        """Connections to endpoints that left the mesh: closed once their exchange ends; the kernel
        probes the peer of each one in flight; those without a response byte are checked for an
        undelivered request once it is `undelivered_after` old."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        now = monotonic()
        for key in gone:
            conns = self.pools.live.get(key)
            if not conns:
                continue
            for up in list(conns):
                up.doomed = True
                ex = up.exchange
                if ex is None or up.closed:
                    continue  # idle: closed by drop, or when released
                if not up.probing:
                    up.probing = True
                    if self.probe(up.transport):
                        self.probed_total += 1
                if up.got_bytes or ex.traffic is None or loop is None:
                    continue
                sent = up.sent_at or up.connected_at
                loop.call_later(max(0.0, sent + self.undelivered_after - now), self._check_gone, up, ex)

    def _check_gone(self, up: _Upstream, ex: Exchange) -> None:
        if up.exchange is not ex or up.got_bytes or up.closed:
            return
        info = self.tcp_info(up.transport)
        if info is not None and self._silent(info, up, monotonic()):
            log.info("withdrawn endpoint %s:%s never acknowledged a request: retried elsewhere", *up.key)
            ex.down._undelivered(ex, up)

    def _silent(self, info: TcpInfo, up: _Upstream, now: float) -> bool:
        """Data unacknowledged, and no ACK at all since the request was written: the peer's kernel
        has not received the (whole) request, so its application has not read it."""
        if info.unacked == 0:
            return False
        age_ms = (now - (up.sent_at or up.connected_at)) * 1000.0
        return info.last_ack_recv_ms + ACK_SLACK_MS >= age_ms

    def watch(self, up: _Upstream) -> None:
        """A request was just written on a reused pooled connection (of a mesh exchange)."""
        up.sent_at = monotonic()
        self._watched.add(up)
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().call_later(self._watch_every(), self._watch_sweep)

    def _watch_every(self) -> float:
        return max(0.01, min(0.25, self.dead_peer_after / 4))

    def _watch_sweep(self) -> None:
        self._watchdog = None
        now = monotonic()
        limit = self.dead_peer_after
        watched = self._watched
        for up in list(watched):
            ex = up.exchange
            if ex is None or up.got_bytes or up.closed or not up.sent_at or up.doomed:
                watched.discard(up)  # answered, finished, lost, or its endpoint left (_gone_in_flight)
                continue
            if now - up.sent_at < limit:
                continue
            watched.discard(up)
            info = self.tcp_info(up.transport)
            if info is not None and self._silent(info, up, now):
                key = up.key
                log.warning("dead peer %s:%s: request unacknowledged for %.1f s, retried elsewhere",
                            key[0], key[1], now - up.sent_at)
                if self.eject_seconds > 0:
                    self.ejected[key] = now + self.eject_seconds  # skipped by the balancer meanwhile
                self.pools.drop({key})                             # its idle connections are dead too
                ex.down._undelivered(ex, up)
            else:
                # Delivered (a slow app), acknowledged in part, or unknown: let the kernel probe the peer.
                if not up.probing:
                    up.probing = True
                    if self.probe(up.transport):
                        self.probed_total += 1
        if watched:
            self._watchdog = asyncio.get_running_loop().call_later(self._watch_every(), self._watch_sweep)

    def connect_failed(self, key: tuple[str, int]) -> None:
        """Passive outlier detection: skip an endpoint that failed a connect for `eject_seconds`."""
        self.connect_failures += 1
        if self.eject_seconds > 0:
            self.ejected[key] = monotonic() + self.eject_seconds

    def connect_succeeded(self, key: tuple[str, int]) -> None:
        if self.ejected:
            self.ejected.pop(key, None)

    def _sync_local(self) -> None:
        tr = self.local_traffic()
        self.inbound_limiter = tr.limiter if tr is not None else None

    def local_traffic(self):
        """The traffic state of this node's own service (its inbound policy), or None."""
        cluster = self.table.clusters.get(self.table.own or self.service)
        return self.traffic.of(cluster) if cluster is not None else None

    def _mirror_connect(self, key: tuple[str, int], factory: Callable, tag: tuple) -> Any:
        return open_upstream(self, tag[0], tag[1], key, factory)

    def _mirror_result(self, tag: tuple, status: int) -> None:
        cluster, index, source = tag
        self.telemetry.record_mirror(source, cluster.name, cluster.endpoints[index].version, status)

    def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self._watched.clear()
        self.pools.close()
        self.mirrors.close()
        self.tracing.close()


# ---- a destination's traffic state, as the layers read it ------------------------------------------

class _Lane:
    """What the traffic layers read per request of a destination's sidecar.traffic.ServiceTraffic,
    copied into one object (compiled: C fields, no attribute lookups on the ServiceTraffic) while
    that ServiceTraffic follows `cluster`: every change to these fields comes with a new cluster
    (ServiceTraffic.sync). The breaker, budget and outlier detector are the ServiceTraffic's own."""

    __slots__ = ("tr", "cluster", "rules", "all", "timeout", "fault", "mirror", "retry_on", "per_try_timeout",
                 "breaker", "budget", "outlier")

    def __init__(self, tr: ServiceTraffic):
        self.tr = tr
        self.cluster = tr.cluster
        self.rules = tr.rules
        self.all = tr.all
        self.timeout = tr.timeout
        self.fault = tr.fault
        self.mirror = tr.mirror
        self.retry_on = tr.retry_on
        self.per_try_timeout = tr.per_try_timeout
        self.breaker = tr.breaker
        self.budget = tr.budget
        self.outlier = tr.outlier


# ---- the layer chain ----------------------------------------------------------------------------
# A listener's request path is a tuple of Layer objects, run in order by _Downstream._proceed: each
# one's on_request says NEXT (the next layer runs) or HELD (it answered the request, or it holds it
# until a timer of its own resumes the chain at the layer after it). The last layer balances and
# connects. At the end of an exchange the layers that keep per-request state (`ends`) get on_end.
# Compiled (engine.pxd), the layers are extension types and the chain's calls are C calls.

NEXT = 0   # C ints once compiled (engine.pxd); the module dict gets them too, for layers outside (gateway)
HELD = 1
globals().update(NEXT=NEXT, HELD=HELD)


@dataclass(frozen=True, slots=True)
class Reply:
    """A layer's decision to answer locally (e.g. the gateway's 404)."""

    status: int
    flags: str
    body: bytes = b""
    content_type: bytes = TEXT
    headers: bytes = b""      # extra response header lines, CRLF-ended (e.g. x-mesh-denied, retry-after)


RouteFn = Callable[["_Downstream", "Exchange"], "Cluster | Reply"]


class Layer:
    """One concern of the request path: on_request in chain order, on_end once per exchange when `ends`."""

    __slots__ = ("name", "ends")

    def __init__(self, name: str, ends: bool = False):
        self.name = name
        self.ends = ends

    def on_request(self, down: _Downstream, ex: Exchange) -> int:
        """NEXT to go on, HELD once this layer answered or holds the request."""
        return NEXT

    def on_end(self, down: _Downstream, ex: Exchange) -> None:
        """The exchange is over: release what on_request took."""

    def __repr__(self) -> str:
        return self.name


class StartTrace(Layer):
    """trace context: this hop's trace (begin_trace) and the headers that carry it to the next hop."""

    def __init__(self):
        Layer.__init__(self, "trace context")

    def on_request(self, down: _Downstream, ex: Exchange) -> int:
        ex.trace, ex.trace_headers = begin_trace(down.state.tracing, ex.tp, ex.b3)
        trace = ex.trace
        # No context made (begin_trace): a child exactly when the request had a traceparent.
        if ex.ts is not None and (ex.tp is not None if trace is None else trace.is_child):
            # tracestate belongs to the caller's trace: dropped when a new one starts (W3C 3.3.1).
            ex.trace_headers += b"tracestate: %b\r\n" % ex.ts
        return NEXT


class RateLimit(Layer):
    """rate limit (inbound): the local service's token bucket (limit_inbound), 429 RL."""

    def __init__(self):
        Layer.__init__(self, "rate limit")

    def on_request(self, down: _Downstream, ex: Exchange) -> int:
        limited = limit_inbound(down, ex)
        if limited is None:
            return NEXT
        down._answer(ex, limited)
        return HELD


class Authorize(Layer):
    """authorize (inbound): `state.authz` on the verified caller, 403 RBAC; the app gets the XFCC header."""

    def __init__(self):
        Layer.__init__(self, "authorize")

    def on_request(self, down: _Downstream, ex: Exchange) -> int:
        try:
            denied = authorized(down, ex)
        except Exception:  # noqa: BLE001
            log.exception("authorize layer failed")
            down._reply(ex, 500, FLAG_NO_ROUTE, b"route error\n")
            return HELD
        if denied is None:
            return NEXT
        down._answer(ex, denied)
        return HELD


class Route(Layer):
    """route: the request's cluster from `fn(down, ex) -> Cluster | Reply` (a Reply is answered)."""

    __slots__ = ("fn",)

    def __init__(self, fn: RouteFn, name: str = "route"):
        Layer.__init__(self, name)
        self.fn = fn

    def on_request(self, down: _Downstream, ex: Exchange) -> int:
        try:
            target = self.fn(down, ex)
        except Exception:  # noqa: BLE001
            log.exception("route layer failed")
            down._reply(ex, 500, FLAG_NO_ROUTE, b"route error\n")
            return HELD
        return down._routed(ex, target)


class RouteByHost(Route):
    """route (outbound): route_by_host, called directly (a C call compiled)."""

    def __init__(self):
        Route.__init__(self, route_by_host, "route by host")

    def on_request(self, down: _Downstream, ex: Exchange) -> int:
        try:
            target = route_by_host(down, ex)
        except Exception:  # noqa: BLE001
            log.exception("route layer failed")
            down._reply(ex, 500, FLAG_NO_ROUTE, b"route error\n")
            return HELD
        return down._routed(ex, target)


class RouteTo(Route):
    """route (inbound): always `cluster`, the local app."""

    __slots__ = ("cluster",)

    def __init__(self, cluster: Cluster):
        Route.__init__(self, None, "route to the local app")
        self.cluster = cluster

    def on_request(self, down: _Downstream, ex: Exchange) -> int:
        return down._routed(ex, self.cluster)


class Traffic(Layer):
    """traffic state: a mesh destination's sidecar.traffic state (its _Lane), read by the layers after it."""

    def __init__(self):
        Layer.__init__(self, "traffic state")

    def on_request(self, down: _Downstream, ex: Exchange) -> int:
        cluster = ex.cluster
        if not cluster.mesh:
            return NEXT
        state = down.state
        lanes = state.lanes
        lane = lanes.get(cluster.name)
        if lane is None or lane.cluster is not cluster or lane.tr.cluster is not cluster:
            # first request after a snapshot swap: sync (state.traffic.of), then copy
            lane = lanes[cluster.name] = _Lane(state.traffic.of(cluster))
        ex.traffic = lane.tr
        ex.lane = lane
        sub = lane.all
        ex.subset = sub
        ex.cluster = sub.cluster
        return NEXT


class Rules(Layer):
    """rules and split: a version's endpoints (`choose(ex, traffic, rand)`); none: 503 UH."""

    __slots__ = ("choose",)

    def __init__(self, choose: Callable):
        Layer.__init__(self, "rules + split")
        self.choose = choose

    def on_request(self, down: _Downstream, ex: Exchange) -> int:
        lane = ex.lane
        if lane is None or lane.rules is None:
            return NEXT
        sub = self.choose(ex, lane.tr, down.state.random())
        if sub is None:
            down._reply(ex, 503, FLAG_NO_HEALTHY_UPSTREAM, b"no healthy upstream for the version\n")
            return HELD
        ex.subset = sub
        ex.cluster = sub.cluster
        return NEXT


class Timeout(Layer):
    """timeout: the whole request's (a fault delay, backoffs and every try), 504 UT."""

    def __init__(self):
        Layer.__init__(self, "timeout", True)

    def on_request(self, down: _Downstream, ex: Exchange) -> int:
        lane = ex.lane
        timeout = lane.timeout if lane is not None else None
        if ex.grpc_timeout is not None:
            # gRPC's own deadline is honoured, the mesh's timeout its cap; the next hop is told the
            # smaller one (gRPC over HTTP/2: grpc-timeout).
            timeout, sent_on = cap_grpc_timeout(timeout, ex.grpc_timeout)
            ex.grpc_timeout = sent_on.encode("latin-1") if sent_on is not None else None
        if timeout is not None:
            ex.timer = down.loop.call_later(timeout, down._timed_out, ex)
        return NEXT

    def on_end(self, down: _Downstream, ex: Exchange) -> None:
        if ex.timer is not None:
            ex.timer.cancel()
            ex.timer = None


class Fault(Layer):
    """fault: delay (DI) first, then abort (FI), Envoy's order (`fault(traffic, rand, rand)`)."""

    __slots__ = ("fault",)

    def __init__(self, fault: Callable):
        Layer.__init__(self, "fault", True)
        self.fault = fault

    def on_request(self, down: _Downstream, ex: Exchange) -> int:
        lane = ex.lane
        if lane is None or lane.fault is None:
            return NEXT
        rand = down.state.random
        abort, delay = self.fault(lane.tr, rand(), rand())
        if delay > 0:
            ex.flags = _join_flags(ex.flags, FLAG_FAULT_DELAY)
            ex.fault_abort = abort or 0
            ex.wait = down.loop.call_later(delay, down._fault_delayed, ex)
            return HELD
        if abort is not None:
            down._reply(ex, abort, FLAG_FAULT_ABORT, b"fault filter abort\n")
            return HELD
        return NEXT

    def on_end(self, down: _Downstream, ex: Exchange) -> None:
        if ex.wait is not None:
            ex.wait.cancel()
            ex.wait = None


class Breaker(Layer):
    """circuit breaker: a request slot of the service's breaker, overflow 503 UO (also guards connects)."""

    def __init__(self):
        Layer.__init__(self, "circuit breaker", True)

    def on_request(self, down: _Downstream, ex: Exchange) -> int:
        lane = ex.lane
        if lane is None:
            return NEXT
        if not lane.breaker.try_acquire_request():
            down._reply(ex, 503, FLAG_OVERFLOW, b"upstream overflow\n")
            return HELD
        ex.admitted = True
        return NEXT

    def on_end(self, down: _Downstream, ex: Exchange) -> None:
        if ex.admitted:
            ex.admitted = False
            ex.lane.breaker.release_request()


class Retries(Layer):
    """retries: the budget counts the request; the body is held (HOLD_LIMIT) for a retry by the
    response head's decision (_Downstream._response_head: backoff, budget, per-try timeout, URX)."""

    def __init__(self):
        Layer.__init__(self, "retries + budget", True)

    def on_request(self, down: _Downstream, ex: Exchange) -> int:
        lane = ex.lane
        if lane is None:
            return NEXT
        lane.budget.start_request()
        ex.budgeted = True
        if lane.retry_on is not None:
            ex.retry_on = lane.retry_on
            ex.keep_held = True
        return NEXT

    def on_end(self, down: _Downstream, ex: Exchange) -> None:
        if ex.budgeted:
            ex.budgeted = False
            ex.lane.budget.finish_request()
        if ex.in_retry:
            ex.in_retry = False
            ex.lane.budget.finish_retry()
        if ex.try_timer is not None:
            ex.try_timer.cancel()
            ex.try_timer = None
        if ex.wait is not None:
            ex.wait.cancel()
            ex.wait = None


class Mirror(Layer):
    """mirror: a fire-and-forget copy to `choose(traffic, rand)`'s subset, sent once the request is whole."""

    __slots__ = ("choose",)

    def __init__(self, choose: Callable):
        Layer.__init__(self, "mirror")
        self.choose = choose

    def on_request(self, down: _Downstream, ex: Exchange) -> int:
        lane = ex.lane
        if lane is None or lane.mirror is None or ex.upgrade is not None:
            return NEXT   # an upgrade (a WebSocket) is a conversation, not a request to copy
        mirror = self.choose(ex.traffic, down.state.random())
        if mirror is not None:
            ex.mirror = mirror
            ex.keep_held = True
            if ex.req_done:
                down._send_mirror(ex)
        return NEXT


class Balance(Layer):
    """balance + connect, the chain's last layer: an endpoint (`pick`), tried up to `max_tries`
    connects on other endpoints (meshcore.lb.connect_tries), over a pooled or new connection."""

    __slots__ = ("max_tries", "outlier")

    def __init__(self, name: str, max_tries: int, outlier: bool):
        Layer.__init__(self, name)
        self.max_tries = max_tries
        self.outlier = outlier   # every try's outcome goes to the service's OutlierDetector

    def on_request(self, down: _Downstream, ex: Exchange) -> int:
        ex.tries_left = connect_tries(len(ex.cluster.endpoints), self.max_tries)
        down._pick(ex)
        return HELD

    def pick(self, state: ProxyState, cluster: Cluster, exclude: Collection[int], ex: Any = None) -> int | None:
        """The endpoint index for the next try, or None."""
        return balance_least_request(state, cluster, exclude, ex)


class LeastRequest(Balance):
    """balance: least-request P2C (balance_least_request)."""

    def __init__(self, max_tries: int = 1):
        Balance.__init__(self, "balance (least request) + connect", max_tries, False)


class TrafficBalance(Balance):
    """balance: the service's LB choice over the version subset (balance_traffic), outcomes to outlier detection."""

    def __init__(self, max_tries: int = DEFAULT_MAX_TRIES):
        Balance.__init__(self, "balance (mesh.lb, outliers) + connect", max_tries, True)

    def pick(self, state: ProxyState, cluster: Cluster, exclude: Collection[int], ex: Any = None) -> int | None:
        return balance_traffic(state, cluster, exclude, ex)


class Stack:
    """One listener's request path: its chain of layers (run in order) and what the exchange needs
    besides (header actions, mesh headers, pool, gauge); built once per listener (keyword arguments).

    A plain class, not a dataclass: compiled (engine.pxd), its fields are read-only C struct members,
    read several times per request."""

    __slots__ = ("direction", "reporter", "source_name", "chain", "enders", "request_headers", "header_table",
                 "mesh_headers", "balance", "max_tries", "connect_timeout", "pool", "gauge", "breaker", "outlier",
                 "h2", "connect", "connect_h2")

    def __init__(self, *, direction: str, reporter: str, source_name: str, chain: tuple,
                 request_headers: dict, mesh_headers: bytes, connect_timeout: float, pool: UpstreamPools,
                 gauge: Any, h2: Any = None, connect: Any = None, connect_h2: Any = None):
        self.direction = direction              # "outbound" | "inbound" | "gateway" (connection gauge label)
        self.reporter = reporter                # metrics reporter
        self.source_name = source_name          # x-mesh-source we send, and source_workload we report
        self.chain = tuple(chain)               # the layers, in the order they run
        last = self.chain[-1]
        if not isinstance(last, Balance) or any(isinstance(layer, Balance) for layer in self.chain[:-1]):
            raise ValueError("a chain ends with its one balance layer")
        self.enders = tuple(layer for layer in self.chain if layer.ends)
        self.balance = last
        self.max_tries = last.max_tries
        self.outlier = last.outlier
        self.breaker = any(isinstance(layer, Breaker) for layer in self.chain)   # connects take its slots too
        self.request_headers = request_headers  # header actions while parsing (hop-by-hop etc.)
        self.header_table = name_table(request_headers)
        self.mesh_headers = mesh_headers        # headers added on mesh hops
        self.connect_timeout = connect_timeout
        self.pool = pool                        # keep-alive connections
        self.gauge = gauge                      # connections-active gauge child
        self.h2 = h2                            # h2(down, first bytes): serves a connection opened with the
                                                # HTTP/2 preface (h2bridge.serve_h2), or None
        self.connect = connect                  # connect(loop, factory, host, port, ssl, server_hostname,
                                                # verify) to every endpoint (h2bridge.H2AppConnector), None:
                                                # a TCP connection (TLS on mesh hops)
        self.connect_h2 = connect_h2            # the same, for the mesh hops to HTTP/2 services
                                                # (h2bridge.H2PeerConnector), None: HTTP/1.1 to them too


def route_by_host(down: _Downstream, ex: Exchange) -> Cluster | Reply:
    """Outbound route: by Host header, else the original destination; unknown -> passthrough."""
    state = down.state
    table = state.table
    host = ex.host
    if host:
        if state.host_index_of is not table:   # the first request after a table swap
            state.host_index = host_index(table)
            state.host_index_of = table
        hit = state.host_index.get(host)   # route_outbound's first case, a service's exact name, inlined
        if hit is not None:
            return hit
    cluster = route_outbound(table, host.decode("latin-1") if host is not None else None, ex.dest or down.orig_dst)
    return cluster if cluster is not None else _NO_ROUTE


def host_index(table: RouteTable) -> dict:
    """`table.hosts` keyed by the bytes of a Host header naming them (latin-1, as route_by_host
    decodes one): the header is looked up as it came. A name with no such bytes is left out."""
    out = {}
    for name, cluster in table.hosts.items():
        try:
            out[name.encode("latin-1")] = cluster
        except UnicodeEncodeError:
            continue   # no Host header decodes to it
    return out


_NO_ROUTE = Reply(404, FLAG_NO_ROUTE, b"no route to the destination\n")


def limit_inbound(down: _Downstream, ex: Exchange) -> Reply | None:
    """Inbound rate limit (`mesh.ratelimit` of the local service): 429, `retry-after`, flag RL."""
    limiter = down.state.inbound_limiter
    if limiter is None:
        return None
    ok, after = limiter.check(caller_of(down, ex) if limiter.per_caller else "", monotonic())
    if ok:
        return None
    seconds = max(1, math.ceil(after)) if after != math.inf else 3600
    return Reply(429, FLAG_RATE_LIMITED, b"rate limited\n", headers=b"retry-after: %d\r\n" % seconds)


def balance_least_request(state: ProxyState, cluster: Cluster, exclude: Collection[int],
                          _ex: Any = None) -> int | None:
    """P2C least-request over the endpoints' in-flight counts (meshcore.lb.pick_p2c), skipping
    endpoints ejected after a connect failure while others remain (meshcore.lb.merge_exclusions)."""
    keys = cluster.keys
    if len(keys) == 1:
        return None if exclude else 0
    ejected = state.ejected
    if ejected:
        now = monotonic()
        out = [i for i, k in enumerate(keys) if ejected.get(k, 0.0) > now]
        exclude = merge_exclusions(exclude, out, len(keys))
    counts = state.in_flight
    rand = state.random
    return pick_p2c([counts.get(k, 0) for k in keys], rand(), rand(), exclude)


def balance_traffic(state: ProxyState, cluster: Cluster, exclude: Collection[int],
                    ex: Exchange | None = None) -> int | None:
    """The service's LB choice (`mesh.lb`: least-request P2C, round-robin, random, ring-hash on
    `mesh.lb.hash-header`) over the exchange's version subset, skipping ejected endpoints
    (sidecar.traffic.balance_subset); least-request for anything without traffic state."""
    sub = ex.subset if ex is not None else None
    if sub is None:
        return balance_least_request(state, cluster, exclude)
    tr = sub.traffic
    lb = tr.lb
    if lb == LB_LEAST_REQUEST and not state.ejected and not tr.outlier.ejections_total:
        # Nothing was ever ejected (the usual case): balance_subset's pick is then balance_least_request's
        # over the subset, a C call instead of one into interpreted code.
        return balance_least_request(state, sub.cluster, exclude)
    hv = request_header(ex, tr.hash_header) if lb == LB_RING_HASH and tr.hash_header else None
    return balance_subset(state, sub, exclude, hv)


def mesh_source_headers(source: str, version: str) -> bytes:
    return b"x-mesh-source: %s\r\nx-mesh-source-version: %s\r\n" % (source.encode(), version.encode())


def outbound_chain(route: Layer | None = None, after_route: tuple = ()) -> tuple:
    """The outbound layers in the order they run (the gateway passes its route and its JWT check)."""
    return (
        StartTrace(),                      # trace context: this hop's ids, headers for the next hop
        route or RouteByHost(),            # route: the service (cluster), unknown -> passthrough
        *after_route,
        Traffic(),                         # mesh services: their sidecar.traffic state
        Rules(choose_subset),              # rules + split: a version's endpoints (none: 503 UH)
        Timeout(),                         # whole-request timeout (504 UT), from here on
        Fault(fault_of),                   # fault: delay (DI), abort (FI)
        Breaker(),                         # circuit breaker: overflow -> 503 UO
        Retries(),                         # retries: budget, held body (the decision: response head)
        Mirror(choose_mirror_subset),      # mirror: fire-and-forget copy, once the request is whole
        TrafficBalance(DEFAULT_MAX_TRIES),  # balance (LB choice, ejected skipped) + connect-retry + pool
    )


def inbound_chain(cluster: Cluster) -> tuple:
    """The inbound layers in the order they run: everything goes to the local app."""
    return (
        StartTrace(),                      # trace context
        RateLimit(),                       # rate limit: 429 RL
        Authorize(),                       # authorize: 403 RBAC; XFCC for the app
        RouteTo(cluster),                  # route: the local app
        LeastRequest(1),                   # balance + one connect + pool
    )


def build_outbound_stack(state: ProxyState, *, route: Layer | None = None, after_route: tuple = (),
                         source: str | None = None, direction: str = "outbound",
                         request_headers: dict = OUTBOUND_REQUEST_HEADERS) -> Stack:
    """The outbound request path (outbound_chain; the gateway passes its own route layers)."""
    source = source or state.service
    return Stack(
        direction=direction, reporter=REPORTER_SOURCE, source_name=source,
        chain=outbound_chain(route, after_route),
        request_headers=request_headers,                        # drop hop-by-hop and the app's
        mesh_headers=mesh_source_headers(source, state.version),  # x-mesh-source; add ours
        connect_timeout=state.connect_timeout, pool=state.pools, gauge=state.telemetry.connections(direction),
        h2=serve_h2,                                            # HTTP/2 from the app or a gateway client
        connect_h2=H2PeerConnector.for_tls(state.tls, state.connect_timeout),   # HTTP/2 hops
    )


def build_inbound_stack(state: ProxyState, app_port: int, *, protocol: str = "http",
                        app_host: str = "127.0.0.1") -> Stack:
    """The inbound path (inbound_chain): everything goes to the local app over pooled connections
    (HTTP/2 streams over h2c for an app of protocol grpc or http2)."""
    cluster = local_cluster(state.service, state.version, app_port, protocol, app_host)
    return Stack(
        direction="inbound", reporter=REPORTER_DESTINATION, source_name=state.service,
        chain=inbound_chain(cluster), request_headers=INBOUND_REQUEST_HEADERS, mesh_headers=b"",
        connect_timeout=state.connect_timeout, pool=state.pools, gauge=state.telemetry.connections("inbound"),
        connect=H2AppConnector() if protocol in H2_PROTOCOLS else None,
        h2=serve_h2,                                   # HTTP/2 streams from a peer's h2 hop (ALPN h2)
    )


def caller_of(down: "_Downstream", ex: "Exchange") -> str:
    """The calling workload as the inbound reports it: the service of the verified peer certificate
    (mTLS), else the caller's `x-mesh-source` header (plaintext on a permissive inbound: a label only,
    never trusted for authorization), else `unknown`."""
    if down.peer_service is not None:
        return down.peer_service
    return ex.source.decode("latin-1") if ex.source else UNKNOWN


def authorized(down: _Downstream, ex: Exchange) -> Reply | None:
    """Inbound authorization: `state.authz` decides on the verified caller; a denial is 403 `RBAC`
    with `x-mesh-denied: <reason>`. An allowed mTLS request gets `x-forwarded-client-cert` for the app."""
    authz = down.state.authz
    if authz is not None:
        decision = authz.check_request(down.peer_identity, ex.method, ex.target)
        if not decision.allowed:
            reason = decision.reason.encode("latin-1", "replace")
            return Reply(403, FLAG_RBAC, b"RBAC: access denied: %b\n" % reason,
                         headers=b"x-mesh-denied: %b\r\n" % reason)
    if down.peer_xfcc:
        ex.extra = (ex.extra or b"") + down.peer_xfcc
    return None


# ---- one request --------------------------------------------------------------------------------

class Exchange:
    """One request and its response. Route layers may read `method`, `target`, `host`, `dest`,
    `xff`, `source` and set `target` (origin-form bytes) and `extra` (header lines, CRLF-ended).
    `flags` are the Envoy response flags of the request (metrics `response_flags`, access logs)."""

    __slots__ = (
        "down", "start", "method", "target", "lines", "host", "dest", "xff", "extra", "source",
        "source_version", "conn_tokens", "head_size", "http10", "keep_alive", "chunked", "body", "expect",
        "is_head", "is_connect", "bad", "head_done", "req_done", "dispatched", "cluster", "index",
        "key", "excluded", "tries_left", "up", "pending", "pending_bytes", "held", "held_bytes",
        "reused", "fresh_retry", "got_body", "status", "flags", "resp_started", "resp_done", "discard",
        "close_after", "dead", "fields", "body_seen", "upgrade", "trailers", "grpc_status", "grpc_timeout",
        # traffic layers
        "traffic", "subset", "mirror", "admitted", "budgeted", "keep_held", "resend", "attempt", "retry_on",
        "in_retry", "timer", "try_timer", "wait", "fault_abort", "lane",
        # tracing
        "tp", "ts", "b3", "trace", "trace_headers", "at", "route",
    )

    def __init__(self, down: _Downstream):
        self.down = down
        self.start = monotonic()
        self.method = b""
        self.target = b""
        self.lines: list = []
        self.host: bytes | None = None
        self.dest: tuple[str, int] | None = None   # absolute-form authority (explicit proxy)
        self.xff: bytes | None = None
        self.extra: bytes | None = None
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
        self.trace_headers = b""                  # what carries it to the next hop
        self.at = 0                               # the next layer of the chain to run (_proceed)
        self.route = None                         # what the route layer matched, for the layers after it


# Reasons the downstream's reading is paused (bits).
P_UPSTREAM = 1    # the upstream's write buffer is full
P_PENDING = 2     # request body buffered while connecting
P_PIPELINE = 4    # a pipelined request waits for the one before it
P_STOPPED = 8     # a malformed request: read nothing more


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


class _Downstream:
    """The client side of the proxy: parses requests, runs the layers, writes responses in order.

    An asyncio protocol by its methods (every one of asyncio.Protocol's is defined) rather than by
    inheritance: compiled (engine.pxd), a C struct type cannot derive from a Python class."""

    def __init__(self, state: ProxyState, stack: Stack, listener: _Listener):
        self.state = state
        self.stack = stack
        self.listener = listener
        self.actions = stack.request_headers
        self.loop: asyncio.AbstractEventLoop | None = None
        self.transport: asyncio.Transport | None = None
        # httptools' parser, made when a message is not taken whole (_feed): most connections never
        # need one, and making one costs a few microseconds (a new connection per request pays it each)
        self.parser: HttpRequestParser | None = None if WHOLE_HEADS else HttpRequestParser(self)
        self.queue: deque[Exchange] = deque()
        self.cur: Exchange | None = None
        self.last: Exchange | None = None
        self.paused = 0
        self.write_paused = False
        self.closing = False
        self.switched = False
        self.eof = False
        self.bad_after = False
        self.advancing = False
        self.feeding = False
        self.cork: Exchange | None = None  # attached during this read: head and body written at its end
        self.body_left = 0                 # Content-Length bytes still to come of a head taken whole
        self.peer_ip = b""
        self.peer_identity: str | None = None   # inbound: the caller's verified SPIFFE ID (mTLS)
        self.peer_service: str | None = None    # ... and its service name (authorization's source)
        self.peer_xfcc = b""
        self.orig_dst: tuple[str, int] | None = None
        self.raw: bytearray | None = None
        self.sniff_timer: asyncio.TimerHandle | None = None
        self.early = b""   # bytes after an upgrade request's head: the new protocol's, sent on a 101
        self.h2_sniff = stack.h2 is not None   # the first read may be the HTTP/2 preface

    # -- transport callbacks

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        loop = self.listener.loop
        self.loop = loop if loop is not None else asyncio.get_running_loop()
        self.stack.gauge.inc()
        if not self.listener.guard.admit(self):   # limits: max_connections (reset), timeouts
            return
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        peer = transport.get_extra_info("peername")
        self.peer_ip = peer[0].encode() if peer else b""
        if self.stack.direction == "inbound":
            identify = getattr(self.state.tls, "inbound_peer", None)
            if identify is not None:
                self.peer_identity, self.peer_service = identify(transport.get_extra_info("ssl_object"))
                if self.peer_identity:
                    self.peer_xfcc = b"x-forwarded-client-cert: URI=%b\r\n" % self.peer_identity.encode()
        hook = self.listener.original_dst
        if hook is None:
            return
        try:
            dst = hook(transport)
        except Exception:  # noqa: BLE001
            log.exception("original destination hook failed")
            dst = None
        if dst is None:
            return
        self.orig_dst = dst
        cluster = find_by_address(self.state.table, dst[0], dst[1])
        if cluster is None:
            # Unknown destination: sniff for HTTP (a Host header may still name a mesh service).
            self.raw = bytearray()
            self.sniff_timer = self.loop.call_later(self.listener.sniff_timeout, self._sniff_expired)
        elif cluster.protocol == "tcp":
            self._to_tunnel(cluster, b"")

    def data_received(self, data: bytes) -> None:
        if self.h2_sniff:
            self.h2_sniff = False
            # A connection opened with the HTTP/2 preface (RFC 9113 3.4; "PRI" is no HTTP/1 method):
            # HTTP/2, each stream an exchange of this stack. Not to a destination the mesh does not
            # know (raw): that is passed through as it is.
            if self.raw is None and len(data) >= 3 and is_preface_start(data):
                self.stack.h2(self, data)
                return
        if self.raw is not None:
            if self.sniff_timer is not None:
                self.sniff_timer.cancel()
                self.sniff_timer = None
            self.raw += data
            if len(self.raw) > SNIFF_LIMIT:
                self._passthrough_raw()
                return
        self.feeding = True
        try:
            self._feed(data)
        finally:
            self.feeding = False
            ex = self.cork
            if ex is not None:
                self.cork = None
                self._uncork(ex)

    def _feed(self, data: bytes) -> None:
        if WHOLE_HEADS and (self.body_left or (self.cur is None and self.raw is None and not self.paused & P_STOPPED
                                               and not self.bad_after)):
            data = self._feed_whole(data)
            if not data:
                return
        parser = self.parser
        if parser is None:
            parser = self.parser = HttpRequestParser(self)
        while True:
            try:
                parser.feed_data(data)
                return
            except HttpParserUpgrade as exc:
                data = data[exc.args[0]:]
                ex = self.last
                if ex is not None and ex.is_connect:
                    self._connect_tunnel(ex, data)
                    return
                if ex is None or ex.bad:
                    self._bad_request()
                    return
                if ex.upgrade is not None:
                    # The rest is the new protocol's, held until the upstream switches (101); reading
                    # stops here: an answer other than 101 closes the connection.
                    self.early += data
                    self._pause(P_STOPPED)
                    return
                if not data:
                    return
                # Upgrade without Connection: upgrade (or from HTTP/1.0): ignored; parse on.
            except HttpParserError as exc:
                if self.closing or self.switched:
                    return
                if exc.__context__ is not None and not isinstance(exc.__context__, _Stop):
                    log.error("request callback failed", exc_info=exc.__context__)
                if self.raw is not None and self.orig_dst is not None:
                    self._passthrough_raw()
                    return
                self._bad_request()
                return

    def _feed_whole(self, data: bytes) -> bytes:
        """Take whole heads (scan_fields) and their Content-Length bodies from `data`, between
        messages of httptools; what is left (from the start of a message) is httptools' to parse."""
        pos = 0
        n = len(data)
        while pos < n:
            left = self.body_left
            if left:
                take = n - pos if n - pos < left else left
                self.body_left = left - take
                self.on_body(data if take == n else cut(data, pos, pos + take))
                pos += take
                if not self.body_left:
                    self.on_message_complete()
                continue
            if self.closing or self.switched or self.bad_after:
                return b""   # as after httptools' _Stop: nothing more is read
            last = self.last
            if last is not None and not last.keep_alive:
                self._bad_request()   # RFC 9112 9.6: nothing after a request that closes (as llhttp)
                return b""
            end = head_end(data, pos, pos + MAX_HEAD)
            if end < 0:
                break
            taken = self._whole_head(data, pos, end)
            if taken < 0:
                break
            pos = taken
        return cut(data, pos, len(data)) if pos else data

    def _whole_head(self, data: bytes, pos: int, end: int) -> int:
        """The request whose head is data[pos:end + 4], taken whole: where its body starts, or -1
        for httptools to parse it (not plain syntax; chunked, Upgrade, CONNECT...)."""
        head = read_request_head(data, pos, end, self.actions, self.stack.header_table)
        if head is None:
            return -1
        method, target, http10, fields, size, keep = head
        lim = self.listener
        if end - pos > lim.max_head or len(fields) > 3 * lim.max_fields or len(target) > lim.max_line:
            return -1   # limits: httptools' callbacks count it exactly and refuse it (431, 414)
        self.on_message_begin()
        ex = self.cur
        ex.target = target
        for k in range(0, len(fields), 3):
            self._header(ex, fields[k], fields[k + 1], fields[k + 2])
        if self._headers_done(ex, method, keep, http10, False):
            return len(data)   # as after httptools' _Stop: the rest of the read is dropped
        if size > 0:
            self.body_left = size
        else:
            self.on_message_complete()
        return end + 4

    def eof_received(self) -> bool | None:
        self.eof = True
        if self.raw is not None and self.orig_dst is not None:
            self._passthrough_raw(eof=True)
            return True
        if self.queue and self.cur is None:
            return True  # half-close after complete requests: answer them, then close
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.stack.gauge.dec()
        self.listener.guard.release(self)   # limits
        if self.sniff_timer is not None:
            self.sniff_timer.cancel()
            self.sniff_timer = None
        for ex in self.queue:
            self._abandon(ex)
        self.queue.clear()

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.queue:
            up = self.queue[0].up
            if up is not None:
                up.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.queue:
            up = self.queue[0].up
            if up is not None:
                up.resume_reading()

    # -- parser callbacks

    def on_message_begin(self) -> None:
        if self.closing or self.switched:
            raise _Stop
        ex = Exchange(self)
        self.cur = ex
        q = self.queue
        q.append(ex)
        if len(q) > 1:
            self._pause(P_PIPELINE)

    def on_url(self, url: bytes) -> None:
        ex = self.cur
        ex.target += url
        if len(ex.target) > self.listener.max_line:   # limits: max_request_line
            self._head_too_large(ex, 414)

    def on_header(self, name: bytes, value: bytes) -> None:
        ex = self.cur
        ex.head_size += len(name) + len(value)
        ex.fields += 1
        if ex.head_size > self.listener.max_head or ex.fields > self.listener.max_fields:   # limits
            self._head_too_large(ex)
        if ex.head_done:   # a trailer (RFC 9112 7.1.2): passed on after the body, never acted on
            if name.lower() not in TRAILER_DROP:
                ex.trailers = (ex.trailers or []) + [name, b": ", value, b"\r\n"]
            return
        self._header(ex, name, value, self.actions.get(name.lower()))

    def _header(self, ex: Exchange, name: bytes, value: bytes, act: int | None) -> None:
        """The request header `name: value` taken by its action (H_*, or None: passed on)."""
        if act is None:
            ex.lines += (name, b": ", value, b"\r\n")
        elif act != H_DROP:   # compiled: a C int (a, below) compared with C ints from here on
            a = act
            if a == H_HOST:
                ex.host = value
            elif a == H_CL:
                ex.lines += (name, b": ", value, b"\r\n")
                if value.strip() not in (b"0", b""):
                    ex.body = True
            elif a == H_TE:
                if b"chunked" in value.lower():
                    ex.chunked = True
            elif a == H_CONNECTION:
                ex.conn_tokens = connection_tokens(value, ex.conn_tokens)
            elif a == H_EXPECT:
                ex.lines += (name, b": ", value, b"\r\n")
                if value.strip().lower() == b"100-continue":
                    ex.expect = True
            elif a == H_SOURCE:
                ex.source = value
                ex.lines += (name, b": ", value, b"\r\n")
            elif a == H_SOURCE_VERSION:
                ex.source_version = value
                ex.lines += (name, b": ", value, b"\r\n")
            elif a == H_XFF:
                ex.xff = value if ex.xff is None else ex.xff + b", " + value
            elif a == H_TRACEPARENT:
                # Two traceparent headers are invalid (W3C Trace Context 3.2): a new trace starts.
                ex.tp = value if ex.tp is None else b"-"
            elif a == H_TRACESTATE:
                ex.ts = value if ex.ts is None else ex.ts + b"," + value  # RFC 9110 5.3: one list
            elif a == H_B3:
                if ex.b3 is None:
                    ex.b3 = {}
                ex.b3[name.lower()] = value
            elif a == H_GRPC_TIMEOUT:
                ex.grpc_timeout = value.strip()
            elif a == H_UPGRADE:
                value = value.strip()
                ex.upgrade = value if ex.upgrade is None else ex.upgrade + b", " + value

    def on_headers_complete(self) -> None:
        p = self.parser
        if self._headers_done(self.cur, p.get_method(), p.should_keep_alive(),
                              p.get_http_version() == "1.0", p.should_upgrade()):
            raise _Stop

    def _headers_done(self, ex: Exchange, method: bytes, keep_alive: bool, http10: bool,
                      upgrade: bool) -> bool:
        """The request head is complete: dispatch it if first in line. True: read nothing more."""
        ex.method = method
        ex.keep_alive = keep_alive
        if http10:
            ex.http10 = True
        if ex.conn_tokens:
            ex.lines = drop_named(ex.lines, ex.conn_tokens)
        if ex.chunked:
            ex.body = True
        if method == b"HEAD":
            ex.is_head = True
        elif method == b"CONNECT":
            ex.is_connect = True
            ex.head_done = True
            return False  # handled when the parser reports the upgrade
        if not upgrade or http10:
            ex.upgrade = None   # RFC 9110 7.8: only with Connection: upgrade, never from HTTP/1.0
        elif ex.body:
            ex.bad = True  # an Upgrade request with a body is not supported
        else:
            ex.keep_alive = False   # after the answer the connection is a tunnel (101) or closed
        target = ex.target
        if (not target or target[0] != _SLASH) and target != b"*" and not ex.bad:
            if not self._absolute_form(ex):
                ex.bad = True
        ex.head_done = True
        if ex is self.queue[0]:
            self._dispatch(ex)
            return self.switched or self.closing
        return False

    def on_body(self, data: bytes) -> None:
        ex = self.cur
        if ex.discard or ex.bad:
            return
        if self.listener.max_body and body_over_limit(self, ex, len(data)):   # limits: the gateway's body
            return
        if ex.chunked:
            parts: tuple = (b"%x\r\n" % len(data), data, b"\r\n")
            self._forward_body(ex, parts, len(data) + CHUNK_COST)
        else:
            self._forward_body(ex, (data,), len(data))

    def on_message_complete(self) -> None:
        ex = self.cur
        self.cur = None
        self.last = ex
        ex.req_done = True
        if ex.is_connect or ex.bad:
            return
        if ex.discard:
            self._advance()
            return
        if ex.chunked:
            self._forward_body(ex, (last_chunk(ex.trailers),), 0)
        if ex.mirror is not None:
            self._send_mirror(ex)

    # -- request path

    def _absolute_form(self, ex: Exchange) -> bool:
        target = ex.target
        i = target.find(b"://")
        if i < 0 or target[:i].lower() != b"http":
            return False
        rest = target[i + 3:]
        end = len(rest)
        for sep in (b"/", b"?"):
            j = rest.find(sep)
            if 0 <= j < end:
                end = j
        authority = rest[:end].rpartition(b"@")[2]
        path = rest[end:] or b"/"
        if path[:1] == b"?":
            path = b"/" + path
        if not authority:
            return False
        host, port = split_host(authority.decode("latin-1"), 80)
        ex.dest = (host, port)
        ex.target = path
        ex.host = authority  # RFC 9112 3.2.2: the request-target's authority replaces Host
        return True

    def _forward_body(self, ex: Exchange, parts: tuple, size: int) -> None:
        ex.got_body = True
        held = ex.held
        if held is not None:
            held += parts
            ex.held_bytes += size
        if ex.pending is None:  # attached: stream it
            up = ex.up
            if up is not None:
                if ex.chunked and self.feeding and self.cork is None:
                    # The chunks of one read go in one write at its end (_uncork): a flood of tiny
                    # chunks cost a system call each (tests/adapters/test_attacks.py, chunk_flood).
                    ex.pending = list(parts)
                    ex.pending_bytes = size
                    self.cork = ex
                else:
                    _send(up.transport, parts)
            if held is not None and ex.held_bytes > HOLD_LIMIT:
                ex.held = None
            return
        # Queued, connecting, or reconnecting for a retry (then `held` is what gets sent).
        if not ex.fresh_retry:
            ex.pending += parts
        ex.pending_bytes += size
        if ex.pending_bytes > PENDING_LIMIT:
            up = ex.up
            if self.cork is ex and up is not None:   # attached, corked: write what this read gathered
                _send(up.transport, ex.pending)
                ex.pending = []
                ex.pending_bytes = 0
            else:
                self._pause(P_PENDING)

    def _dispatch(self, ex: Exchange) -> None:
        ex.dispatched = True
        if ex.bad:
            self._reply(ex, 400, FLAG_DOWNSTREAM_PROTOCOL_ERROR, b"bad request\n", close=True)
            return
        ex.at = 0
        self._proceed(ex)

    def _proceed(self, ex: Exchange) -> None:
        """Run the stack's layers from `ex.at` until one answers or holds the request."""
        chain = self.stack.chain
        n = len(chain)
        while ex.at < n:
            layer = chain[ex.at]
            ex.at += 1
            if layer.on_request(self, ex) != NEXT:
                return

    def _answer(self, ex: Exchange, reply: Reply) -> None:
        self._reply(ex, reply.status, reply.flags, reply.body, reply.content_type, headers=reply.headers)

    def _routed(self, ex: Exchange, target: Any) -> int:
        """The route layer's decision: a Reply is answered; a cluster is the exchange's (or, for the
        first request to an unknown destination, a byte tunnel's)."""
        if target.__class__ is Reply:
            self._answer(ex, target)
            return HELD
        cluster: Cluster = target
        ex.cluster = cluster
        if cluster.name == PASSTHROUGH and http_egress_blocked(self, ex, cluster):   # egress control: 502 EB
            return HELD
        if self.raw is not None:
            raw = bytes(self.raw)
            self.raw = None
            if cluster.name == PASSTHROUGH and self.orig_dst is not None:
                # First request to a destination the mesh does not know: forward the bytes unchanged.
                self.queue.clear()
                self._to_tunnel(passthrough_cluster(*self.orig_dst), raw)
                return HELD
        if not cluster.endpoints:
            self._reply(ex, 503, FLAG_NO_HEALTHY_UPSTREAM, b"no healthy upstream\n")
            return HELD
        return NEXT

    def _fault_delayed(self, ex: Exchange) -> None:
        ex.wait = None
        if ex.dead or ex.resp_done:
            return
        if ex.fault_abort:
            self._reply(ex, ex.fault_abort, FLAG_FAULT_ABORT, b"fault filter abort\n")
            return
        self._proceed(ex)

    def _send_mirror(self, ex: Exchange) -> None:
        sub = ex.mirror
        ex.mirror = None
        held = ex.held
        if ex.body and held is None:
            return  # the body outgrew what is held: no copy (Envoy mirrors only what it buffers)
        cluster = sub.cluster
        state = self.state
        idx = balance_subset(state, sub, (), None)
        if idx is None:
            return
        head = self._head(ex, cluster, shadow_host(ex.host if ex.host is not None else cluster.name.encode()))
        state.mirrors.send(cluster.keys[idx], [head, *held] if held else [head], head_only=ex.is_head,
                           tag=(cluster, idx, self.stack.source_name))

    def _timed_out(self, ex: Exchange) -> None:
        ex.timer = None
        if not (ex.dead or ex.resp_done):
            self._reply(ex, 504, FLAG_UPSTREAM_TIMEOUT, b"upstream request timeout\n")

    def _end_try(self, ex: Exchange) -> None:
        if ex.try_timer is not None:
            ex.try_timer.cancel()
            ex.try_timer = None
        if ex.in_retry:
            ex.in_retry = False
            ex.traffic.budget.finish_retry()

    def _response_head(self, ex: Exchange, up: _Upstream, status: int) -> bool:
        """A try's response head arrived: record it; True when the retry layer takes it (the
        response is then read and dropped, and the request sent again after a backoff)."""
        if self.stack.outlier and ex.key is not None:
            # Every answer counts (a success resets the endpoint's run); only errors need the clock. A
            # success on an endpoint with no run (OutlierDetector.clean) would change nothing.
            outlier = ex.lane.outlier
            if status >= 500 or ex.key not in outlier.clean:
                outlier.record(ex.key, status, monotonic() if status >= 500 else 0.0)
        if ex.try_timer is not None or ex.in_retry:
            self._end_try(ex)
        retry_on = ex.retry_on
        if retry_on is None:
            return False
        if up.grpc_status is not None and up.grpc_status != b"0":
            # A trailers-only gRPC answer (no message yet): retried when mesh.retries.on names its
            # status (Istio's retryOn: cancelled, deadline-exceeded, internal, resource-exhausted,
            # unavailable), whatever the method: every gRPC call is a POST (gRPC's retry design).
            if is_retriable_grpc_status(parse_grpc_status(up.grpc_status), ex.traffic.policy.retries.on):
                if ex.attempt >= ex.traffic.policy.retries.attempts:
                    ex.flags = _join_flags(ex.flags, FLAG_RETRY_LIMIT)
                    return False
                return self._start_retry(ex)
        if status not in retry_on:
            return False
        if status == 503 and up.peer_flags in _PEER_UNREACHABLE:
            # The peer's inbound could not reach its app: the request reached no app, any method may retry.
            return self._decide_retry(ex, None, "connect-failure", False)
        return self._decide_retry(ex, status, None, True)

    def _try_failed(self, ex: Exchange, failure: str | None, sent: bool) -> bool:
        """A try ended without a response (reset, per-try timeout): True when it is retried."""
        tr = ex.traffic
        key = ex.key
        if self.stack.outlier and key is not None:
            tr.outlier.record(key, failure or "reset", monotonic())
        self._end_try(ex)
        if not self._decide_retry(ex, None, failure, sent):
            return False
        if key is not None:
            ex.key = None
            _dec(self.state.in_flight, key)
        self._backoff(ex)
        return True

    def _decide_retry(self, ex: Exchange, status: int | None, failure: str | None, sent: bool) -> bool:
        if ex.retry_on is None:
            return False
        tr = ex.traffic
        policy = tr.policy.retries
        method = ex.method.decode("latin-1")
        if not should_retry(policy, ex.attempt, method, status, failure, sent):
            if ex.attempt and should_retry(policy, 0, method, status, failure, sent):
                ex.flags = _join_flags(ex.flags, FLAG_RETRY_LIMIT)  # retriable, but no attempts left
            return False
        return self._start_retry(ex)

    def _start_retry(self, ex: Exchange) -> bool:
        """A retry is wanted: True when the request can be sent again (whole in memory, budget)."""
        tr = ex.traffic
        if not ex.req_done or (ex.body and ex.held is None):
            return False  # the whole request is not in memory: it cannot be sent again
        budget = tr.budget
        if not budget.can_retry(0.0):
            tr.retry_overflows += 1
            return False
        budget.start_retry()
        ex.in_retry = True
        ex.attempt += 1
        tr.retries_total += 1
        return True

    def _backoff(self, ex: Exchange) -> None:
        policy = ex.traffic.policy.retries
        delay = backoff_delay(ex.attempt - 1, policy.backoff_base, policy.backoff_max, self.state.random())
        ex.wait = self.loop.call_later(delay, self._retry_now, ex)

    def _retry_now(self, ex: Exchange) -> None:
        ex.wait = None
        if ex.dead or ex.resp_done:
            return
        sub = ex.subset
        if sub is not None:
            tr = sub.traffic
            cur = tr.all if sub.version is None else tr.subsets.get(sub.version)
            if cur is not sub and cur is not None and cur.cluster.keys:
                # A snapshot came since the last try: retry among the endpoints the mesh has now
                # (still excluding the endpoints tried, by address).
                keys = sub.cluster.keys
                tried = {keys[i] for i in ex.excluded} if ex.excluded else set()
                last = keys[ex.index] if ex.index is not None else None
                new_keys = cur.cluster.keys
                ex.subset = cur
                ex.cluster = cur.cluster
                ex.index = new_keys.index(last) if last in new_keys else None
                ex.excluded = {i for i, k in enumerate(new_keys) if k in tried} or None
        cluster = ex.cluster
        n = len(cluster.keys)
        excluded = ex.excluded
        if excluded is None:
            excluded = ex.excluded = set()
        if ex.index is not None:
            excluded.add(ex.index)
        if len(excluded) >= n:  # every endpoint tried: any but the last one
            excluded.clear()
            if n > 1 and ex.index is not None:
                excluded.add(ex.index)
        ex.resend = True
        ex.fresh_retry = False
        ex.tries_left = connect_tries(n, self.stack.max_tries)
        self._pick(ex)

    def _skipped(self, ex: Exchange, up: _Upstream, reusable: bool) -> None:
        """The answer the retry layer took is read (or the connection given up): back off, then retry."""
        ex.up = None
        if up.write_paused:
            self._resume(P_UPSTREAM)
        key = ex.key
        if key is not None:
            ex.key = None
            _dec(self.state.in_flight, key)
        if reusable and ex.pending is None:
            self.stack.pool.release(up)
        else:
            up.close()
        if not (ex.dead or ex.resp_done):
            self._backoff(ex)

    def _try_timed_out(self, ex: Exchange) -> None:
        ex.try_timer = None
        if ex.dead or ex.resp_done or ex.resp_started:
            return
        up = ex.up
        if up is not None:
            ex.up = None
            up.exchange = None
            up.close()
            if up.write_paused:
                self._resume(P_UPSTREAM)
        if not self._try_failed(ex, "timeout", up is not None):
            self._reply(ex, 504, FLAG_UPSTREAM_TIMEOUT, b"upstream request timeout\n")

    # -- balance, connect, send

    def _pick(self, ex: Exchange) -> None:
        cluster = ex.cluster
        idx = self.stack.balance.pick(self.state, cluster, ex.excluded or (), ex)
        if idx is None:
            lane = ex.lane
            if lane is not None and lane.outlier.ejections_total:
                now = monotonic()
                if lane.outlier.any_ejected(now) and not lane.outlier.healthy(cluster.keys, now):
                    # every endpoint ejected by outlier detection: answer at once, call no one
                    self._reply(ex, 503, FLAG_NO_HEALTHY_UPSTREAM, b"no healthy upstream\n")
                    return
            self._reply(ex, 503, FLAG_CONNECT_FAILURE, b"upstream connect error\n")
            return
        key = cluster.keys[idx]
        ex.index = idx
        ex.key = key
        counts = self.state.in_flight
        counts[key] = counts.get(key, 0) + 1
        lane = ex.lane
        if lane is not None and ex.try_timer is None and lane.per_try_timeout is not None and ex.retry_on is not None:
            ex.try_timer = self.loop.call_later(lane.per_try_timeout, self._try_timed_out, ex)
        up = self.stack.pool.acquire(key)
        if up is not None:
            ex.reused = True
            self._attach(ex, up)
        else:
            ex.reused = False
            self.loop.create_task(self._connect(ex, key, cluster))

    async def _connect(self, ex: Exchange, key: tuple[str, int], cluster: Cluster) -> None:
        state = self.state
        stack = self.stack
        if ex.dead or ex.resp_done:
            return
        attempt = ex.attempt  # once it changes, a retry owns the exchange: this connect is stale
        tr = ex.traffic
        breaker = tr.breaker if tr is not None and stack.breaker else None
        made: list[_Upstream] = []
        if breaker is not None:
            # 4. circuit breaker: requests waiting for a connection, and connections, are limited too
            if not breaker.try_acquire_pending():
                self._reply(ex, 503, FLAG_OVERFLOW, b"upstream overflow\n")
                return
            if not breaker.try_acquire_connection():
                breaker.release_pending()
                self._reply(ex, 503, FLAG_OVERFLOW, b"upstream overflow\n")
                return

        def factory() -> _Upstream:
            up = _Upstream(stack.pool, key, breaker)  # releases the breaker's connection when lost
            made.append(up)
            return up

        try:
            tls = state.tls
            ctx, hostname = hop_tls(tls, cluster)
            connect = stack.connect
            if connect is None and ctx is not None and cluster.protocol in H2_PROTOCOLS:
                connect = stack.connect_h2   # an HTTP/2 service: streams on an h2 hop (ALPN), if the peer offers it
            if connect is None:
                made_connection = self.loop.create_connection(factory, key[0], key[1], ssl=ctx,
                                                              server_hostname=hostname)
            else:   # the connector checks the peer of each connection it opens
                index = ex.index
                made_connection = connect(self.loop, factory, key[0], key[1], ctx, hostname,
                                          lambda transport: check_peer(tls, transport, cluster, index))
            _, up = await asyncio.wait_for(made_connection, stack.connect_timeout)
            if ctx is not None and connect is None:
                check_peer(tls, up.transport, cluster, ex.index)
        except asyncio.CancelledError:
            if breaker is not None:
                breaker.release_pending()
                if not made or made[0].transport is None:
                    breaker.release_connection()
            raise
        except Exception as exc:  # noqa: BLE001 - refused, unreachable, timeout, TLS: try elsewhere
            state.connect_failed(key)
            log.debug("connect to %s:%s failed: %r", key[0], key[1], exc)
            if breaker is not None:
                breaker.release_pending()
                if not made or made[0].transport is None:
                    breaker.release_connection()
            if tr is not None and stack.outlier:
                tr.outlier.record(key, "connect-failure", monotonic())
            if ex.attempt != attempt:
                return
            if ex.key is not None:
                ex.key = None
                _dec(state.in_flight, key)
            if ex.dead or ex.resp_done:
                return
            if ex.excluded is None:
                ex.excluded = set()
            ex.excluded.add(ex.index)
            ex.tries_left -= 1
            if ex.tries_left > 0:
                self._pick(ex)
            else:
                self._reply(ex, 503, FLAG_CONNECT_FAILURE, b"upstream connect error\n")
            return
        if breaker is not None:
            breaker.release_pending()
        state.connect_succeeded(key)
        if ex.dead or ex.resp_done or ex.attempt != attempt:
            stack.pool.release(up)
            return
        self._attach(ex, up)

    def _head(self, ex: Exchange, cluster: Cluster, host: bytes | None) -> bytes:
        """The request head sent to an endpoint of `cluster` (mesh headers on mesh hops)."""
        parts = [ex.method, b" ", ex.target, b" HTTP/1.1\r\n"]
        if host is not None:
            parts += (b"host: ", host, b"\r\n")
        elif cluster.mesh:
            parts += (b"host: ", cluster.name.encode(), b"\r\n")
        parts += ex.lines
        if ex.chunked:
            parts.append(b"transfer-encoding: chunked\r\n")
        elif ex.upgrade is not None:
            parts += (b"connection: upgrade\r\nupgrade: ", ex.upgrade, b"\r\n")
        if ex.grpc_timeout is not None:
            parts += (b"grpc-timeout: ", ex.grpc_timeout, b"\r\n")
        if cluster.mesh:
            parts.append(self.stack.mesh_headers)
        if ex.extra:
            parts.append(ex.extra)
        parts.append(ex.trace_headers)
        parts.append(b"\r\n")
        return join(parts)

    def _attach(self, ex: Exchange, up: _Upstream) -> None:
        up.attach(ex)
        ex.up = up
        if ex.reused and ex.traffic is not None:
            self.state.watch(up)  # dead-peer safety net (ProxyState): pooled mesh connections only
        body = ex.held if ex.fresh_retry or ex.resend else ex.pending
        if not ex.reused and not ex.keep_held:
            ex.held = None  # a fresh connection is not retried (unless the retry layer holds the body)
        head = self._head(ex, ex.cluster, ex.host)
        if self.write_paused:
            up.pause_reading()
        if self.feeding and ex is self.cur and not ex.fresh_retry:
            # Still parsing this request: body bytes of the same read join the head in one write.
            ex.pending = [head, *body] if body else [head]
            self.cork = ex
            return
        if body:
            _send(up.transport, [head, *body])
        else:
            up.transport.write(head)
        ex.pending = None
        ex.pending_bytes = 0
        if self.paused & P_PENDING:
            self._resume(P_PENDING)

    def _uncork(self, ex: Exchange) -> None:
        pending = ex.pending
        ex.pending = None
        ex.pending_bytes = 0
        up = ex.up
        if up is not None and pending:
            _send(up.transport, pending)
        if self.paused & P_PENDING:
            self._resume(P_PENDING)

    def _upstream_lost(self, ex: Exchange, up: _Upstream, flags: str, vanished: bool = False) -> None:
        """The upstream connection closed or broke before the response was complete. `vanished`:
        the kernel gave up probing a peer that stopped answering (the request had been delivered)."""
        ex.up = None
        if up.write_paused:
            self._resume(P_UPSTREAM)
        if ex.dead:
            return
        if not ex.resp_started:
            if vanished:
                if ex.traffic is not None and self._try_failed(ex, "reset", True):
                    return
                self._reply(ex, 503, flags, b"upstream peer vanished\n")
                return
            if (ex.reused and not up.got_bytes and not ex.fresh_retry and flags == FLAG_UPSTREAM_RESET
                    and (not ex.body or ex.held is not None)):
                # A pooled connection the peer had closed: once more on a fresh connection.
                ex.fresh_retry = True
                ex.reused = False
                ex.pending = []
                self.loop.create_task(self._connect(ex, ex.key, ex.cluster))
                return
            if ex.traffic is not None and self._try_failed(
                    ex, "reset" if flags == FLAG_UPSTREAM_RESET else None, True):
                return
            self._reply(ex, 502, flags, b"upstream connection error\n")
            return
        ex.flags = _join_flags(ex.flags, flags)
        ex.resp_done = True
        self._finish_metrics(ex)
        self._abort()

    def _undelivered(self, ex: Exchange, up: _Upstream) -> None:
        """The peer's kernel never acknowledged this request and has been silent since (a dead peer,
        ProxyState): no application read it. Reset the connection and retry the request like a
        connect failure (Envoy's reset before request / refused stream); else 503 UC."""
        ex.up = None
        up.exchange = None
        reset_connection(up.transport)
        if up.write_paused:
            self._resume(P_UPSTREAM)
        if ex.dead or ex.resp_done:
            return
        self.state.undelivered_total += 1
        if ex.traffic is not None and self._try_failed(ex, "connect-failure", False):
            return
        self._reply(ex, 503, FLAG_UPSTREAM_RESET, b"upstream peer unreachable\n")

    def _reply(self, ex: Exchange, status: int, flags: str, body: bytes = b"",
               content_type: bytes = TEXT, close: bool = False, headers: bytes = b"") -> None:
        """Answer the request locally (errors, the gateway's 404)."""
        if ex.flags != NO_FLAGS:
            flags = _join_flags(ex.flags, flags)  # e.g. DI,UT: a delay fault, then the timeout
        up = ex.up
        if up is not None:
            ex.up = None
            up.exchange = None
            up.close()
            if up.write_paused:
                self._resume(P_UPSTREAM)
        if ex.resp_started:
            ex.flags = flags
            ex.resp_done = True
            self._finish_metrics(ex)
            self._abort()
            return
        close = close or not ex.keep_alive or self.eof or (ex.expect and not ex.req_done)
        if is_grpc_call(ex.lines):
            # A gRPC client reads a call's outcome from grpc-status, not from the HTTP status: a
            # trailers-only answer (gRPC over HTTP/2: status 200, no body) with the matching code.
            code = local_reply_status(status, flags)
            ex.grpc_status = str(int(code))
            headers += b"grpc-status: %d\r\ngrpc-message: %b\r\n" % (
                code, percent_encode_message(body.strip().decode("latin-1")))
            status, content_type, body = 200, GRPC_CONTENT_TYPE, b""
        head = b"%bcontent-type: %b\r\ncontent-length: %d\r\nx-mesh-flags: %b\r\n%b%b\r\n" % (
            status_line(status), content_type, len(body), flags.encode(), headers,
            b"connection: close\r\n" if close else b"")
        self.transport.write(head if ex.is_head else head + body)
        ex.status = status
        ex.flags = flags
        ex.resp_started = True
        self._response_done(ex, None, False, close)

    def _response_done(self, ex: Exchange, up: _Upstream | None, reusable: bool, close: bool) -> None:
        """The response is complete downstream: account, release the upstream, go on to the next."""
        key = ex.key
        if key is not None:
            ex.key = None
            _dec(self.state.in_flight, key)
        ex.resp_done = True
        if up is not None:
            if up.grpc_status is not None:
                ex.grpc_status = up.grpc_status.decode("latin-1")
            ex.up = None
            if up.write_paused:
                self._resume(P_UPSTREAM)
            if reusable and ex.req_done and ex.pending is None:
                self.stack.pool.release(up)
            else:
                up.close()
        self._finish_metrics(ex)
        if close or not ex.keep_alive:
            self._close()
            return
        if ex.req_done:
            self._advance()
        elif ex.expect and not ex.got_body:
            self._close()  # the client waits for 100-continue that will not come
        else:
            ex.discard = True  # read and drop the rest of this request's body, then go on

    def _finish_metrics(self, ex: Exchange) -> None:
        """Once per exchange, when it ends: traffic accounting, metrics, the access log hook."""
        stack = self.stack
        state = self.state
        for layer in stack.enders:
            layer.on_end(self, ex)
        ms = (monotonic() - ex.start) * 1000.0
        cluster = ex.cluster
        reporter, src, srcv, dst, ver = self.metric_labels(ex)
        if reporter == REPORTER_DESTINATION:
            security = MUTUAL_TLS if self.peer_identity else NO_TLS   # the caller's verified certificate
        else:
            security = MUTUAL_TLS if cluster is not None and cluster.mesh and state.tls is not None else NO_TLS
        count_request(state.telemetry, reporter, src, srcv, dst, ver, ex.status, ex.flags, ms, ex.grpc_status,
                      security)
        trace = ex.trace
        headers = ex.trace_headers
        if trace is None and not headers:
            return   # never dispatched: no trace began
        if ((trace.sampled if trace is not None else headers[_SAMPLED_AT] == 0x31)
                or state.tracing.access_mode == ACCESS_FULL or ex.status >= 500 or ex.status == 0
                or ex.flags != NO_FLAGS):
            if trace is None:
                trace = ex.trace = trace_of(ex.tp, headers)
            upstream = None
            if cluster is not None and ex.index is not None:
                key = cluster.keys[ex.index]
                upstream = f"{key[0]}:{key[1]}"
            state.tracing.finish(trace, direction=stack.direction, method=ex.method, target=ex.target,
                                 status=ex.status, flags=ex.flags, ms=ms, source=src, source_version=srcv,
                                 destination=dst, destination_version=ver, upstream=upstream,
                                 attempts=ex.attempt + 1, no_flags=NO_FLAGS)

    def metric_labels(self, ex: Exchange) -> tuple:
        """(reporter, source workload, its version, destination service, its version) of `ex`."""
        state = self.state
        if self.stack.reporter == REPORTER_DESTINATION:
            srcv = ex.source_version.decode("latin-1") if ex.source_version else UNKNOWN
            return REPORTER_DESTINATION, caller_of(self, ex), srcv, state.table.own or state.service, state.version
        cluster = ex.cluster
        if cluster is None:
            dst, ver = UNKNOWN, UNKNOWN
        else:
            dst = cluster.name
            ver = cluster.endpoints[ex.index].version if ex.index is not None else UNKNOWN
        return REPORTER_SOURCE, self.stack.source_name, state.version, dst, ver

    def _advance(self) -> None:
        """The head exchange is finished: start the next pipelined one, if any."""
        q = self.queue
        if q:
            q.popleft()
        if self.advancing:
            return  # the loop below, further up the stack, goes on
        self.advancing = True
        try:
            while not self.closing:
                if not q:
                    if self.bad_after:
                        self._write_bad_request()
                    elif self.eof and self.cur is None:
                        self._close()
                    return
                if len(q) <= 1 and self.paused & P_PIPELINE:
                    self._resume(P_PIPELINE)
                nxt = q[0]
                if nxt.dispatched or not nxt.head_done:
                    return
                if nxt.is_connect:
                    return  # its tunnel starts from data_received
                self._dispatch(nxt)
        finally:
            self.advancing = False

    def _abandon(self, ex: Exchange) -> None:
        ex.dead = True
        key = ex.key
        if key is not None:
            ex.key = None
            _dec(self.state.in_flight, key)
        up = ex.up
        if up is not None:
            ex.up = None
            up.exchange = None
            up.close()
        if ex.dispatched and not ex.resp_done:
            ex.resp_done = True
            ex.flags = FLAG_DOWNSTREAM_CLOSED
            self._finish_metrics(ex)

    # -- connection control

    def _pause(self, bit: int) -> None:
        if not self.paused and not self.closing:
            self.transport.pause_reading()
        self.paused |= bit

    def _resume(self, bit: int) -> None:
        if self.paused & bit:
            self.paused &= ~bit
            if not self.paused and not self.closing:
                self.transport.resume_reading()

    def _close(self) -> None:
        if not self.closing:
            self.closing = True
            self.transport.close()

    def _abort(self) -> None:
        self.closing = True
        self.transport.abort()

    def _head_too_large(self, ex: Exchange, status: int = 431) -> None:
        self._pause(P_STOPPED)
        self.queue.remove(ex)
        self.cur = None
        if self.queue:
            self.bad_after = True
        else:
            self.transport.write(status_line(status) + b"content-length: 0\r\n"
                                 b"x-mesh-flags: DPE\r\nconnection: close\r\n\r\n")
            self._close()
        raise _Stop

    def _bad_request(self) -> None:
        self._pause(P_STOPPED)
        ex = self.cur
        self.cur = None
        if ex is not None and ex.dispatched and not ex.resp_done:
            self._reply(ex, 400, FLAG_DOWNSTREAM_PROTOCOL_ERROR, b"bad request\n", close=True)
            return
        if ex is not None and ex in self.queue:
            self.queue.remove(ex)
        if self.queue:
            self.bad_after = True
        else:
            self._write_bad_request()

    def _write_bad_request(self) -> None:
        self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\n"
                             b"content-length: 12\r\nx-mesh-flags: DPE\r\nconnection: close\r\n\r\nbad request\n")
        self._close()

    # -- switching to byte forwarding

    def _sniff_expired(self) -> None:
        self.sniff_timer = None
        if self.raw is not None and not self.raw and not self.closing:
            self._passthrough_raw()

    def _passthrough_raw(self, eof: bool = False) -> None:
        raw = bytes(self.raw)
        self.raw = None
        self.queue.clear()
        self.cur = None
        if tunnel_egress_blocked(self, passthrough_cluster(*self.orig_dst), False):   # egress control: reset
            return
        self._to_tunnel(passthrough_cluster(*self.orig_dst), raw, eof=eof)

    def _connect_tunnel(self, ex: Exchange, rest: bytes) -> None:
        """CONNECT host:port (explicit proxy): a byte tunnel; a known TCP service goes over the mesh."""
        if len(self.queue) != 1 or self.queue[0] is not ex:
            self._bad_request()
            return
        host, port = split_host(ex.target.decode("latin-1"), 443)
        cluster = route_outbound(self.state.table, None, (host, port))
        if cluster is None or cluster.protocol != "tcp":
            cluster = passthrough_cluster(host, port)
        if cluster.name == PASSTHROUGH and tunnel_egress_blocked(self, cluster, True):   # egress control: 502 EB
            return
        self.queue.clear()
        self._to_tunnel(cluster, rest, greeting=b"HTTP/1.1 200 Connection Established\r\n\r\n")

    def _to_tunnel(self, cluster: Cluster, initial: bytes, *, greeting: bytes | None = None,
                   eof: bool = False) -> None:
        self.switched = True
        if self.sniff_timer is not None:
            self.sniff_timer.cancel()
            self.sniff_timer = None
        from .pipes import _Pipe, _tunnel   # pipes imports this module: not at its top

        pipe = _Pipe(self.stack.gauge)
        pipe.transport = self.transport
        if initial:
            pipe.buffer.append(initial)
        pipe.eof = eof
        if not self.paused:
            self.transport.pause_reading()
        self.transport.set_protocol(pipe)
        self.loop.create_task(_tunnel(self.state, self.stack, pipe, cluster, greeting))


# ---- the upstream side --------------------------------------------------------------------------

_WAIT_HEAD, _BODY, _DONE, _SKIP, _SWITCHED = 0, 1, 2, 3, 4   # _SKIP: a response the retry layer took,
# read and dropped; _SWITCHED: a 101 answered an upgrade request (the connection becomes a tunnel)


class _Upstream:
    """A keep-alive connection to an upstream: parses responses and streams them downstream (an
    asyncio protocol by its methods, like _Downstream)."""

    __slots__ = ("pool", "key", "transport", "parser", "exchange", "idle_since", "pooled", "closed",
                 "got_bytes", "phase", "lines", "chunked_in", "has_cl", "conn_tokens", "chunked_out",
                 "until_close", "keep", "interim", "read_paused", "write_paused", "uses", "out",
                 "peer_flags", "skip", "breaker", "connected_at", "sent_at", "doomed", "probing",
                 "mid", "body_left", "whole_keep", "upgrade", "trailers", "grpc_status")

    def __init__(self, pool: UpstreamPools, key: tuple[str, int], breaker: Any = None):
        self.pool = pool
        self.key = key
        self.peer_flags: bytes | None = None   # x-mesh-flags of the response (a peer inbound's UF/UH)
        self.skip = False                      # the retry layer took this response
        self.breaker = breaker                 # CircuitBreaker whose connection slot this holds
        self.transport: asyncio.Transport | None = None
        self.parser = HttpResponseParser(self)
        self.exchange: Exchange | None = None
        self.idle_since = 0.0
        self.pooled = False
        self.closed = False
        self.got_bytes = False
        self.phase = _WAIT_HEAD
        self.lines: list = []
        self.chunked_in = False
        self.has_cl = False
        self.conn_tokens: set | None = None
        self.chunked_out = False
        self.until_close = False
        self.keep = False
        self.interim = False
        self.read_paused = False
        self.write_paused = False
        self.uses = 0
        self.out: list = []  # bytes for the downstream, written once per data_received
        # Dead peers (ProxyState's docstring)
        self.connected_at = 0.0  # monotonic time the connection was made (its first request's write)
        self.sent_at = 0.0       # monotonic time the request was written on it when reused (mesh), or 0
        self.doomed = False      # its endpoint left the mesh: close it when its exchange ends
        self.probing = False     # the kernel probes the peer; ETIMEDOUT means it vanished
        self.mid = False         # httptools is inside a response
        self.body_left = 0       # Content-Length bytes still to come of a head taken whole
        self.whole_keep = False  # ... and whether its connection persists

    def attach(self, ex: Exchange) -> None:
        self.exchange = ex
        self.phase = _WAIT_HEAD
        self.skip = False
        self.got_bytes = False
        self.keep = False
        self.sent_at = 0.0
        self.uses += 1

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.transport.close()

    def detach(self) -> None:
        """Leave the pool and the breaker's connection count: the connection is closed, or a byte
        tunnel's from now on (a protocol switch; a snapshot that removes its endpoint does not end it)."""
        self.closed = True   # for the pool: never handed out again
        self.pool.discard(self)
        self.pool.unregister(self)
        breaker = self.breaker
        if breaker is not None:
            self.breaker = None
            breaker.release_connection()

    def pause_reading(self) -> None:
        if not self.read_paused and not self.closed:
            self.read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused and not self.closed:
            self.read_paused = False
            self.transport.resume_reading()

    # -- transport callbacks

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self.pool.opened += 1
        self.connected_at = monotonic()
        self.pool.register(self)

    def data_received(self, data: bytes) -> None:
        ex = self.exchange
        if ex is None:
            self.transport.close()  # bytes on an idle connection: not a response to anything
            return
        if not self.got_bytes:
            self.got_bytes = True
            if not ex.keep_held:
                ex.held = None
            if self.probing and not self.doomed:
                self.probing = False  # the peer answered: no more keepalive probes (back to the pool)
                stop_probing(self.transport)
        out = self.out = []
        if WHOLE_HEADS and (self.body_left or (self.phase == _WAIT_HEAD and not self.mid)):
            data = self._feed_whole(data, ex)
        try:
            if data:
                self.parser.feed_data(data)
        except (HttpParserError, HttpParserUpgrade) as exc:
            if out:
                _send(ex.down.transport, out)
            if self.exchange is not ex:
                return
            if self.phase == _SWITCHED and exc.__class__ is HttpParserUpgrade:
                from .pipes import switch_protocols   # pipes imports this module: not at its top

                switch_protocols(ex.down, ex, self, data[exc.args[0]:])
                return
            if self.phase == _DONE or self.skip:
                self.keep = False  # complete, but junk followed (or a dropped answer went bad)
            else:
                if exc.__context__ is not None and not isinstance(exc.__context__, _Stop):
                    log.error("response callback failed", exc_info=exc.__context__)
                self.exchange = None
                self.transport.abort()
                ex.down._upstream_lost(ex, self, FLAG_UPSTREAM_PROTOCOL_ERROR)
                return
        else:
            if out:
                _send(ex.down.transport, out)
        if self.skip:
            if self.exchange is ex:  # the dropped answer is read (kept connection), or given up (closed)
                self.skip = False
                self.exchange = None
                ex.down._skipped(ex, self, self.phase == _DONE and self.keep)
            return
        if self.phase == _DONE and self.exchange is ex:
            self.exchange = None
            ex.down._response_done(ex, self, self.keep, ex.close_after)

    def _feed_whole(self, data: bytes, ex: Exchange) -> bytes:
        """Take a whole response head (scan_fields) and its Content-Length body from `data`;
        what is left (from the start of a message) is httptools' to parse."""
        left = self.body_left
        pos = 0
        if not left:
            end = head_end(data, 0, MAX_HEAD)
            if end < 0:
                return data
            pos = self._whole_head(data, end, ex)
            if pos < 0:
                return data
            left = self.body_left
            if not left:
                return cut(data, pos, len(data))
        n = len(data)
        take = n - pos if n - pos < left else left
        self.body_left = left - take
        self.on_body(data if take == n else cut(data, pos, pos + take))
        pos += take
        if not self.body_left:
            self._message_done(self.whole_keep)
        return cut(data, pos, len(data))

    def _whole_head(self, data: bytes, end: int, ex: Exchange) -> int:
        """The response whose head is data[:end + 4], taken whole: where its body starts, or -1 for
        httptools to parse it (not plain syntax; 1xx, chunked, no Content-Length...)."""
        head = read_response_head(data, end, RESPONSE_HEADERS, _RESPONSE_TABLE, ex.is_head)
        if head is None:
            return -1
        status, fields, size, keep = head
        self.on_message_begin()
        self.mid = False   # httptools has not seen it
        lines = self.lines
        for k in range(0, len(fields), 3):
            if fields[k + 1] is None:
                lines.append(fields[k])   # raw lines passed on as they came
            else:
                self._header(fields[k], fields[k + 1], fields[k + 2])
        self._status_head(status, keep)
        if self.phase != _DONE:
            if size == 0:
                self._message_done(keep)
            else:
                self.body_left = size
                self.whole_keep = keep
        return end + 4

    def eof_received(self) -> bool | None:
        return None  # close; connection_lost decides what it meant

    def connection_lost(self, exc: Exception | None) -> None:
        self.detach()
        ex = self.exchange
        if ex is None:
            return
        self.exchange = None
        if self.phase == _DONE:
            ex.down._response_done(ex, self, False, ex.close_after)
        elif self.phase == _BODY and self.until_close:
            ex.down._response_done(ex, self, False, True)  # the body ended with the connection
        else:
            # ETIMEDOUT on a probed connection: the peer's kernel stopped answering (probe_peer).
            ex.down._upstream_lost(ex, self, FLAG_UPSTREAM_RESET,
                                   vanished=self.probing and isinstance(exc, TimeoutError))

    def pause_writing(self) -> None:
        self.write_paused = True
        ex = self.exchange
        if ex is not None:
            ex.down._pause(P_UPSTREAM)

    def resume_writing(self) -> None:
        self.write_paused = False
        ex = self.exchange
        if ex is not None:
            ex.down._resume(P_UPSTREAM)

    # -- parser callbacks

    def on_message_begin(self) -> None:
        if self.phase == _DONE:
            raise _Stop  # a second response to one request: the connection is broken
        self.mid = True
        self.lines = []
        self.chunked_in = False
        self.has_cl = False
        self.conn_tokens = None
        self.peer_flags = None
        self.upgrade = None
        self.trailers = None
        self.grpc_status = None

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.phase == _BODY or self.phase == _SKIP:   # a trailer (RFC 9112 7.1.2): after the body
            if self.phase == _BODY and name.lower() not in TRAILER_DROP:
                self.trailers = (self.trailers or []) + [name, b": ", value, b"\r\n"]
                if name.lower() == b"grpc-status":
                    self.grpc_status = value.strip()
            return
        self._header(name, value, RESPONSE_HEADERS.get(name.lower()))

    def _header(self, name: bytes, value: bytes, act: int | None) -> None:
        """The response header `name: value` taken by its action (H_*, or None: passed on)."""
        if act is None:
            self.lines += (name, b": ", value, b"\r\n")
            return
        a = act   # compiled: a C int compared with C ints
        if a == H_CL:
            self.has_cl = True
            self.lines += (name, b": ", value, b"\r\n")
        elif a == H_FLAGS:
            self.peer_flags = value.strip()
            self.lines += (name, b": ", value, b"\r\n")
        elif a == H_TE:
            if b"chunked" in value.lower():
                self.chunked_in = True
        elif a == H_CONNECTION:
            self.conn_tokens = connection_tokens(value, self.conn_tokens)
        elif a == H_UPGRADE:
            self.upgrade = value.strip()
        elif a == H_GRPC_STATUS:
            self.grpc_status = value.strip()   # a trailers-only gRPC answer: metrics, retries on it
            self.lines += (name, b": ", value, b"\r\n")

    def on_headers_complete(self) -> None:
        p = self.parser
        self._status_head(p.get_status_code(), p.should_keep_alive())

    def _status_head(self, status: int, keep: bool) -> None:
        """The response head is complete: pass it on (or to the retry layer); `keep`: the
        connection persists after this response."""
        ex = self.exchange
        lines = self.lines
        if self.conn_tokens:
            lines = drop_named(lines, self.conn_tokens)
        if status < 200:
            if status == 101:
                if ex.upgrade is None or ex.resp_started:
                    raise _Stop  # a switch nobody asked for is a protocol error
                ex.status = 101
                ex.resp_started = True
                self.phase = _SWITCHED   # the parser stops after this head (HttpParserUpgrade)
                self.out.append(join([status_line(101), *lines, b"connection: upgrade\r\nupgrade: ",
                                      self.upgrade or ex.upgrade, b"\r\n\r\n"]))
                return
            self.interim = True
            if not ex.http10:
                self.out.append(b"".join([status_line(status), *lines, b"\r\n"]))
            return
        if ex.traffic is not None and ex.down._response_head(ex, self, status):
            # The retry layer takes this answer: read it to its end and drop it (data_received decides).
            self.skip = True
            self.phase = _SKIP
            if ex.is_head:
                self._head_done(keep)
            return
        ex.status = status
        ex.resp_started = True
        down = ex.down
        close = not ex.keep_alive or down.eof
        parts = [status_line(status)]
        parts += lines
        self.chunked_out = False
        self.until_close = False
        if ex.is_head or status == 204 or status == 304:
            if ex.is_head and self.chunked_in:
                parts.append(b"transfer-encoding: chunked\r\n")
        elif self.chunked_in:
            if ex.http10:
                close = True  # HTTP/1.0 has no chunked coding: the body ends with the connection
            else:
                self.chunked_out = True
                parts.append(b"transfer-encoding: chunked\r\n")
        elif not self.has_cl:
            self.until_close = True
            close = True
        if close:
            parts.append(b"connection: close\r\n")
        elif ex.http10:
            parts.append(b"connection: keep-alive\r\n")
        parts.append(b"\r\n")
        ex.close_after = close
        self.out.append(join(parts))
        self.phase = _BODY
        if ex.is_head:
            self._head_done(keep)

    def _head_done(self, keep: bool) -> None:
        # httptools cannot be told a HEAD response has no body: finish here, fresh parser next.
        self.keep = keep
        self.phase = _DONE
        if self.mid:
            self.mid = False
            self.parser = HttpResponseParser(self)

    def on_body(self, data: bytes) -> None:
        if self.phase != _BODY:
            self.keep = False
            return
        if self.chunked_out:
            self.out += (b"%x\r\n" % len(data), data, b"\r\n")
        else:
            self.out.append(data)

    def on_message_complete(self) -> None:
        self.mid = False
        self._message_done(self.parser.should_keep_alive())

    def _message_done(self, keep: bool) -> None:
        if self.interim:
            self.interim = False
            return
        if self.phase == _SKIP:
            self.keep = keep
            self.phase = _DONE
            return
        if self.phase != _BODY:
            return  # the end of a HEAD response's head, already finished
        if self.chunked_out:
            self.out.append(last_chunk(self.trailers))
        self.keep = keep
        self.phase = _DONE
