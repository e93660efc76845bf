# Cython declarations that compile sidecar/datapath/layers/fault.py (unchanged Python) into a C extension,
# see setup.py: the layer's hooks override Layer's; the lane is a C struct (base.pxd).

cimport cython
from sidecar.datapath.exchange cimport Exchange
from sidecar.datapath.layers.base cimport Layer, _Lane
from sidecar.datapath.respond cimport _Responder
from sidecar.datapath.wire cimport _join_flags


cdef int NEXT, HELD


cdef class Fault(Layer):
    cdef readonly object fault
    @cython.locals(lane=_Lane)
    cpdef int on_request(self, _Responder down, Exchange ex) except -1
    cpdef on_end(self, _Responder down, Exchange ex)
