"""The mesh data plane: the per-container sidecar proxy."""

import os as _os

if _os.environ.get("MESHD_PURE_PYTHON"):
    # Run the data path from sidecar/proxy.py even where its compiled module is built (setup.py):
    # Python frames for py-spy, and the fallback's own tests (tests/adapters/test_pure_fallback.py).
    import importlib.machinery as _machinery
    import sys as _sys

    class _ProxySource:
        """Finds sidecar.proxy as its .py source, ahead of the compiled extension."""

        @staticmethod
        def find_spec(name, path=None, target=None):
            if name != "sidecar.proxy":
                return None
            finder = _machinery.FileFinder(_os.path.dirname(__file__),
                                           (_machinery.SourceFileLoader, _machinery.SOURCE_SUFFIXES))
            return finder.find_spec(name)

    _sys.meta_path.insert(0, _ProxySource)
