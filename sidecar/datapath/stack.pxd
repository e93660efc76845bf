# Cython declarations that compile sidecar/datapath/stack.py (unchanged Python) into a C extension, see
# setup.py: a stack's fields are read-only C struct members, read several times per request.

from sidecar.datapath.layers.base cimport Balance
from sidecar.datapath.pools cimport UpstreamPools


cdef class Stack:
    cdef readonly object direction, reporter, source_name
    cdef readonly tuple chain, enders
    cdef readonly dict request_headers
    cdef readonly tuple header_table
    cdef readonly bytes mesh_headers
    cdef readonly Balance balance
    cdef readonly int max_tries
    cdef readonly double connect_timeout
    cdef readonly UpstreamPools pool
    cdef readonly object gauge
    cdef readonly bint breaker, outlier
    cdef readonly object h2, connect, connect_h2
