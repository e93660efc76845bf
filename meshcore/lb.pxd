# Cython declarations that compile meshcore/lb.py (unchanged Python) where the data path is compiled
# (setup.py); elsewhere the .py runs. The compiled proxy calls connect_tries as a C function.

cpdef Py_ssize_t connect_tries(Py_ssize_t n_endpoints, Py_ssize_t max_tries=*)
