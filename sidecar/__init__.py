"""The mesh data plane: the per-container sidecar proxy."""

import os as _os

if _os.environ.get("MESHD_PURE_PYTHON"):
    # Run the data path from its .py sources even where their compiled modules are built (setup.py):
    # Python frames for py-spy, and the fallback's own tests (tests/adapters/test_pure_fallback.py).
    import importlib.machinery as _machinery
    import sys as _sys

    COMPILED_MODULES = frozenset((*(f"sidecar.datapath.{name}" for name in (
        "wire", "hoptrace", "pools", "state", "layers.base", "layers.metrics", "layers.trace", "layers.ratelimit", "layers.authorize",
        "layers.route", "layers.traffic", "layers.rules", "layers.timeout", "layers.fault", "layers.breaker",
        "layers.retries", "layers.mirror", "layers.balance", "stack", "exchange", "upstream", "respond", "dispatch",
        "downstream", "pipes", "http1", "speedups")), "meshcore.lb", "meshcore.resilience"))   # setup.py's COMPILED

    class _PureSource:
        """Finds each module of COMPILED_MODULES as its .py source, ahead of the compiled extension."""

        @staticmethod
        def find_spec(name, path=None, target=None):
            if name not in COMPILED_MODULES or not path:
                return None
            finder = _machinery.FileFinder(path[0], (_machinery.SourceFileLoader, _machinery.SOURCE_SUFFIXES))
            return finder.find_spec(name)

    _sys.meta_path.insert(0, _PureSource)
