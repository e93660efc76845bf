# Cython declarations that compile sidecar/datapath/exchange.py (unchanged Python) into a C extension,
# see setup.py: an exchange is a C struct, its fields read and written without dictionary lookups.
# Every attribute stays `public`: gateway, mtls and the tests read and set them from Python.

from sidecar.datapath.layers.base cimport _Lane
from sidecar.datapath.respond cimport _Responder
from sidecar.datapath.speedups cimport monotonic
from sidecar.datapath.upstream cimport _Upstream


cdef class _Listener:
    cdef public object original_dst, sniff_timeout, loop
    cdef public object guard                                       # limits (sidecar.guard)
    cdef public Py_ssize_t max_head, max_fields, max_line, max_body


cdef class Exchange:
    cdef public _Responder down
    cdef public double start
    cdef public bytes method, target
    cdef public list lines
    cdef public object host, dest, xff, source, source_version, conn_tokens
    cdef public tuple added
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
    cdef public bytes traceparent
    cdef public tuple trace_fields
    cdef public Py_ssize_t at
    cdef public object route

    cpdef add_field(self, bytes name, bytes value)
    cpdef add_fields(self, tuple fields)
