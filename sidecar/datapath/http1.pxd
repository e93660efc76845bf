# Cython declarations that compile sidecar/datapath/http1.py (unchanged Python) into a C extension,
# see setup.py; the engine's .pxd files cimport these functions, so the engine calls them as C functions.

cimport cython

from sidecar.datapath.speedups cimport decimal_value, scan_fields

cdef int _CR, _LF, _SP, _SLASH   # C constants: compared with C chars, not as objects
cdef int H_DROP, H_CONNECTION, H_TE, H_CL, H_HOST, H_EXPECT, H_SOURCE, H_SOURCE_VERSION, H_XFF, H_FLAGS
cdef int H_TRACEPARENT, H_B3, H_TRACESTATE, H_UPGRADE, H_GRPC_STATUS, H_GRPC_TIMEOUT   # header actions (also in HEADER_ACTIONS)

@cython.locals(lines=dict)
cpdef bytes status_line(int code)
@cython.locals(p="const unsigned char *", sp=Py_ssize_t, i=Py_ssize_t, t=Py_ssize_t, c=int)
cpdef tuple split_request_line(bytes data, Py_ssize_t pos, Py_ssize_t eol)
@cython.locals(p="const unsigned char *")
cpdef Py_ssize_t line_end(bytes data, Py_ssize_t pos, Py_ssize_t end)
@cython.locals(p="const unsigned char *", tables=bytes, vchar="const unsigned char *", status=int,
               i=Py_ssize_t, c=int, http10=bint)
cpdef tuple split_status_line(bytes data, Py_ssize_t pos, Py_ssize_t eol)
@cython.locals(fields=list, size=Py_ssize_t, k=Py_ssize_t, a=int)
cpdef tuple split_head_fields(bytes data, Py_ssize_t eol, Py_ssize_t end, dict names, tuple table, bint response)
cpdef bint keep_alive(bint http10, connection)
@cython.locals(eol=Py_ssize_t, line=tuple, head=tuple)
cpdef tuple read_request_head(bytes data, Py_ssize_t pos, Py_ssize_t end, dict names, tuple table)
@cython.locals(eol=Py_ssize_t, line=tuple, head=tuple, status=int)
cpdef tuple read_response_head(bytes data, Py_ssize_t end, dict names, tuple table, bint head_request)
cpdef connection_tokens(bytes value, into)
cpdef put_fields(list parts, fields)
