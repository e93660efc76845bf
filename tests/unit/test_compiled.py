"""The data path's C build (setup.py): the compiled module is the one tested, and it is current."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import sidecar.proxy as proxy
from bench.env import COMPILED_SOURCES, ROOT

SOURCES = tuple(ROOT / src for src in COMPILED_SOURCES)


def _compiled() -> bool:
    return not proxy.__file__.endswith(".py")


def test_ci_tests_the_compiled_data_path() -> None:
    """What the images run (their wheel is compiled by `make wheels`) is what CI tests."""
    if os.environ.get("CI") != "true" and not _compiled():
        pytest.skip("sidecar.proxy is not compiled here (no Cython or compiler at install)")
    assert _compiled(), f"sidecar.proxy loaded from {proxy.__file__}: run `make install` to compile it"
    # proxy.pxd took effect: the per-request classes are C structs (typed attributes are getset
    # descriptors of an extension type, where the source's __slots__ make member descriptors).
    for cls, attr in ((proxy.Exchange, "status"), (proxy._Downstream, "paused"), (proxy._Upstream, "phase")):
        assert type(cls.__dict__[attr]).__name__ == "getset_descriptor", (cls, attr)
        assert not cls.__flags__ & (1 << 9), f"{cls.__name__} is a heap (Python) type"  # Py_TPFLAGS_HEAPTYPE
    # Compiled, heads that arrive whole in plain syntax are split by the proxy (test_whole_heads).
    assert proxy.WHOLE_HEADS is True


def test_compiled_module_is_not_older_than_its_sources() -> None:
    """An edit of proxy.py or proxy.pxd without `make ext` would leave tests running the old code."""
    if not _compiled():
        pytest.skip("sidecar.proxy runs from its source")
    built = Path(proxy.__file__).stat().st_mtime
    stale = [src.name for src in SOURCES if src.stat().st_mtime > built]
    assert not stale, f"{proxy.__file__} is older than {', '.join(stale)}: run `make ext`"
