# Cython declarations that compile sidecar/datapath/layers/base.py (unchanged Python) into a C extension,
# see setup.py: the layers' hooks and the balance layer's pick are C calls through the chain
# (_Dispatcher._proceed, _Responder._end_layers, the stack's balance); every layer's .pxd cimports
# its base class from here and, where it reads a destination's traffic, _Lane.

from meshcore.lb cimport connect_tries
from meshcore.resilience cimport CircuitBreaker, RetryBudget
from sidecar.datapath.exchange cimport Exchange
from sidecar.datapath.respond cimport _Responder
from sidecar.datapath.state cimport ProxyState


cdef int NEXT, HELD


cdef class _Lane:
    cdef public object tr, cluster, rules, all, timeout, fault, mirror, retry_on, per_try_timeout
    cdef public CircuitBreaker breaker
    cdef public RetryBudget budget
    cdef public object outlier


cdef class Layer:
    cdef readonly str name
    cdef readonly bint ends
    cpdef int on_request(self, _Responder down, Exchange ex) except -1
    cpdef on_end(self, _Responder down, Exchange ex)
    cpdef int failed(self, _Responder down, Exchange ex) except -1


cdef class Balance(Layer):
    cdef readonly int max_tries
    cdef readonly bint outlier
    cpdef int on_request(self, _Responder down, Exchange ex) except -1
    cpdef pick(self, ProxyState state, cluster, exclude, ex=*)
