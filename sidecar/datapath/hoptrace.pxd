# Cython declarations that compile sidecar/datapath/hoptrace.py (unchanged Python) into a C extension,
# see setup.py: the trace context's common cases and the metrics count as C functions (the layers and
# the downstream cimport them).

cimport cython
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from libc.string cimport memcpy

from sidecar.datapath.speedups cimport bucket_of, put_hex64


cdef int _DASH
@cython.locals(p="const unsigned char *", table=bytes, hexes="const unsigned char *", i=Py_ssize_t, c=int, zero=bint)
cpdef bint _trace_id_ok(bytes tp, Py_ssize_t start, Py_ssize_t end)
@cython.locals(p="const unsigned char *", table=bytes, hexes="const unsigned char *")
cpdef bint canonical_traceparent(bytes tp)
@cython.locals(sampled=bint, t="const unsigned char *", table=bytes, odd="const unsigned char *", value=bytes,
               w="char *")
cpdef tuple begin_trace(tracing, tp, b3)
@cython.locals(fields=tuple)
cdef tuple _hop_fields(tuple hop)
cdef Py_ssize_t _TRACE_ID_AT, _SPAN_ID_AT, _SAMPLED_AT
@cython.locals(template=bytes, src="const char *")
cdef bytes _traceparent_template()
cpdef trace_of(bytes tp, bytes traceparent)
@cython.locals(series=dict)
cpdef count_request(telemetry, reporter, source, source_version, destination, version, status, flags,
                    double ms, grpc_status=*, security=*)
