# Cython declarations that compile sidecar/datapath/layers/authorize.py (unchanged Python) into a C extension,
# see setup.py: the layer's hook overrides Layer's, and its decision is a C function.

from sidecar.datapath.exchange cimport Exchange
from sidecar.datapath.layers.base cimport Layer
from sidecar.datapath.respond cimport _Responder


cdef int NEXT, HELD
cpdef authorized(_Responder down, Exchange ex)


cdef class Authorize(Layer):
    cpdef int on_request(self, _Responder down, Exchange ex) except -1
