"""The optional C build of the data path; everything else about the package is in pyproject.toml.

The engine's modules (sidecar/datapath/: wire.py ... downstream.py, see COMPILED) are compiled with Cython,
each with its declarations in the .pxd beside it (the per-request classes and the layers as C structs,
their methods calling each other as C functions, across modules by cimport): the same source, run as
machine code instead of bytecode. Those under sidecar.datapath are linked into one shared object,
sidecar/datapath/_compiled (BUNDLE), which sidecar/__init__.py imports them from. Where Cython or a C
compiler is missing, or with MESHD_PURE_PYTHON=1, the package installs without it (a py3-none-any
wheel) and runs them as Python, with the same behaviour.
"""

import os
import sys
from concurrent.futures import ThreadPoolExecutor

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# the engine's modules (sidecar/datapath/engine.py re-exports their names) from wire to downstream, the
# request path's layers one concern a module (sidecar/datapath/layers/, base first)
COMPILED = ["meshcore.lb", "meshcore.resilience", "sidecar.datapath.speedups", "sidecar.datapath.http1",
            "sidecar.datapath.batch", "sidecar.datapath.wire", "sidecar.datapath.hoptrace", "sidecar.datapath.pools",
            "sidecar.datapath.state",
            "sidecar.datapath.layers.base", "sidecar.datapath.layers.metrics",
            "sidecar.datapath.layers.trace", "sidecar.datapath.layers.ratelimit",
            "sidecar.datapath.layers.authorize", "sidecar.datapath.layers.route", "sidecar.datapath.layers.traffic",
            "sidecar.datapath.layers.rules", "sidecar.datapath.layers.timeout", "sidecar.datapath.layers.fault",
            "sidecar.datapath.layers.breaker", "sidecar.datapath.layers.retries", "sidecar.datapath.layers.mirror",
            "sidecar.datapath.layers.balance", "sidecar.datapath.stack", "sidecar.datapath.exchange",
            "sidecar.datapath.upstream", "sidecar.datapath.respond", "sidecar.datapath.dispatch",
            "sidecar.datapath.downstream", "sidecar.datapath.pipes"]
BUNDLE = "sidecar.datapath._compiled"   # the modules of COMPILED under sidecar.datapath, one shared object
DIRECTIVES = {
    "language_level": 3,
    "annotation_typing": False,   # types come from the .pxd only; annotations stay documentation
    "infer_types": True,          # locals assigned from typed attributes get their type
    "boundscheck": True,          # an index out of range raises IndexError, as in Python
    "wraparound": True,           # the source slices with negative indices
    "cdivision": False,           # Python's division and modulo semantics
    "binding": True,              # module functions keep their signatures (introspection, tests)
}


class OptionalBuildExt(build_ext):
    """A failed compile leaves the pure-Python module in place instead of failing the install; the
    modules compile in parallel, one per CPU, unless `-j` says otherwise."""

    def finalize_options(self) -> None:
        super().finalize_options()
        if not self.parallel:
            self.parallel = os.cpu_count() or 1

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - no compiler, no headers: the .py runs instead
            print(f"meshd: C build skipped ({exc}); the data path runs as Python", file=sys.stderr)

    def build_extension(self, ext: Extension) -> None:
        if len(ext.sources) > 1:   # the bundle: its C files compile in parallel too
            self.compiler.compile = _in_parallel(self.compiler.compile, self.parallel)
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            print(f"meshd: C build of {ext.name} failed ({exc}); it runs as Python", file=sys.stderr)


def _in_parallel(compile_sources, workers: int):
    """A compiler's compile(sources, ...) that compiles each source on its own, `workers` at a time."""
    def compile_each(sources, *args, **kwargs):
        with ThreadPoolExecutor(max(1, workers)) as pool:
            return [obj for objs in pool.map(lambda src: compile_sources([src], *args, **kwargs), sources)
                    for obj in objs]
    return compile_each


def ext_modules() -> list:
    if os.environ.get("MESHD_PURE_PYTHON"):
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        print("meshd: Cython is not installed; the data path runs as Python", file=sys.stderr)
        return []
    # -g0: no debug sections (7.8 MB of them with the interpreter's default flags)
    exts = [Extension(name, [name.replace(".", "/") + ".py"], extra_compile_args=["-g0"])
            for name in COMPILED]
    built = cythonize(exts, compiler_directives=DIRECTIVES, quiet=True, nthreads=os.cpu_count() or 1)
    package = BUNDLE.rpartition(".")[0] + "."
    bundled = [ext for ext in built if ext.name.startswith(package)]
    return [*(ext for ext in built if ext not in bundled),
            Extension(BUNDLE, [src for ext in bundled for src in ext.sources], extra_compile_args=["-g0"])]


setup(ext_modules=ext_modules(), cmdclass={"build_ext": OptionalBuildExt})
