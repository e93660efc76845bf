# Cython declarations that compile sidecar/datapath/downstream.py (unchanged Python) into a C extension,
# see setup.py: the downstream's reading and parsing, C calls through its C struct (respond.pxd).

cimport cython
from sidecar.datapath.dispatch cimport _Dispatcher
from sidecar.datapath.exchange cimport Exchange, _Listener
from sidecar.datapath.http1 cimport connection_tokens, read_request_head
from sidecar.datapath.speedups cimport cut, head_end
from sidecar.datapath.wire cimport _send


cdef int _SLASH   # a C constant: compared with C chars, not as an object
cdef Py_ssize_t CHUNK_COST   # added to a chunk's size in the held / pending accounting
cdef int H_DROP, H_CONNECTION, H_TE, H_CL, H_HOST, H_EXPECT, H_SOURCE, H_SOURCE_VERSION, H_XFF
cdef int H_TRACEPARENT, H_B3, H_TRACESTATE, H_UPGRADE, H_GRPC_TIMEOUT   # header actions (C ints here)


cdef class _Downstream(_Dispatcher):
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
