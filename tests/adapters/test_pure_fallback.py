"""The data path's pure-Python fallback (no compiler at install, or MESHD_PURE_PYTHON=1) passes the
engine's adapter tests too: the compiled module and its source must behave the same."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_proxy_engine_tests_pass_on_the_python_source() -> None:
    env = {**os.environ, "MESHD_PURE_PYTHON": "1"}
    which = subprocess.run([sys.executable, "-c", "import sidecar.datapath.downstream as p; print(p.__file__)"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert which.stdout.strip().endswith("sidecar/datapath/downstream.py"), which.stdout + which.stderr
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "tests/adapters/test_proxy.py", "tests/adapters/test_upgrade.py"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    tail = run.stdout[-3000:] + run.stderr[-2000:]
    assert run.returncode == 0, tail
    assert " passed" in run.stdout and " failed" not in run.stdout, tail
