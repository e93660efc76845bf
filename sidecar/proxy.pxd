# Cython declarations that compile sidecar/proxy.py (unchanged Python) into a C extension, see
# setup.py. The .py stays the source and runs as it is where no compiled module was built; these
# declarations only make the per-request classes C structs (typed attributes read and written
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
cdef int H_TRACEPARENT, H_B3, H_TRACESTATE, H_UPGRADE   # header actions (also in the module dict)
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
                    double ms)
cpdef _dec(dict counts, key)
cpdef route_by_host(_Downstream down, Exchange ex)
cpdef limit_inbound(_Downstream down, Exchange ex)
cpdef balance_least_request(ProxyState state, cluster, exclude, _ex=*)
cpdef balance_traffic(ProxyState state, cluster, exclude, Exchange ex=*)
cpdef caller_of(_Downstream down, Exchange ex)
cpdef _authorized(_Downstream down, Exchange ex, route)


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
    cdef public object _watchdog, inbound_limiter, jwt
    cdef public object egress   # sidecar.egress.EgressControl
    cdef public object limits   # meshcore.limits.Limits
    cdef public dict lanes

    cpdef watch(self, _Upstream up)


cdef class _Lane:
    cdef public object tr, cluster, rules, all, timeout, fault, mirror, retry_on, per_try_timeout
    cdef public CircuitBreaker breaker
    cdef public RetryBudget budget
    cdef public object outlier


cdef class Stack:
    cdef readonly object direction, reporter, source_name, route
    cdef readonly dict request_headers
    cdef readonly tuple header_table
    cdef readonly bytes mesh_headers
    cdef readonly object balance
    cdef readonly int max_tries
    cdef readonly double connect_timeout
    cdef readonly UpstreamPools pool
    cdef readonly object gauge, ratelimit
    cdef readonly bint traffic
    cdef readonly object rules, mirror, fault
    cdef readonly bint breaker, retries, timeout, outlier


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
    @cython.locals(lane=_Lane)
    cpdef _traffic_layers(self, Exchange ex, cluster)
    cpdef _admit(self, Exchange ex)
    cpdef _end_try(self, Exchange ex)
    cpdef _response_head(self, Exchange ex, _Upstream up, int status)
    cpdef _traffic_done(self, Exchange ex)
    @cython.locals(up=_Upstream)
    cpdef _pick(self, Exchange ex)
    cpdef bytes _head(self, Exchange ex, cluster, host)
    cpdef _attach(self, Exchange ex, _Upstream up)
    cpdef _uncork(self, Exchange ex)
    cpdef _reply(self, Exchange ex, int status, flags, bytes body=*, bytes content_type=*, bint close=*,
                 bytes headers=*)
    cpdef _response_done(self, Exchange ex, _Upstream up, bint reusable, bint close)
    cpdef _finish_metrics(self, Exchange ex)
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
