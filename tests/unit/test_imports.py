"""The import rules of docs/DESIGN.md, checked by parsing the source with `ast` (nothing is imported)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("meshcore", "meshproc", "certs", "meshd", "sidecar", "gateway", "meshctl")
STDLIB = frozenset(sys.stdlib_module_names)


def package_files(package: str) -> list[Path]:
    base = ROOT / package
    return sorted(p for p in base.rglob("*.py") if "__pycache__" not in p.parts) if base.is_dir() else []


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, absolute dotted module) for every import in the file, relative imports resolved."""
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    pkg_parts = parts[:-1]  # the package the module lives in (also right for __init__.py)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg_parts[: len(pkg_parts) - (node.level - 1)] if node.level - 1 <= len(pkg_parts) else []
                module = ".".join(base + ([node.module] if node.module else []))
                if node.module is None:  # `from . import x`: x may be a submodule
                    found.extend((node.lineno, f"{module}.{alias.name}" if module else alias.name)
                                 for alias in node.names)
                    continue
            else:
                module = node.module or ""
            found.append((node.lineno, module))
    return found


def top(module: str) -> str:
    return module.split(".", 1)[0]


def all_imports(package: str):
    for path in package_files(package):
        for line, module in imports_of(path):
            yield path.relative_to(ROOT), line, module


def violations(package: str, allowed=None, forbidden=()) -> list[str]:
    bad = []
    for rel, line, module in all_imports(package):
        name = top(module)
        if name in forbidden or (allowed is not None and not allowed(name)):
            bad.append(f"{rel}:{line}: imports {module}")
    return bad


def test_meshcore_imports_only_stdlib_and_itself():
    bad = violations("meshcore", allowed=lambda name: name in STDLIB or name == "meshcore")
    assert not bad, "meshcore must import only the standard library and itself:\n" + "\n".join(bad)


@pytest.mark.parametrize("package, forbidden", [
    ("meshd", ("sidecar", "gateway")),
    ("sidecar", ("meshd", "gateway")),
    ("gateway", ("meshd",)),
    ("meshctl", ("meshd", "sidecar", "gateway", "certs")),
    ("certs", ("meshd", "sidecar", "gateway", "meshctl")),
    ("meshcore", ("meshd", "sidecar", "gateway", "meshctl", "certs", "meshproc")),
    ("meshproc", ("meshd", "sidecar", "gateway", "meshctl", "certs")),
])
def test_forbidden_imports(package, forbidden):
    bad = violations(package, forbidden=forbidden)
    assert not bad, f"{package} must not import {', '.join(forbidden)}:\n" + "\n".join(bad)


def _has_code(path: Path) -> bool:
    body = ast.parse(path.read_text(encoding="utf-8")).body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        body = body[1:]  # the docstring
    return bool(body)


def test_gateway_reuses_sidecar():
    modules = [p for p in package_files("gateway") if _has_code(p)]
    if not modules:
        pytest.skip("gateway/ has no modules yet (only a docstring __init__.py); nothing to check")
    users = [str(rel) for rel, _, module in all_imports("gateway") if top(module) == "sidecar"]
    assert users, ("gateway must reuse the sidecar's layers (DESIGN.md), but no module of "
                   f"{[str(p.relative_to(ROOT)) for p in modules]} imports sidecar")


# ---- the checker itself --------------------------------------------------------------------------

@pytest.mark.parametrize("rel, source, expected", [
    ("meshd/app.py", "import os, json.decoder", ["os", "json.decoder"]),
    ("meshd/app.py", "from . import store", ["meshd.store"]),
    ("meshd/app.py", "from .store import Store", ["meshd.store"]),
    ("meshd/sub/x.py", "from ..control import y", ["meshd.control"]),
    ("meshd/__init__.py", "from .cli import main", ["meshd.cli"]),
    ("meshd/app.py", "from sidecar.engine import Engine", ["sidecar.engine"]),
    ("meshd/app.py", "def f():\n    import sidecar\n", ["sidecar"]),
])
def test_imports_of_resolves(tmp_path, monkeypatch, rel, source, expected):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    path = tmp_path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)
    assert [m for _, m in imports_of(path)] == expected
