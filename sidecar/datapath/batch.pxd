# Cython declarations that compile sidecar/datapath/batch.py (unchanged Python) into a C extension, see
# setup.py: the engine's writes call the batch's methods as C functions (a cimport).


cdef class WriteBatch:
    cdef public dict held
    cdef public bint armed, holding
    cdef public int countdown, singles
    cdef public object call_soon, _flush
    cdef public Py_ssize_t turns, writes

    cpdef write(self, transport, data)
    cpdef settle(self, transport)
    cpdef flush(self)
    cdef bint _arm(self) except -1
