"""The mesh data plane: the per-container sidecar proxy."""

import importlib.machinery as _machinery
import importlib.util as _util
import os as _os
import sys as _sys

# The data path's compiled modules (setup.py's COMPILED under sidecar.datapath) are linked into one
# shared object, sidecar/datapath/_compiled.<ext suffix>: one mapping, their code on fewer pages (a
# module per object cost the pair ~5% more CPU per request for the same instructions, docs/PERFORMANCE.md
# decision 14). Each module keeps its own PyInit_<name> there, so each is imported by its usual name.
BUNDLED = frozenset(f"sidecar.datapath.{name}" for name in (
    "batch", "wire", "hoptrace", "pools", "state", "layers.base", "layers.metrics", "layers.trace", "layers.ratelimit",
    "layers.authorize", "layers.route", "layers.traffic", "layers.rules", "layers.timeout", "layers.fault",
    "layers.breaker", "layers.retries", "layers.mirror", "layers.balance", "stack", "exchange", "upstream",
    "respond", "dispatch", "downstream", "pipes", "http1", "speedups"))
BUNDLE = _os.path.join(_os.path.dirname(__file__), "datapath", "_compiled" + _machinery.EXTENSION_SUFFIXES[0])

if _os.environ.get("MESHD_PURE_PYTHON"):
    # Run the data path from its .py sources even where their compiled modules are built (setup.py):
    # Python frames for py-spy, and the fallback's own tests (tests/adapters/test_pure_fallback.py).
    COMPILED_MODULES = BUNDLED | {"meshcore.lb", "meshcore.resilience"}   # setup.py's COMPILED

    class _PureSource:
        """Finds each module of COMPILED_MODULES as its .py source, ahead of the compiled extension."""

        @staticmethod
        def find_spec(name, path=None, target=None):
            if name not in COMPILED_MODULES or not path:
                return None
            finder = _machinery.FileFinder(path[0], (_machinery.SourceFileLoader, _machinery.SOURCE_SUFFIXES))
            return finder.find_spec(name)

    _sys.meta_path.insert(0, _PureSource)
elif _os.path.isfile(BUNDLE):
    class _Bundled:
        """Finds each module of BUNDLED in BUNDLE (the loader looks up its PyInit_<name> there)."""

        @staticmethod
        def find_spec(name, path=None, target=None):
            if name not in BUNDLED:
                return None
            return _util.spec_from_file_location(name, BUNDLE, loader=_machinery.ExtensionFileLoader(name, BUNDLE))

    _sys.meta_path.insert(0, _Bundled)
