# Cython declarations that compile sidecar/datapath/layers/balance.py (unchanged Python) into a C extension,
# see setup.py: the picks override Balance's (base.pxd; the dispatcher calls them per try, a C call) and
# the balancing decisions are C functions.

from sidecar.datapath.exchange cimport Exchange
from sidecar.datapath.layers.base cimport Balance
from sidecar.datapath.speedups cimport monotonic
from sidecar.datapath.state cimport ProxyState


cpdef balance_least_request(ProxyState state, cluster, exclude, _ex=*)
cpdef balance_traffic(ProxyState state, cluster, exclude, Exchange ex=*)


cdef class LeastRequest(Balance):
    cpdef pick(self, ProxyState state, cluster, exclude, ex=*)


cdef class TrafficBalance(Balance):
    cpdef pick(self, ProxyState state, cluster, exclude, ex=*)
