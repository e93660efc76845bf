# Cython declarations that compile sidecar/datapath/engine.py (unchanged Python) into a C extension, see
# setup.py. The .py stays the source and runs as it is where no compiled module was built; these
# declarations only make the per-request classes and the layers C structs (typed attributes read and written
# without dictionary lookups) and let their methods call each other as C functions.
# Every attribute stays `public`: gateway, mtls and the tests read and set them from Python.

cimport cython
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from libc.string cimport memcpy

from sidecar.datapath.http1 cimport connection_tokens, read_request_head, read_response_head, status_line
from meshcore.lb cimport connect_tries
from meshcore.resilience cimport CircuitBreaker, RetryBudget
from sidecar.datapath.speedups cimport bucket_of, cut, head_end, join, put_hex64


cdef int _SLASH   # a C constant: compared with C chars, not as an object
cdef Py_ssize_t CHUNK_COST   # added to a chunk's size in the held / pending accounting
cdef int H_DROP, H_CONNECTION, H_TE, H_CL, H_HOST, H_EXPECT, H_SOURCE, H_SOURCE_VERSION, H_XFF, H_FLAGS
cdef int H_TRACEPARENT, H_B3, H_TRACESTATE, H_UPGRADE, H_GRPC_STATUS, H_GRPC_TIMEOUT   # header actions (also in the module dict)
cpdef _join_flags(have, new)
@cython.locals(size=Py_ssize_t)
cpdef _send(transport, parts)
cdef int _DASH
@cython.locals(p="const unsigned char *", table=bytes, hexes="const unsigned char *", i=Py_ssize_t, c=int, zero=bint)
cpdef bint _trace_id_ok(bytes tp, Py_ssize_t start, Py_ssize_t end)
@cython.locals(p="const unsigned char *", table=bytes, hexes="const unsigned char *")
cpdef bint canonical_traceparent(bytes tp)
@cython.locals(sampled=bint, t="const unsigned char *", table=bytes, odd="const unsigned char *", line=bytes,
               w="char *")
cpdef tuple begin_trace(tracing, tp, b3)
cdef Py_ssize_t _TRACE_ID_AT, _SPAN_ID_AT, _SAMPLED_AT
@cython.locals(template=bytes, src="const char *")
cdef bytes _traceparent_template()
cpdef trace_of(bytes tp, bytes header)
@cython.locals(series=dict)
cpdef count_request(telemetry, reporter, source, source_version, destination, version, status, flags,
                    double ms, grpc_status=*, security=*)
cpdef _dec(dict counts, key)
cpdef route_by_host(_Downstream down, Exchange ex)
cpdef limit_inbound(_Downstream down, Exchange ex)
cpdef balance_least_request(ProxyState state, cluster, exclude, _ex=*)
cpdef balance_traffic(ProxyState state, cluster, exclude, Exchange ex=*)
cpdef caller_of(_Downstream down, Exchange ex)
cpdef authorized(_Downstream down, Exchange ex)
cdef int NEXT, HELD


cdef class UpstreamPools:
    cdef public object max_idle, idle_timeout
    cdef public dict idle, live
    cdef public Py_ssize_t count, opened
    cdef public object _timer

    @cython.locals(lst=list, up=_Upstream, now=double)
    cpdef _Upstream acquire(self, object key)
    @cython.locals(lst=list)
    cpdef release(self, _Upstream up)
    cpdef register(self, _Upstream up)
    cpdef unregister(self, _Upstream up)
    cpdef discard(self, _Upstream up)


cdef class ProxyState:
    cdef public object service, version, table, telemetry, tls, authz
    cdef public dict host_index
    cdef public object host_index_of
    cdef public double connect_timeout
    cdef public object random
    cdef public dict in_flight
    cdef public UpstreamPools pools
    cdef public Py_ssize_t connect_failures
    cdef public double eject_seconds
    cdef public dict ejected
    cdef public object traffic, vips, mirrors, tracing, tcp_info, probe
    cdef public double undelivered_after, dead_peer_after
    cdef public Py_ssize_t undelivered_total, probed_total
    cdef public set _watched
    cdef public object _watchdog, inbound_limiter
    cdef public object egress   # sidecar.egress.EgressControl
    cdef public object namespace   # the node's project (bare names resolve there first)
    cdef public object limits   # meshcore.limits.Limits
    cdef public dict lanes

    cpdef watch(self, _Upstream up)


cdef class _Lane:
    cdef public object tr, cluster, rules, all, timeout, fault, mirror, retry_on, per_try_timeout
    cdef public CircuitBreaker breaker
    cdef public RetryBudget budget
    cdef public object outlier


# The layers: their hooks are C calls through the chain (_Downstream._proceed, _finish_metrics).
cdef class Layer:
    cdef readonly str name
    cdef readonly bint ends
    cpdef int on_request(self, _Downstream down, Exchange ex) except -1
    cpdef on_end(self, _Downstream down, Exchange ex)


cdef class StartTrace(Layer):
    cpdef int on_request(self, _Downstream down, Exchange ex) except -1


cdef class RateLimit(Layer):
    cpdef int on_request(self, _Downstream down, Exchange ex) except -1


cdef class Authorize(Layer):
    cpdef int on_request(self, _Downstream down, Exchange ex) except -1


cdef class Route(Layer):
    cdef readonly object fn
    cpdef int on_request(self, _Downstream down, Exchange ex) except -1


cdef class RouteByHost(Route):
    cpdef int on_request(self, _Downstream down, Exchange ex) except -1


cdef class RouteTo(Route):
    cdef readonly object cluster
    cpdef int on_request(self, _Downstream down, Exchange ex) except -1


cdef class Traffic(Layer):
    @cython.locals(lane=_Lane, state=ProxyState, lanes=dict)
    cpdef int on_request(self, _Downstream down, Exchange ex) except -1


cdef class Rules(Layer):
    cdef readonly object choose
    @cython.locals(lane=_Lane)
    cpdef int on_request(self, _Downstream down, Exchange ex) except -1


cdef class Timeout(Layer):
    @cython.locals(lane=_Lane)
    cpdef int on_request(self, _Downstream down, Exchange ex) except -1
    cpdef on_end(self, _Downstream down, Exchange ex)


cdef class Fault(Layer):
    cdef readonly object fault
    @cython.locals(lane=_Lane)
    cpdef int on_request(self, _Downstream down, Exchange ex) except -1
    cpdef on_end(self, _Downstream down, Exchange ex)


cdef class Breaker(Layer):
    @cython.locals(lane=_Lane)
    cpdef int on_request(self, _Downstream down, Exchange ex) except -1
    cpdef on_end(self, _Downstream down, Exchange ex)


cdef class Retries(Layer):
    @cython.locals(lane=_Lane)
    cpdef int on_request(self, _Downstream down, Exchange ex) except -1
    cpdef on_end(self, _Downstream down, Exchange ex)


cdef class Mirror(Layer):
    cdef readonly object choose
    @cython.locals(lane=_Lane)
    cpdef int on_request(self, _Downstream down, Exchange ex) except -1


cdef class Balance(Layer):
    cdef readonly int max_tries
    cdef readonly bint outlier
    cpdef int on_request(self, _Downstream down, Exchange ex) except -1
    cpdef pick(self, ProxyState state, cluster, exclude, ex=*)


cdef class LeastRequest(Balance):
    pass


cdef class TrafficBalance(Balance):
    cpdef pick(self, ProxyState state, cluster, exclude, ex=*)


cdef class Stack:
    cdef readonly object direction, reporter, source_name
    cdef readonly tuple chain, enders
    cdef readonly dict request_headers
    cdef readonly tuple header_table
    cdef readonly bytes mesh_headers
    cdef readonly Balance balance
    cdef readonly int max_tries
    cdef readonly double connect_timeout
    cdef readonly UpstreamPools pool
    cdef readonly object gauge
    cdef readonly bint breaker, outlier
    cdef readonly object h2, connect, connect_h2


cdef class _Listener:
    cdef public object original_dst, sniff_timeout, loop
    cdef public object guard                                       # limits (sidecar.guard)
    cdef public Py_ssize_t max_head, max_fields, max_line, max_body


cdef class Exchange:
    cdef public _Downstream down
    cdef public double start
    cdef public bytes method, target
    cdef public list lines
    cdef public object host, dest, xff, extra, source, source_version, conn_tokens
    cdef public Py_ssize_t head_size
    cdef public bint http10, keep_alive, chunked, body, expect, is_head, is_connect, bad
    cdef public bint head_done, req_done, dispatched
    cdef public object cluster, index, key, excluded
    cdef public int tries_left
    cdef public _Upstream up
    cdef public object pending, held
    cdef public Py_ssize_t pending_bytes, held_bytes
    cdef public bint reused, fresh_retry, got_body
    cdef public int status
    cdef public object flags
    cdef public bint resp_started, resp_done, discard, close_after, dead
    cdef public Py_ssize_t fields, body_seen   # limits
    cdef public object upgrade                 # the Upgrade of a request switching protocols
    cdef public object trailers                # a chunked request body's trailer lines
    cdef public object grpc_status             # the answer's grpc-status (str), or None
    cdef public object grpc_timeout            # the request's grpc-timeout (bytes), or None
    cdef public object traffic, subset, mirror
    cdef public bint admitted, budgeted, keep_held, resend
    cdef public int attempt
    cdef public object retry_on
    cdef public bint in_retry
    cdef public object timer, try_timer, wait
    cdef public int fault_abort
    cdef public object tp, ts, b3, trace
    cdef public _Lane lane
    cdef public bytes trace_headers
    cdef public Py_ssize_t at
    cdef public object route


cdef class _Downstream:
    cdef public ProxyState state
    cdef public Stack stack
    cdef public _Listener listener
    cdef public object loop, transport, parser, queue
    cdef public dict actions
    cdef public Exchange cur, last, cork
    cdef public int paused
    cdef public bint write_paused, closing, switched, eof, bad_after, advancing, feeding
    cdef public Py_ssize_t body_left
    cdef public bytes peer_ip, peer_xfcc
    cdef public object peer_identity, peer_service, orig_dst, raw, sniff_timer
    cdef public bytes early
    cdef public bint h2_sniff

    @cython.locals(ex=Exchange)
    cpdef data_received(self, data)
    @cython.locals(last=Exchange)
    cpdef _feed(self, data)
    @cython.locals(pos=Py_ssize_t, n=Py_ssize_t, left=Py_ssize_t, take=Py_ssize_t, end=Py_ssize_t,
                   taken=Py_ssize_t, last=Exchange)
    cpdef bytes _feed_whole(self, bytes data)
    @cython.locals(fields=list, size=Py_ssize_t, k=Py_ssize_t, ex=Exchange, head=tuple, keep=bint, http10=bint,
                   lim=_Listener)
    cpdef Py_ssize_t _whole_head(self, bytes data, Py_ssize_t pos, Py_ssize_t end)
    @cython.locals(a=int)
    cpdef _header(self, Exchange ex, bytes name, bytes value, act)
    cpdef bint _headers_done(self, Exchange ex, bytes method, bint keep_alive, bint http10, bint upgrade)
    @cython.locals(ex=Exchange)
    cpdef on_message_begin(self)
    @cython.locals(ex=Exchange)
    cpdef on_url(self, url)
    @cython.locals(ex=Exchange)
    cpdef on_header(self, name, value)
    cpdef on_headers_complete(self)
    @cython.locals(ex=Exchange)
    cpdef on_body(self, data)
    @cython.locals(ex=Exchange)
    cpdef on_message_complete(self)
    cpdef _forward_body(self, Exchange ex, tuple parts, Py_ssize_t size)
    cpdef _dispatch(self, Exchange ex)
    @cython.locals(chain=tuple, n=Py_ssize_t, layer=Layer)
    cpdef _proceed(self, Exchange ex)
    cpdef _answer(self, Exchange ex, reply)
    cpdef int _routed(self, Exchange ex, target) except -1
    cpdef _end_try(self, Exchange ex)
    cpdef _response_head(self, Exchange ex, _Upstream up, int status)
    @cython.locals(up=_Upstream)
    cpdef _pick(self, Exchange ex)
    cpdef bytes _head(self, Exchange ex, cluster, host)
    cpdef _attach(self, Exchange ex, _Upstream up)
    cpdef _uncork(self, Exchange ex)
    cpdef _reply(self, Exchange ex, int status, flags, bytes body=*, bytes content_type=*, bint close=*,
                 bytes headers=*)
    cpdef _response_done(self, Exchange ex, _Upstream up, bint reusable, bint close)
    @cython.locals(layer=Layer)
    cpdef _finish_metrics(self, Exchange ex)
    cpdef tuple metric_labels(self, Exchange ex)
    @cython.locals(nxt=Exchange)
    cpdef _advance(self)
    cpdef _pause(self, int bit)
    cpdef _resume(self, int bit)
    cpdef _close(self)


cdef class _Upstream:
    cdef public UpstreamPools pool
    cdef public object key, transport, parser
    cdef public Exchange exchange
    cdef public double idle_since
    cdef public bint pooled, closed, got_bytes
    cdef public int phase
    cdef public list lines
    cdef public bint chunked_in, has_cl
    cdef public object conn_tokens
    cdef public bint chunked_out, until_close, keep, interim, read_paused, write_paused
    cdef public Py_ssize_t uses
    cdef public list out
    cdef public object peer_flags
    cdef public bint skip
    cdef public object breaker
    cdef public double connected_at, sent_at
    cdef public bint doomed, probing
    cdef public bint mid
    cdef public Py_ssize_t body_left
    cdef public bint whole_keep
    cdef public object upgrade   # the response's Upgrade (a 101)
    cdef public object trailers  # a chunked response body's trailer lines
    cdef public object grpc_status   # the response's grpc-status (bytes; head or trailers), or None

    cpdef attach(self, Exchange ex)
    cpdef close(self)
    cpdef pause_reading(self)
    cpdef resume_reading(self)
    @cython.locals(ex=Exchange, out=list)
    cpdef data_received(self, data)
    @cython.locals(left=Py_ssize_t, pos=Py_ssize_t, end=Py_ssize_t, n=Py_ssize_t, take=Py_ssize_t)
    cpdef bytes _feed_whole(self, bytes data, Exchange ex)
    @cython.locals(fields=list, size=Py_ssize_t, k=Py_ssize_t, status=int, keep=bint, lines=list, head=tuple)
    cpdef Py_ssize_t _whole_head(self, bytes data, Py_ssize_t end, Exchange ex)
    cpdef on_message_begin(self)
    cpdef on_header(self, name, value)
    @cython.locals(a=int)
    cpdef _header(self, bytes name, bytes value, act)
    @cython.locals(ex=Exchange, down=_Downstream, parts=list, lines=list)
    cpdef _status_head(self, int status, bint keep)
    cpdef _head_done(self, bint keep)
    cpdef _message_done(self, bint keep)
    cpdef on_headers_complete(self)
    cpdef on_body(self, data)
    cpdef on_message_complete(self)
