# Cython declarations that compile sidecar/datapath/state.py (unchanged Python) into a C extension, see
# setup.py: the node's shared state is a C struct, its fields read per request without dictionary lookups.
# Every attribute stays `public`: gateway, mtls and the tests read and set them from Python.

from sidecar.datapath.batch cimport WriteBatch
from sidecar.datapath.speedups cimport monotonic
from sidecar.datapath.pools cimport UpstreamPools
from sidecar.datapath.upstream cimport _Upstream


cdef class ProxyState:
    cdef public object service, version, table, telemetry, tls, authz
    cdef public dict host_index
    cdef public object host_index_of
    cdef public double connect_timeout
    cdef public object random
    cdef public dict in_flight
    cdef public UpstreamPools pools
    cdef public WriteBatch writes
    cdef public Py_ssize_t connect_failures
    cdef public double eject_seconds
    cdef public dict ejected
    cdef public object traffic, vips, mirrors, tracing, tcp_info, probe
    cdef public double undelivered_after, dead_peer_after
    cdef public Py_ssize_t undelivered_total, probed_total
    cdef public set _watched
    cdef public object _watchdog, inbound_limiter
    cdef public object egress   # sidecar.egress.EgressControl
    cdef public object namespace   # the node's project (bare names resolve there first)
    cdef public object limits   # meshcore.limits.Limits
    cdef public dict lanes

    cpdef watch(self, _Upstream up)
