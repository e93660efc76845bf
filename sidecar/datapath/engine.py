"""The data path: an HTTP/1.1 forwarding engine on asyncio Protocols and httptools parsers, its
names re-exported here from the modules that hold them (one concern each).

Used by the sidecar's outbound (15001) and inbound (15006) listeners and by the gateway.

Shape of one request (one `Exchange`, exchange.py): `_Downstream` (downstream.py, the client side)
parses the head, then runs its `Stack.chain` (stack.py), a tuple of `Layer` objects (layers/*.py), in
order (`_Dispatcher._proceed`, dispatch.py); the builders in stack.py (`outbound_chain`,
`inbound_chain`; the gateway's in gateway.server) write the order, and `python -m
sidecar.datapath.chain` prints it:

    outbound: trace context -> route by host -> traffic state -> rules + split -> timeout -> fault
              -> circuit breaker -> retries + budget -> mirror -> balance + connect (pool)
    inbound:  trace context -> rate limit -> authorize -> route to the local app -> balance + connect

A layer's on_request goes on (NEXT) or answers / holds the request (HELD; a fault delay resumes the
chain after it); the layers that hold per-request state release it in on_end when the exchange
ends. The last layer picks an endpoint and connects (connect-retry on others:
meshcore.lb.connect_tries; a pooled keep-alive connection (pools.py) or a new one). `_Upstream`
(upstream.py, the server side) streams the response back; its head first goes past the retry
decision (dispatch.py: a retried answer is read and dropped, not sent). How an exchange ends (local
replies, metrics, the next pipelined request, a lost upstream) is `_Responder`'s (respond.py), the
base of _Dispatcher and _Downstream; what every listener shares is `ProxyState` (state.py).

Bodies are streamed both ways (Content-Length as is, chunked re-encoded from httptools' de-chunked
`on_body`; trailers dropped). Backpressure: a side whose peer transport's write buffer is above its
high-water mark stops reading until `resume_writing`. Hop-by-hop headers (RFC 9110 7.6.1) are
dropped while parsing. Compiled (WHOLE_HEADS), a head that arrives whole in plain syntax, with a
Content-Length body or none, is split in one pass (scan_fields) instead of by httptools' per-header
callbacks; every other message (chunked, Upgrade, CONNECT, 1xx, split across reads...) is httptools'.
Per request the Python work is: the bytes of each field (a name that may have an action is compared
with the few action names of its length and first letter), one join for the head, one dict lookup +
inc/observe for metrics; the trace context object only when a span or log line needs it
(hoptrace.py). Shared constants, header tables and byte helpers are wire.py's.

Non-HTTP traffic (services with protocol "tcp", passthrough of unknown destinations, CONNECT) is
plain byte forwarding between two `_Pipe` protocols (pipes.py).

Compiled, these modules' .pxd files cimport each other's classes, so importing any one of them
initialises the others first, in an order that depends on which came first: at module level they
import from each other only classes (set before a module's code runs); their constants and
functions come from wire and hoptrace, which import none of them (tests/unit/test_compiled.py
imports each module first).
"""

from __future__ import annotations

from . import batch, dispatch, downstream, exchange, hoptrace, layers, pools, respond, stack, state, upstream, wire

for _module in (batch, wire, hoptrace, pools, state, *layers.MODULES, stack, exchange, upstream, respond, dispatch, downstream):
    globals().update({name: value for name, value in vars(_module).items() if not name.startswith("__")})
del _module
