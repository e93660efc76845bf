# Cython declarations that compile sidecar/datapath/wire.py (unchanged Python) into a C extension, see
# setup.py: the helpers the engine's other modules call per request are C functions for them (a cimport).

cimport cython
from sidecar.datapath.batch cimport WriteBatch
from sidecar.datapath.speedups cimport join


cpdef _join_flags(have, new)
@cython.locals(size=Py_ssize_t)
cpdef _send(WriteBatch writes, transport, parts)
cpdef _write(WriteBatch writes, transport, data)
cpdef _dec(dict counts, key)
