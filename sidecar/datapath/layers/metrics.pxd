# Cython declarations that compile sidecar/datapath/layers/metrics.py (unchanged Python) into a C extension,
# see setup.py: the layer's end overrides Layer's (a C call from _Responder._end), and counting a request
# is a C call into hoptrace.

cimport cython
from sidecar.datapath.exchange cimport Exchange
from sidecar.datapath.hoptrace cimport count_request, trace_of
from sidecar.datapath.layers.base cimport Layer
from sidecar.datapath.respond cimport _Responder
from sidecar.datapath.speedups cimport monotonic


cdef Py_ssize_t _SAMPLED_AT   # where the value of this hop's traceparent says "sampled"


cdef class Metrics(Layer):
    @cython.locals(traceparent=bytes)
    cpdef on_end(self, _Responder down, Exchange ex)


@cython.locals(sent=bytes)
cpdef tuple metric_labels(_Responder down, Exchange ex)
