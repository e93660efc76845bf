"""The data path's C build (setup.py): the compiled module is the one tested, and it is current."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

import meshcore.resilience as resilience
import sidecar.datapath.http1 as http1
import sidecar.datapath.speedups as speedups
import sidecar.datapath.downstream as downstream
import sidecar.datapath.engine as proxy
import sidecar.datapath.hoptrace as hoptrace
import sidecar.datapath.wire as wire
from bench.env import COMPILED_MODULES, ENGINE_MODULES, ROOT, orphan_extensions, stale_compiled_modules


def _compiled() -> bool:
    return not downstream.__file__.endswith(".py")


def test_ci_tests_the_compiled_data_path() -> None:
    """What the images run (their wheel is compiled by `make wheels`) is what CI tests."""
    if os.environ.get("CI") != "true" and not _compiled():
        pytest.skip("the data path's engine is not compiled here (no Cython or compiler at install)")
    assert _compiled(), f"sidecar.datapath.downstream loaded from {downstream.__file__}: run `make install`"
    # The engine's .pxd took effect: the per-request classes are C structs (typed attributes are getset
    # descriptors of an extension type, where the source's __slots__ make member descriptors; the
    # downstream's are its base's, _Responder).
    for cls, attr in ((proxy.Exchange, "status"), (proxy._Responder, "paused"), (proxy._Upstream, "phase")):
        assert type(cls.__dict__[attr]).__name__ == "getset_descriptor", (cls, attr)
    for cls in (proxy.Exchange, proxy._Responder, proxy._Dispatcher, proxy._Downstream, proxy._Upstream,
                proxy.ProxyState, proxy.Stack, proxy.Layer, proxy.TrafficBalance):
        assert not cls.__flags__ & (1 << 9), f"{cls.__name__} is a heap (Python) type"  # Py_TPFLAGS_HEAPTYPE
    # Compiled, heads that arrive whole in plain syntax are split by the proxy (test_whole_heads).
    assert proxy.WHOLE_HEADS is True
    # The byte helpers and the head grammar are compiled too, and the proxy calls them as C functions (a cimport, which
    # also makes a compiled proxy refuse to load beside the helpers' Python source).
    assert speedups.COMPILED is True and not speedups.__file__.endswith(".py"), speedups.__file__
    assert "head_end" in speedups.__pyx_capi__ and "put_hex64" in speedups.__pyx_capi__
    assert http1.__file__.endswith(".so") and "split_head_fields" in http1.__pyx_capi__, http1.__file__
    # The engine's modules call each other's helpers as C functions too (cimports across its modules).
    assert {"_send", "_join_flags", "_dec"} <= set(wire.__pyx_capi__)
    assert {"begin_trace", "count_request", "trace_of"} <= set(hoptrace.__pyx_capi__)
    # The breaker slot and the retry budget are the proxy's only implementation of them (no inlined
    # copies): compiled, meshcore.resilience's classes are extension types whose methods it calls in C.
    for cls in (resilience.CircuitBreaker, resilience.RetryBudget):
        assert not cls.__flags__ & (1 << 9), f"{cls.__name__} is a heap (Python) type"


def test_setup_compiles_the_modules_checked_for_staleness() -> None:
    """setup.py's COMPILED list is the one the stale check (bench.env.COMPILED_MODULES) covers."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    listed = next(ast.literal_eval(node.value) for node in tree.body
                  if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "COMPILED")
    assert sorted(listed) == sorted(COMPILED_MODULES)


def test_compiled_modules_are_not_older_than_their_sources() -> None:
    """An edit of a compiled module's .py or .pxd (or of a .pxd it cimports) without `make ext` would
    leave tests running the old code (tests/conftest.py rebuilds it before collecting, or stops)."""
    if not _compiled():
        pytest.skip("the data path's engine runs from its source")
    stale = stale_compiled_modules()
    assert not stale, f"{', '.join(stale)} older than their sources: run `make ext`"
    # An extension setup.py no longer builds (tests/conftest.py removes it) would shadow its .py.
    assert not orphan_extensions()


@pytest.mark.parametrize("name, sources", sorted(COMPILED_MODULES.items()))
def test_each_compiled_module_lists_sources_that_exist(name, sources) -> None:
    assert all((ROOT / src).is_file() for src in sources), sources
    assert sources[0] == name.replace(".", "/") + ".py"


@pytest.mark.parametrize("first", ENGINE_MODULES)
def test_any_engine_module_can_be_imported_first(first) -> None:
    """Compiled, the engine's modules initialise each other (their .pxd cimport each other's classes)
    in an order set by the one imported first; every order works (sidecar/datapath/engine.py)."""
    code = f"import sidecar.datapath.{first}; import sidecar.datapath.engine as e; print(e._Downstream.__name__)"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "_Downstream", run.stderr[-2000:]


def test_setup_compiles_every_engine_module() -> None:
    """Every module the engine re-exports is compiled (setup.py) and found as source when pure (sidecar/__init__)."""
    import sidecar
    from sidecar.datapath import engine

    modules = {f"sidecar.datapath.{name}" for name in ENGINE_MODULES}
    assert modules <= set(COMPILED_MODULES)
    packages = {name.partition(".")[0] for name in ENGINE_MODULES}   # "layers" for layers.base ...
    assert {name for name in vars(engine) if name in packages} == packages
    assert modules <= getattr(sidecar, "COMPILED_MODULES", modules)   # defined only with MESHD_PURE_PYTHON


def test_the_data_path_modules_load_from_one_shared_object() -> None:
    """setup.py links the modules under sidecar.datapath into sidecar/datapath/_compiled (one mapping,
    their code on fewer pages); sidecar/__init__.py finds each there by its own name."""
    import sidecar
    from bench.env import BUNDLE_NAME, BUNDLED, compiled_module

    tree = ast.parse((ROOT / "setup.py").read_text())
    bundle = next(ast.literal_eval(node.value) for node in tree.body
                  if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "BUNDLE")
    assert bundle == BUNDLE_NAME and sidecar.BUNDLED == BUNDLED
    assert BUNDLED == {name for name in COMPILED_MODULES if name.startswith("sidecar.datapath.")}
    if not _compiled():
        pytest.skip("the data path's engine runs from its source")
    assert str(compiled_module("sidecar.datapath.wire")) == sidecar.BUNDLE
    code = ("import sys, sidecar.datapath.engine, sidecar.datapath.pipes, meshcore.lb; "
            "print(sorted({m.__file__ for n, m in sys.modules.items() if n in __import__('sidecar').BUNDLED})); "
            "print(sum('_compiled' in line and 'r-xp' in line for line in open('/proc/self/maps')))")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    files, text_maps = run.stdout.splitlines()
    assert run.returncode == 0 and files == repr([sidecar.BUNDLE]), run.stderr[-2000:]
    assert text_maps == "1"                                      # loaded once, one code segment
