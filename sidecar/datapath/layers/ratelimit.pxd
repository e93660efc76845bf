# Cython declarations that compile sidecar/datapath/layers/ratelimit.py (unchanged Python) into a C extension,
# see setup.py: the layer's hook overrides Layer's, and its decision is a C function.

from sidecar.datapath.exchange cimport Exchange
from sidecar.datapath.layers.base cimport Layer
from sidecar.datapath.respond cimport _Responder
from sidecar.datapath.speedups cimport monotonic


cdef int NEXT, HELD
cpdef limit_inbound(_Responder down, Exchange ex)


cdef class RateLimit(Layer):
    cpdef int on_request(self, _Responder down, Exchange ex) except -1
