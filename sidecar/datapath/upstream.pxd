# Cython declarations that compile sidecar/datapath/upstream.py (unchanged Python) into a C extension,
# see setup.py: the upstream connection is a C struct whose methods call each other, the downstream's
# and the helpers' as C functions. Every attribute stays `public` (tests, pipes read them).

cimport cython
from sidecar.datapath.exchange cimport Exchange
from sidecar.datapath.http1 cimport connection_tokens, read_response_head, status_line
from sidecar.datapath.pools cimport UpstreamPools
from sidecar.datapath.respond cimport _Responder
from sidecar.datapath.speedups cimport cut, head_end, join, monotonic
from sidecar.datapath.wire cimport _send


cdef int H_CL, H_CONNECTION, H_TE, H_FLAGS, H_UPGRADE, H_GRPC_STATUS   # header actions (C ints here)


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
    @cython.locals(ex=Exchange, down=_Responder, parts=list, lines=list)
    cpdef _status_head(self, int status, bint keep)
    cpdef _head_done(self, bint keep)
    cpdef _message_done(self, bint keep)
    cpdef on_headers_complete(self)
    cpdef on_body(self, data)
    cpdef on_message_complete(self)
