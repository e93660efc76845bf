# Cython declarations that compile sidecar/datapath/layers/traffic.py (unchanged Python) into a C extension,
# see setup.py: the layer's hook overrides Layer's; the lane is a C struct (base.pxd).

cimport cython
from sidecar.datapath.exchange cimport Exchange
from sidecar.datapath.layers.base cimport Layer, _Lane
from sidecar.datapath.respond cimport _Responder
from sidecar.datapath.state cimport ProxyState


cdef int NEXT


cdef class Traffic(Layer):
    @cython.locals(lane=_Lane, state=ProxyState, lanes=dict)
    cpdef int on_request(self, _Responder down, Exchange ex) except -1
