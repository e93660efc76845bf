"""The data path's parts, compiled with Cython where it can be: the byte helpers (speedups) and the
HTTP/1 head grammar (http1)."""
