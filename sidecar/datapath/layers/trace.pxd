# Cython declarations that compile sidecar/datapath/layers/trace.py (unchanged Python) into a C extension,
# see setup.py: the layer's hook overrides Layer's (a C call), begin_trace is a C call into hoptrace.

from sidecar.datapath.exchange cimport Exchange
from sidecar.datapath.hoptrace cimport begin_trace
from sidecar.datapath.layers.base cimport Layer
from sidecar.datapath.respond cimport _Responder


cdef int NEXT


cdef class StartTrace(Layer):
    cpdef int on_request(self, _Responder down, Exchange ex) except -1
