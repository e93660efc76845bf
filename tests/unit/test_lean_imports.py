"""What the sidecar and gateway processes load: every module their cli imports (at the top and
inside `serve`), in a fresh interpreter, must not bring in aiohttp, structlog's console extras or
cryptography (bench/RESULTS.md: ~10 MiB, ~6 MiB and ~8 MiB of each sidecar's memory; the nodes' keys,
CSRs and certificate parsing run in a `certs.worker` child process)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("aiohttp", "rich", "colorama", "better_exceptions", "cryptography")


def modules_imported_by(path: Path) -> list[str]:
    """Absolute module names of every import in the file, function-level ones included."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


@pytest.mark.parametrize("cli", ["sidecar/cli.py", "gateway/cli.py"])
def test_process_imports_leave_out_aiohttp_console_extras_and_cryptography(cli):
    package = cli.split("/")[0]
    modules = [f"{package}.cli"] + [m for m in modules_imported_by(ROOT / cli)
                                    if m.split(".")[0] in ("sidecar", "gateway", "certs", "meshio", "meshcore")]
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules)
            + f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "sidecar.admin" in modules and "sidecar.control" in modules and "sidecar.tlsagent" in modules
    loaded = proc.stdout.split()
    assert not loaded, f"`{package} run` imports {', '.join(loaded)} (modules: {', '.join(modules)})"


def test_console_extras_stay_importable_for_others():
    """meshio.runtime hides rich & co. only while structlog imports: meshctl still gets rich."""
    code = "import meshio.runtime, sys; assert 'rich' not in sys.modules; import rich.console; print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
