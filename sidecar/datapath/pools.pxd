# Cython declarations that compile sidecar/datapath/pools.py (unchanged Python) into a C extension, see
# setup.py: the pools are a C struct whose methods the downstream calls as C functions.

cimport cython
from sidecar.datapath.speedups cimport monotonic
from sidecar.datapath.upstream cimport _Upstream


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
