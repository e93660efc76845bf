"""The proxy's whole-head functions twice: as imported (compiled when built) and from their Python
source under other module names, so that one process can compare the two builds on the same bytes.

The head grammar lives in sidecar.datapath.http1 over the byte helpers of sidecar.datapath.speedups;
the header tables and limits in sidecar.proxy. Each twin is a view with the names the fuzz checks call.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import sidecar.datapath.http1 as compiled_http1
import sidecar.datapath.speedups as compiled_speedups
import sidecar.proxy as proxy

DATAPATH = Path(__file__).resolve().parents[2] / "sidecar" / "datapath"


def _load(name: str, path: Path, replace: dict[str, ModuleType] | None = None) -> ModuleType:
    """Exec a source file as module `name`; `replace` stands in for modules it imports meanwhile."""
    if name in sys.modules:
        return sys.modules[name]
    saved = {k: sys.modules.get(k) for k in (replace or {})}
    sys.modules.update(replace or {})
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return module


def _view(name: str, http1: ModuleType, speedups: ModuleType, compiled: bool) -> SimpleNamespace:
    return SimpleNamespace(
        __name__=name, COMPILED=compiled, WHOLE_HEADS=proxy.WHOLE_HEADS if compiled else False,
        MAX_HEAD=proxy.MAX_HEAD, RESPONSE_HEADERS=proxy.RESPONSE_HEADERS,
        INBOUND_REQUEST_HEADERS=proxy.INBOUND_REQUEST_HEADERS,
        head_end=speedups.head_end, name_table=speedups.name_table, line_end=http1.line_end,
        split_request_line=http1.split_request_line, split_status_line=http1.split_status_line,
        split_head_fields=http1.split_head_fields, _keep_alive=http1.keep_alive)


_pure_speedups = _load("sidecar.datapath._speedups_source", DATAPATH / "speedups.py")
_pure_http1 = _load("sidecar.datapath._http1_source", DATAPATH / "http1.py",
                    replace={"sidecar.datapath.speedups": _pure_speedups})

IS_COMPILED = proxy.COMPILED   # False without a build: then the differential compares the source with itself
compiled = _view("compiled", compiled_http1, compiled_speedups, proxy.COMPILED)
pure = _view("pure", _pure_http1, _pure_speedups, False)
assert not hasattr(_pure_speedups, "__pyx_capi__") and not hasattr(_pure_http1, "__pyx_capi__")
