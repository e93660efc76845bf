# Cython declarations that compile sidecar/datapath/layers/route.py (unchanged Python) into a C extension,
# see setup.py: the route layers' hooks override Layer's, and route_by_host is a C function.

from sidecar.datapath.exchange cimport Exchange
from sidecar.datapath.layers.base cimport Layer
from sidecar.datapath.respond cimport _Responder


cpdef route_by_host(_Responder down, Exchange ex)


cdef class Route(Layer):
    cdef readonly object fn
    cpdef int on_request(self, _Responder down, Exchange ex) except -1


cdef class RouteByHost(Route):
    cpdef int on_request(self, _Responder down, Exchange ex) except -1


cdef class RouteTo(Route):
    cdef readonly object cluster
    cpdef int on_request(self, _Responder down, Exchange ex) except -1
