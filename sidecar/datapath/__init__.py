"""The data path: the engine's modules (wire ... downstream, re-exported by engine), the request path's
layers (layers/), HTTP/2 (h2*), listeners and peers; compiled with Cython where it can be, into one shared
object, _compiled (setup.py; sidecar/__init__.py imports the modules from it)."""
