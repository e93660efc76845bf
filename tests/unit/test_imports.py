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


def imports_of(path: Path, module_level: bool = False, submodules: bool = False) -> list[tuple[int, str]]:
    """(line, absolute dotted module) for every import in the file, relative imports resolved.

    module_level: only the imports that run when the module is imported (not those inside functions,
    nor under `if TYPE_CHECKING:`). submodules: `from pkg import name` also yields `pkg.name`, which
    is the module imported when `name` is a submodule.
    """
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    pkg_parts = parts[:-1]  # the package the module lives in (also right for __init__.py)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in (_run_at_import(tree.body) if module_level else ast.walk(tree)):
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
            if submodules:
                found.extend((node.lineno, f"{module}.{alias.name}") for alias in node.names
                             if alias.name != "*")
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _run_at_import(body: list[ast.stmt]):
    """The import statements executed when a module body runs: function bodies and
    `if TYPE_CHECKING:` blocks excluded, class bodies and if/try/with/loop blocks included."""
    for stmt in body:
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            yield stmt
        elif isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        elif isinstance(stmt, ast.If):
            if not _is_type_checking(stmt.test):
                yield from _run_at_import(stmt.body)
            yield from _run_at_import(stmt.orelse)
        elif isinstance(stmt, ast.Try):
            yield from _run_at_import(stmt.body)
            for handler in stmt.handlers:
                yield from _run_at_import(handler.body)
            yield from _run_at_import(stmt.orelse)
            yield from _run_at_import(stmt.finalbody)
        elif isinstance(stmt, (ast.ClassDef, ast.With, ast.For, ast.While)):
            yield from _run_at_import(stmt.body)
            yield from _run_at_import(getattr(stmt, "orelse", []))


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


@pytest.mark.parametrize("source, expected", [
    ("import os\ndef f():\n    import sidecar\n", ["os"]),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import sidecar\nelse:\n    import json\n",
     ["typing", "json"]),
    ("import typing\nif typing.TYPE_CHECKING:\n    import sidecar\n", ["typing"]),
    ("try:\n    import uvloop\nexcept ImportError:\n    import asyncio\n", ["uvloop", "asyncio"]),
    ("class A:\n    import json\n    def f(self):\n        import os\n", ["json"]),
])
def test_imports_of_module_level(tmp_path, monkeypatch, source, expected):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    path = tmp_path / "meshd" / "app.py"
    path.parent.mkdir(parents=True)
    path.write_text(source)
    assert [m for _, m in imports_of(path, module_level=True)] == expected


def test_imports_of_submodules(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    path = tmp_path / "meshd" / "app.py"
    path.parent.mkdir(parents=True)
    path.write_text("from meshcore import labels, snapshot as snap\n")
    assert [m for _, m in imports_of(path, submodules=True)] == [
        "meshcore", "meshcore.labels", "meshcore.snapshot"]
