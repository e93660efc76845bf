# Cython declarations that compile sidecar/datapath/speedups.py (unchanged Python) into a C extension,
# see setup.py. Other compiled modules `cimport` these functions: their calls are C calls through the
# module's function table, with C arguments (no tuple, no boxed integers).

cimport cython
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from cpython.object cimport PyObject
from cpython.sequence cimport PySequence_Fast_GET_SIZE, PySequence_Fast_ITEMS
from libc.string cimport memchr, memcpy
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

cdef int _CR, _LF, _SP, _HTAB, _COLON, _SLASH   # C constants: compared with C chars, not as objects

@cython.locals(tables=bytes, tables2=bytes, tchar="const unsigned char *", vchar="const unsigned char *",
               p="const unsigned char *", s=Py_ssize_t, e=Py_ssize_t, n=Py_ssize_t, ns=Py_ssize_t,
               run=Py_ssize_t, c=int, out=list, slot=tuple, k=Py_ssize_t, j=Py_ssize_t,
               q="const unsigned char *")
cpdef list scan_fields(bytes data, Py_ssize_t i, Py_ssize_t end, dict names, tuple table, bint runs)
@cython.locals(p="const char *", hit="const char *", n=Py_ssize_t, i=Py_ssize_t, last=Py_ssize_t)
cpdef Py_ssize_t head_end(bytes data, Py_ssize_t start, Py_ssize_t stop)
@cython.locals(p="const unsigned char *")
cpdef bytes cut(bytes data, Py_ssize_t start, Py_ssize_t stop)
@cython.locals(n=Py_ssize_t, p="const unsigned char *", size="long long", i=Py_ssize_t, c=int)
cpdef long long decimal_value(bytes value)
cdef extern from "Python.h":
    # The bytes macros on a borrowed pointer (cpython.bytes declares them on objects, which Cython
    # reference-counts): join reads a list's or tuple's array of parts in place.
    bint bytes_exact "PyBytes_CheckExact"(PyObject *o)
    Py_ssize_t bytes_size "PyBytes_GET_SIZE"(PyObject *o)
    const char *bytes_data "PyBytes_AS_STRING"(PyObject *o)

@cython.locals(n=Py_ssize_t, i=Py_ssize_t, m=Py_ssize_t, at=Py_ssize_t, total=Py_ssize_t, out=bytes, w="char *",
               items="PyObject **")
cpdef bytes join(parts, Py_ssize_t size=*)
@cython.locals(digits=bytes, d="const char *", k=int)
cdef void put_hex64(char *w, unsigned long long v)
@cython.locals(bounds=tuple, i=Py_ssize_t, n=Py_ssize_t, bound=double)
cpdef Py_ssize_t bucket_of(double ms)
cpdef double monotonic()
