"""sidecar.proxy twice: as imported (compiled when built) and its Python source under another module
name, so that one process can compare the two builds' head splitting on the same bytes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import sidecar.proxy as compiled

SOURCE = Path(__file__).resolve().parents[2] / "sidecar" / "proxy.py"
PURE_NAME = "sidecar._proxy_source"   # in the sidecar package, so its relative imports resolve


def _load_source() -> ModuleType:
    if PURE_NAME in sys.modules:
        return sys.modules[PURE_NAME]
    spec = importlib.util.spec_from_file_location(PURE_NAME, SOURCE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[PURE_NAME] = module
    spec.loader.exec_module(module)
    return module


pure = _load_source()
IS_COMPILED = compiled.COMPILED   # False without a build: then the differential compares the source with itself
assert not pure.COMPILED
