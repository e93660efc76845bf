# Cython declarations that compile sidecar/datapath/dispatch.py (unchanged Python) into a C extension,
# see setup.py: the request path's methods of the downstream, C calls through its C struct.

cimport cython
from meshcore.lb cimport connect_tries
from sidecar.datapath.exchange cimport Exchange
from sidecar.datapath.http1 cimport put_fields
from sidecar.datapath.layers.base cimport Layer
from sidecar.datapath.respond cimport _Responder
from sidecar.datapath.speedups cimport join, monotonic
from sidecar.datapath.upstream cimport _Upstream
from sidecar.datapath.wire cimport _dec, _join_flags, _send, _write


cdef int NEXT, HELD   # a layer's verdict


cdef class _Dispatcher(_Responder):
    cpdef _dispatch(self, Exchange ex)
    @cython.locals(chain=tuple, n=Py_ssize_t, layer=Layer)
    cpdef _proceed(self, Exchange ex)
    cpdef int _routed(self, Exchange ex, target) except -1
    cpdef _end_try(self, Exchange ex)
    cpdef _response_head(self, Exchange ex, _Upstream up, int status)
    @cython.locals(up=_Upstream)
    cpdef _pick(self, Exchange ex)
    cpdef bytes _head(self, Exchange ex, cluster, host)
    cpdef _attach(self, Exchange ex, _Upstream up)
    cpdef _uncork(self, Exchange ex)
