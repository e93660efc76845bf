# Cython declarations that compile sidecar/datapath/respond.py (unchanged Python) into a C extension, see
# setup.py: the downstream's state is a C struct (its subclasses _Dispatcher and _Downstream add methods
# only) and its methods call each other, the layers' and the helpers' as C functions.
# Every attribute stays `public`: gateway, mtls and the tests read and set them from Python.

cimport cython
from sidecar.datapath.exchange cimport Exchange, _Listener
from sidecar.datapath.http1 cimport put_fields, status_line
from sidecar.datapath.layers.base cimport Layer
from sidecar.datapath.stack cimport Stack
from sidecar.datapath.state cimport ProxyState
from sidecar.datapath.upstream cimport _Upstream
from sidecar.datapath.batch cimport WriteBatch
from sidecar.datapath.wire cimport _dec, _join_flags, _write


cdef class _Responder:
    cdef public ProxyState state
    cdef public WriteBatch writes
    cdef public Stack stack
    cdef public _Listener listener
    cdef public object loop, transport, parser, queue
    cdef public dict actions
    cdef public Exchange cur, last, cork
    cdef public int paused
    cdef public bint write_paused, closing, switched, eof, bad_after, advancing, feeding
    cdef public Py_ssize_t body_left
    cdef public bytes peer_ip
    cdef public tuple peer_fields
    cdef public object peer_identity, peer_service, orig_dst, raw, sniff_timer
    cdef public bytes early
    cdef public bint h2_sniff

    # _Dispatcher's (dispatch.pxd), declared here for the C calls of this class, the layers and the upstream
    cpdef _dispatch(self, Exchange ex)
    cpdef int _routed(self, Exchange ex, target) except -1
    cpdef _pick(self, Exchange ex)
    cpdef _response_head(self, Exchange ex, _Upstream up, int status)

    cpdef str caller_of(self, Exchange ex)
    cpdef _answer(self, Exchange ex, reply)
    cpdef _reply(self, Exchange ex, int status, flags, bytes body=*, bytes content_type=*, bint close=*,
                 tuple headers=*)
    cpdef bint _drop_upstream(self, Exchange ex) except -1
    cpdef _response_done(self, Exchange ex, _Upstream up, bint reusable, bint close)
    @cython.locals(layer=Layer)
    cpdef _end_layers(self, Exchange ex)
    @cython.locals(nxt=Exchange)
    cpdef _advance(self)
    cpdef _pause(self, int bit)
    cpdef _resume(self, int bit)
    cpdef _close(self)
