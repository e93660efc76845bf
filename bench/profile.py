"""py-spy profiles of the mesh sidecars under load: a flame graph per process, plus a summary of
where the CPU goes (native stacks: Python, httptools, uvloop, OpenSSL, system calls)."""

from __future__ import annotations

import re
import subprocess
import time
from collections import Counter
from pathlib import Path

from . import env

IDLE_LEAVES = ("epoll_wait", "epoll_pwait")
# A thread blocked on a lock (the span exporter between batches): idle, though its leaf is an
# unnamed libc frame (the futex wait).
IDLE_WAITS = ("PyThread_acquire_lock_timed",)
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


TRACING = ("tracing, access log (meshcore/tracecontext.py, meshcore/otlp.py, meshcore/spans.py, "
           "meshcore/telemetry_settings.py, sidecar/tracing.py, sidecar/otel.py, structlog)")
TRACING_FILES = ("meshcore/tracecontext.py", "meshcore/otlp.py", "meshcore/spans.py", "meshcore/telemetry_settings.py",
                 "sidecar/tracing.py", "sidecar/otel.py", "opentelemetry/", "structlog/")
# the compiled data path: its C source or extension module (sidecar/proxy before it became sidecar/datapath)
_COMPILED = re.compile(r"sidecar/(proxy\.c|datapath/\w+\.(c|cpython-))")
COMPILED = "data path, compiled (sidecar/datapath: Cython)"
H2_LIBRARY = "HTTP/2 framing (h2, hpack, hyperframe: pure Python)"
# py-spy names a library's file from its package on ("hpack/table.py"); a full path has the package too
H2_LIBRARIES = tuple(f"{sep}{pkg}/" for pkg in ("h2", "hpack", "hyperframe") for sep in ("(", "/"))
H2_BRIDGE = "HTTP/2 bridge (sidecar/datapath/h2*.py)"


def _owner(frame: str) -> str | None:
    """The cost category a frame stands for, or None for CPython internals (look further up)."""
    if _COMPILED.search(frame):
        # the compiled data path (setup.py): its frames name the extension module or its C source;
        # first, or its callbacks' time would go to httptools, the native frame above them
        return COMPILED
    if "libssl" in frame or "libcrypto" in frame or "_ssl.c" in frame or "ssl.py" in frame:
        return "TLS (OpenSSL, ssl module)"
    if "(libc.so" in frame or "[vdso]" in frame:
        return "system calls / libc (loopback TCP in the kernel)"
    if "llhttp" in frame or "parser.c" in frame or "url_parser" in frame:
        return "httptools (C parser)"
    if "SSLProtocol" in frame:
        return "uvloop SSLProtocol (TLS record plumbing)"
    if any(f in frame for f in ("(loop.c", "(core.c", "(stream.c", "(linux.c", "(tcp.c", "(handle.c")):
        return "uvloop / libuv"
    if any(lib in frame for lib in H2_LIBRARIES):
        return H2_LIBRARY
    if "sidecar/datapath/h2" in frame:
        return H2_BRIDGE
    if "sidecar/telemetry.py" in frame:
        return "metrics (sidecar/telemetry.py)"
    if "sidecar/proxy.py" in frame:
        return "proxy Python (sidecar/proxy.py)"
    if any(x in frame for x in TRACING_FILES):
        return TRACING
    if "sidecar/routing.py" in frame or "meshcore/" in frame:
        return "routing / lb Python"
    if ".py" in frame:
        return "other Python (asyncio, stdlib)"
    return None


def _short(frame: str) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    f = m.group("file").rpartition("-packages/")[2]   # a library's path from its package on
    for prefix in ("sidecar/", "meshcore/", "asyncio/", "uvloop/"):
        i = f.find(prefix)
        if i >= 0:
            f = f[i:]
    return f"{m.group('func')} ({f})"


SYSCALLS = "system calls / libc (loopback TCP in the kernel)"
PYTHON_OWNERS = ("proxy Python (sidecar/proxy.py)", "routing / lb Python", "metrics (sidecar/telemetry.py)",
                 TRACING, "other Python (asyncio, stdlib)", H2_LIBRARY, H2_BRIDGE)


def summarize_raw(text: str, top: int = 15) -> dict:
    """Collapsed stacks (`py-spy record --format raw --native`) -> shares of busy samples.

    `categories`: every busy sample by the innermost frame that names a cost (see _owner).
    `user_categories`: the same without system calls, i.e. how user-space time splits.
    `top_python_self`: Python functions where user-space Python time is spent (their own code and
    the CPython work it causes), `top_python_inclusive`: sidecar/meshcore functions on the stack."""
    cats: Counter = Counter()
    leaf: Counter = Counter()
    py_self: Counter = Counter()
    py_incl: Counter = Counter()
    busy = idle = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        if any(x in frames[-1] for x in IDLE_LEAVES) or any(w in f for f in frames[-3:] for w in IDLE_WAITS):
            idle += n
            continue
        busy += n
        owner = next((o for o in map(_owner, reversed(frames)) if o is not None), "other native")
        cats[owner] += n
        leaf[_short(frames[-1])] += n
        pys = [f for f in frames if ".py:" in f and "runpy" not in f]
        if pys and owner in PYTHON_OWNERS:
            py_self[_short(pys[-1])] += n
        for f in {_short(f) for f in pys if "sidecar/" in f or "meshcore/" in f}:
            py_incl[f] += n
    user = busy - cats.get(SYSCALLS, 0)

    def pct(counter: Counter, total: int) -> list[list]:
        return [[k, round(100.0 * v / total, 1)] for k, v in counter.most_common(top)] if total else []

    return {"busy_samples": busy, "idle_samples": idle,
            "busy_share": round(busy / (busy + idle), 3) if busy + idle else 0.0,
            "categories": pct(cats, busy),
            "user_categories": pct(Counter({k: v for k, v in cats.items() if k != SYSCALLS}), user),
            "top_leaf": pct(leaf, busy), "top_python_self": pct(py_self, user),
            "top_python_inclusive": pct(py_incl, busy)}


def scrub_title(svg: Path, pyspy: str) -> None:
    """The flame graph's title (py-spy's command line, `-o svg`) without this machine's paths: the SVG
    is committed."""
    svg.write_text(svg.read_text().replace(str(svg), svg.name).replace(pyspy, "py-spy"))


def profile_mesh(lab, sc, seconds: float, raw_dir: Path, log, svg: bool = True, svg_prefix: str = "profile") -> dict:
    """py-spy (--native) on both sidecars under `sc` load: flame graph SVGs (when `svg`, named
    `<svg_prefix>-<role>.svg`), then raw stacks in a second pass, summarized."""
    pyspy = env.which("py-spy")
    if pyspy is None:
        return {"skipped": "py-spy is not installed (pip install py-spy)"}
    out_dir = raw_dir.parent
    result: dict = {"scenario": sc.name, "seconds": seconds, "roles": {}, "rps_while_profiled": []}
    for fmt in (("flamegraph", "raw") if svg else ("raw",)):
        spies = {}
        for role, pid in lab.pids["mesh"].items():
            path = (out_dir / f"{svg_prefix}-{role}.svg") if fmt == "flamegraph" else (raw_dir / f"profile-{role}-{sc.name}.txt")
            cmd = [pyspy, "record", "--pid", str(pid), "--duration", str(max(1, int(seconds))), "--rate", "200",
                   "--native", "--format", fmt, "-o", str(path)]
            spies[role] = (subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), path)
        time.sleep(0.3)
        run = lab.run("mesh", sc, seconds + 1.0)
        result["rps_while_profiled"].append(run["rps"])
        for role, (proc, path) in spies.items():
            try:
                out, _ = proc.communicate(timeout=seconds + 30)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
            if proc.returncode != 0 or not path.exists():
                result["roles"].setdefault(role, {})["error"] = f"py-spy exit {proc.returncode}: {out.strip()[-300:]}"
                continue
            if fmt == "flamegraph":
                scrub_title(path, pyspy)
                result["roles"].setdefault(role, {})["svg"] = path.name
            else:
                result["roles"].setdefault(role, {}).update(summarize_raw(path.read_text()))
    for role, r in result["roles"].items():
        cats = ", ".join(f"{k} {v}%" for k, v in r.get("user_categories", [])[:5])
        log(f"  py-spy {role} ({sc.name}, user space): {cats or r.get('error')}")
    return result


_PERF_HEAD = re.compile(r"^\s*(?P<name>\S+) \((?P<pid>\d+)\), (?P<events>\d+) events")
_PERF_ROW = re.compile(r"^\s*(?P<call>[a-z_0-9]+)\s+(?P<calls>\d+)\s+(?P<errors>\d+)\s+(?P<total>[\d.]+)\s+"
                       r"[\d.]+\s+(?P<avg>[\d.]+)")


def parse_perf_summary(text: str) -> dict[int, dict[str, dict]]:
    """`perf trace -s` output -> {pid: {syscall: {"calls", "errors", "total_ms", "avg_us"}}}."""
    out: dict[int, dict[str, dict]] = {}
    cur = None
    for line in text.splitlines():
        m = _PERF_HEAD.match(line)
        if m:
            cur = out.setdefault(int(m.group("pid")), {})
            continue
        m = _PERF_ROW.match(line)
        if m and cur is not None:
            cur[m.group("call")] = {"calls": int(m.group("calls")), "errors": int(m.group("errors")),
                                    "total_ms": float(m.group("total")), "avg_us": float(m.group("avg")) * 1000}
    return out


def syscalls_per_request(lab, sc, seconds: float, log) -> dict:
    """System calls per request of each proxy process (mesh and HAProxy pairs) under `sc` load,
    counted with `perf trace -s` (which slows the traced processes: counts, not timings, are the
    point; times per call are inflated by the tracing)."""
    perf = env.which("perf")
    if perf is None:
        return {"skipped": "perf is not installed"}
    out: dict = {"scenario": sc.name}
    for path in ("mesh", "haproxy"):
        if path not in lab.pids:
            continue
        roles = lab.pids[path]
        pids = ",".join(str(p) for p in roles.values())
        proc = subprocess.Popen([perf, "trace", "-s", "-p", pids, "--", "sleep", f"{seconds + 1.5:.1f}"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(0.5)
        if proc.poll() is not None:
            return {"skipped": f"perf trace failed: {proc.stdout.read().strip()[-300:]}"}
        run = lab.run(path, sc, seconds)
        text, _ = proc.communicate(timeout=seconds + 30)
        per_pid = parse_perf_summary(text)
        n = run["requests"]
        res = {"requests": n, "rps_while_traced": run["rps"]}
        for role, pid in roles.items():
            calls = per_pid.get(pid, {})
            res[role] = {
                "per_request": round(sum(c["calls"] for c in calls.values()) / n, 2) if n else None,
                "by_call": {k: round(v["calls"] / n, 3) for k, v in
                            sorted(calls.items(), key=lambda kv: -kv[1]["calls"]) if v["calls"] / n >= 0.01},
                "avg_us_traced": {k: round(v["avg_us"], 1) for k, v in calls.items() if v["calls"] / n >= 0.01},
            }
        out[path] = res
        log(f"  syscalls per request ({path}): " + "; ".join(
            f"{role} {res[role]['per_request']} ({', '.join(f'{k} {v}' for k, v in list(res[role]['by_call'].items())[:5])})"
            for role in roles))
    return out


def _dso_group(dso: str) -> str:
    if "kernel" in dso:
        return "kernel"
    if "libpython" in dso or dso.startswith("python"):
        return "Python interpreter"
    if "libcrypto" in dso or "libssl" in dso or "_ssl." in dso:
        return "OpenSSL"
    if dso.startswith("loop.") or "libuv" in dso:
        return "uvloop"
    if dso.startswith("parser.") or "llhttp" in dso:
        return "httptools"
    if "libc.so" in dso or "vdso" in dso:
        return "libc"
    if dso == "haproxy":
        return "haproxy"
    return "other"


def perf_dso(lab, sc, seconds: float, raw_dir: Path, log) -> dict:
    """Where each proxy process's CPU goes by binary (kernel, Python, OpenSSL, uvloop, httptools,
    haproxy), sampled with `perf record -e cpu-clock` (timer based, unbiased) under `sc` load."""
    perf = env.which("perf")
    if perf is None:
        return {"skipped": "perf is not installed"}
    out: dict = {"scenario": sc.name}
    for path in ("mesh", "haproxy"):
        if path not in lab.pids:
            continue
        roles = lab.pids[path]
        recs = {}
        for role, pid in roles.items():
            data = raw_dir / f"perf-{path}-{role}.data"
            recs[role] = (subprocess.Popen([perf, "record", "-q", "-e", "cpu-clock", "-F", "499", "-p", str(pid),
                                            "-o", str(data), "--", "sleep", f"{seconds + 1.0:.1f}"],
                                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), data)
        time.sleep(0.5)
        run = lab.run(path, sc, seconds)
        res: dict = {"rps_while_sampled": run["rps"]}
        for role, (proc, data) in recs.items():
            proc.communicate(timeout=seconds + 30)
            rep = subprocess.run([perf, "report", "-i", str(data), "--no-children", "--sort", "dso", "--stdio",
                                  "-g", "none"], capture_output=True, text=True, timeout=120)
            groups: Counter = Counter()
            for line in rep.stdout.splitlines():
                m = re.match(r"^\s*([\d.]+)%\s+(\S+)", line)
                if m:
                    groups[_dso_group(m.group(2).strip("[]") if "kernel" not in m.group(2) else "kernel")] += float(m.group(1))
            data.unlink(missing_ok=True)
            us = run["cpu_s_per_1000"].get(role)
            res[role] = {"shares": {k: round(v, 1) for k, v in groups.most_common()},
                         "cpu_us_per_request": round(us * 1000, 1) if us else None}
        out[path] = res
        log(f"  perf ({path}): " + "; ".join(
            f"{role} " + ", ".join(f"{k} {v}%" for k, v in list(res[role]["shares"].items())[:4]) for role in roles))
    return out
