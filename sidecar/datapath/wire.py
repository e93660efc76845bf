"""What the data path's modules share: limits, Envoy response flags, header action tables, local
replies (`Reply`), the layer verdicts (NEXT, HELD), read-pause bits and small byte helpers."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from meshcore.grpc import is_grpc_content_type
from meshcore.resilience import DI, FI, RL, UO, URX, UT
from meshcore.tracecontext import B3_MULTI, B3_SINGLE, TRACEPARENT, TRACESTATE

from ..telemetry import NO_FLAGS
from .http1 import (
    H_B3, H_CL, H_DROP, H_EXPECT, H_FLAGS, H_GRPC_STATUS, H_GRPC_TIMEOUT, H_HOST, H_SOURCE, H_SOURCE_VERSION,
    H_TRACEPARENT, H_TRACESTATE, HEADER_ACTIONS, HOP_BY_HOP, HeaderLines,
)
from .batch import WriteBatch
from .speedups import join, name_table

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

# The header actions (sidecar.datapath.http1) are C ints where headers are taken once compiled
# (downstream.pxd, upstream.pxd), so that taking a header is a C switch and not a chain of object
# comparisons; the module dict gets them here too, for importers (the gateway's table, tests).
globals().update(HEADER_ACTIONS)
_SLASH = 47   # "/", the first byte of an origin-form target (a C int in downstream.pxd)

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

# Reasons the downstream's reading is paused (bits).
P_UPSTREAM = 1    # the upstream's write buffer is full
P_PENDING = 2     # request body buffered while connecting
P_PIPELINE = 4    # a pipelined request waits for the one before it
P_STOPPED = 8     # a malformed request: read nothing more

# A layer's verdict (sidecar.datapath.layers): C ints where compared (their .pxd).
NEXT = 0   # the next layer runs
HELD = 1   # the layer answered the request, or holds it until a timer of its own resumes the chain


@dataclass(frozen=True, slots=True)
class Reply:
    """A layer's decision to answer locally (e.g. the gateway's 404)."""

    status: int
    flags: str
    body: bytes = b""
    content_type: bytes = TEXT
    headers: tuple = ()       # (name, value) fields added to the answer (e.g. x-mesh-denied, retry-after)


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


def _send(writes: WriteBatch | None, transport: asyncio.Transport, parts: list | tuple) -> None:
    """Write `parts` in order through `writes` (None: at once): one write of their join when small
    (see JOIN_MAX), else, after what the batch holds for the transport, writelines."""
    if len(parts) == 1:
        data = parts[0]
    else:
        size = 0
        for part in parts:  # not sum(map(len, parts)): a loop of C additions once compiled
            size += len(part)
        if size > JOIN_MAX:
            if writes is not None:
                writes.settle(transport)
            transport.writelines(parts)
            return
        data = join(parts, size)
    _write(writes, transport, data)


def _write(writes: WriteBatch | None, transport: asyncio.Transport, data: bytes) -> None:
    """Write one bytes object through `writes` (None: at once)."""
    if writes is None:
        transport.write(data)
    else:
        writes.write(transport, data)


def _dec(counts: dict, key: Any) -> None:
    n = counts.get(key, 0) - 1
    if n > 0:
        counts[key] = n
    else:
        counts.pop(key, None)
