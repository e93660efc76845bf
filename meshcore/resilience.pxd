# Cython declarations that compile meshcore/resilience.py (unchanged Python) into a C extension where
# the data path is compiled (setup.py); elsewhere the .py runs. The per-request primitives are C
# structs here, so the compiled proxy's calls of their methods are C calls (sidecar/datapath/layers.pxd, dispatch.pxd).

cdef class RetryBudget:
    cdef public object ratio, min_concurrency
    cdef public Py_ssize_t active_requests, active_retries

    cpdef start_request(self)
    cpdef finish_request(self)


cdef class CircuitBreaker:
    cdef public object max_connections, max_pending, max_requests
    cdef public Py_ssize_t connections, pending, requests, overflows_total

    cpdef bint try_acquire_request(self)
    cpdef release_request(self)
