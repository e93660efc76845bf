# Cython declarations that compile sidecar/datapath/layers.py (unchanged Python) into a C extension, see
# setup.py: the layers are C structs and their hooks C calls through the chain (_Dispatcher._proceed,
# _Responder._finish_metrics); the decisions they call are C functions.

cimport cython
from meshcore.lb cimport connect_tries
from meshcore.resilience cimport CircuitBreaker, RetryBudget
from sidecar.datapath.exchange cimport Exchange
from sidecar.datapath.hoptrace cimport begin_trace
from sidecar.datapath.respond cimport _Responder
from sidecar.datapath.state cimport ProxyState
from sidecar.datapath.wire cimport _join_flags, caller_of


cdef int NEXT, HELD
cpdef route_by_host(_Responder down, Exchange ex)
cpdef limit_inbound(_Responder down, Exchange ex)
cpdef balance_least_request(ProxyState state, cluster, exclude, _ex=*)
cpdef balance_traffic(ProxyState state, cluster, exclude, Exchange ex=*)
cpdef authorized(_Responder down, Exchange ex)


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


cdef class StartTrace(Layer):
    cpdef int on_request(self, _Responder down, Exchange ex) except -1


cdef class RateLimit(Layer):
    cpdef int on_request(self, _Responder down, Exchange ex) except -1


cdef class Authorize(Layer):
    cpdef int on_request(self, _Responder down, Exchange ex) except -1


cdef class Route(Layer):
    cdef readonly object fn
    cpdef int on_request(self, _Responder down, Exchange ex) except -1


cdef class RouteByHost(Route):
    cpdef int on_request(self, _Responder down, Exchange ex) except -1


cdef class RouteTo(Route):
    cdef readonly object cluster
    cpdef int on_request(self, _Responder down, Exchange ex) except -1


cdef class Traffic(Layer):
    @cython.locals(lane=_Lane, state=ProxyState, lanes=dict)
    cpdef int on_request(self, _Responder down, Exchange ex) except -1


cdef class Rules(Layer):
    cdef readonly object choose
    @cython.locals(lane=_Lane)
    cpdef int on_request(self, _Responder down, Exchange ex) except -1


cdef class Timeout(Layer):
    @cython.locals(lane=_Lane)
    cpdef int on_request(self, _Responder down, Exchange ex) except -1
    cpdef on_end(self, _Responder down, Exchange ex)


cdef class Fault(Layer):
    cdef readonly object fault
    @cython.locals(lane=_Lane)
    cpdef int on_request(self, _Responder down, Exchange ex) except -1
    cpdef on_end(self, _Responder down, Exchange ex)


cdef class Breaker(Layer):
    @cython.locals(lane=_Lane)
    cpdef int on_request(self, _Responder down, Exchange ex) except -1
    cpdef on_end(self, _Responder down, Exchange ex)


cdef class Retries(Layer):
    @cython.locals(lane=_Lane)
    cpdef int on_request(self, _Responder down, Exchange ex) except -1
    cpdef on_end(self, _Responder down, Exchange ex)


cdef class Mirror(Layer):
    cdef readonly object choose
    @cython.locals(lane=_Lane)
    cpdef int on_request(self, _Responder down, Exchange ex) except -1


cdef class Balance(Layer):
    cdef readonly int max_tries
    cdef readonly bint outlier
    cpdef int on_request(self, _Responder down, Exchange ex) except -1
    cpdef pick(self, ProxyState state, cluster, exclude, ex=*)


cdef class LeastRequest(Balance):
    pass


cdef class TrafficBalance(Balance):
    cpdef pick(self, ProxyState state, cluster, exclude, ex=*)
