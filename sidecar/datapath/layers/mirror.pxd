# Cython declarations that compile sidecar/datapath/layers/mirror.py (unchanged Python) into a C extension,
# see setup.py: the layer's hook overrides Layer's; the lane is a C struct (base.pxd).

cimport cython
from sidecar.datapath.exchange cimport Exchange
from sidecar.datapath.layers.base cimport Layer, _Lane
from sidecar.datapath.respond cimport _Responder


cdef int NEXT


cdef class Mirror(Layer):
    cdef readonly object choose
    @cython.locals(lane=_Lane)
    cpdef int on_request(self, _Responder down, Exchange ex) except -1
