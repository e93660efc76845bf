# Cython declarations that compile sidecar/datapath/layers/retries.py (unchanged Python) into a C extension,
# see setup.py: the layer's hooks override Layer's; the lane's budget is meshcore.resilience's, C calls.

cimport cython
from sidecar.datapath.exchange cimport Exchange
from sidecar.datapath.layers.base cimport Layer, _Lane
from sidecar.datapath.respond cimport _Responder


cdef int NEXT


cdef class Retries(Layer):
    @cython.locals(lane=_Lane)
    cpdef int on_request(self, _Responder down, Exchange ex) except -1
    cpdef on_end(self, _Responder down, Exchange ex)
