"""The data path's parts: the byte helpers (speedups), compiled with Cython where it can be."""
