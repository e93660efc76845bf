"""What the sidecar and gateway processes load: every module their cli imports (at the top and
inside `serve`), in a fresh interpreter, must not bring in aiohttp, structlog's console extras,
cryptography, zeroconf or websockets (bench/RESULTS.md: ~10, ~6, ~8, ~3.5 and ~2.8 MiB of each
sidecar's memory; the nodes' keys, CSRs and certificate parsing run in a `certs.worker` child process)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# zeroconf: the sidecar answers for its instance with meshcore.mdns (~3.5 MiB less; meshd browses);
# websockets: sidecar.wsclient speaks the control channel's RFC 6455 subset (~2.8 MiB less)
# tempfile and shutil (with bz2, lzma): ~0.9 MiB; certs.store writes files atomically with os alone
HEAVY = ("aiohttp", "rich", "colorama", "better_exceptions", "cryptography", "zeroconf", "ifaddr", "websockets",
         "urllib.request", "importlib.metadata", "tempfile", "shutil", "argparse", "opentelemetry", "http.client")


# Started as in the image: the packages on the path, but no .pth hook of this machine's (an editable
# install's finder, a sandbox CA injector importing certifi) loading modules of its own.
AS_IN_THE_IMAGE = {**os.environ, "PYTHONPATH": os.pathsep.join(
    [str(ROOT)] + [p for p in sys.path if p.endswith("-packages") and os.path.isdir(p)])}


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
def test_process_imports_leave_out_heavy_modules(cli):
    package = cli.split("/")[0]
    modules = [f"{package}.cli"] + [m for m in modules_imported_by(ROOT / cli)
                                    if m.split(".")[0] in ("sidecar", "gateway", "certs", "meshproc", "meshcore")]
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules)
            + f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60,
                          env=AS_IN_THE_IMAGE)
    assert proc.returncode == 0, proc.stderr
    assert "sidecar.admin" in modules and "sidecar.control" in modules and "sidecar.tlsagent" in modules
    loaded = proc.stdout.split()
    assert not loaded, f"`{package} run` imports {', '.join(loaded)} (modules: {', '.join(modules)})"


def test_sampled_spans_load_no_opentelemetry_sdk():
    """A sampled span is queued and exported by sidecar.otel (the SDK's import and queued spans cost
    ~3.5 MiB per sidecar under load); http.client comes only with a target to post to."""
    code = ("import sys\nfrom meshcore.tracecontext import TraceContext\nfrom sidecar.tracing import Tracing\n"
            "t = Tracing('svc', 'v1')\n"
            "t.finish(TraceContext(1, 2, None, True), direction='outbound', method=b'GET', target=b'/', status=200,"
            " flags='-', ms=1.0, source='a', source_version='v1', destination='b', destination_version='v1',"
            " upstream=None, attempts=1, no_flags='-')\n"
            "t.close()\nassert t._exporter is not None\n"
            "print(' '.join(m for m in ('opentelemetry', 'http.client') if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60,
                          env=AS_IN_THE_IMAGE)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == []


def test_console_extras_stay_importable_for_others():
    """meshproc.runtime hides rich & co. only while structlog imports: meshctl still gets rich."""
    code = "import meshproc.runtime, sys; assert 'rich' not in sys.modules; import rich.console; print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_nodes_do_not_load_prometheus_client():
    """The sidecar and gateway expose their metrics with meshcore.metrics (prometheus_client and what it
    imports, http.server, email, wsgiref, urllib..., cost ~3 MiB per sidecar); only meshd uses it.
    Building the metrics and rendering them (sidecar.tracing's counters included) must not load it either."""
    code = ("import sys\n"
            "import sidecar.cli, sidecar.proxy, sidecar.telemetry, sidecar.tlsagent, sidecar.tracing, gateway.cli\n"
            "t = sidecar.telemetry.Telemetry()\n"
            "sidecar.tlsagent.TlsStats(t.registry).conn('inbound', 'TLSv1.3')\n"
            "sidecar.tracing.Tracing('svc', 'v1', registry=t.registry)\n"
            "assert b'mesh_trace_spans_total' in sidecar.telemetry.render_metrics(t)\n"
            "print('prometheus_client' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False", "the sidecar or gateway imports prometheus_client"


@pytest.mark.parametrize("argv, code, says", [
    ([], 2, "the following arguments are required: command"),
    (["bogus"], 2, "invalid choice: 'bogus'"),
    (["run", "extra"], 2, "unrecognized arguments: extra"),
    (["--help"], 0, "{run}"),
])
def test_node_command_line_other_than_run_goes_to_argparse(argv, code, says, capsys):
    from meshproc.runtime import wants_run

    with pytest.raises(SystemExit) as err:
        wants_run("sidecar", "The mesh sidecar proxy.", "proxy", argv)
    assert err.value.code == code
    out = capsys.readouterr()
    assert says in out.err + out.out


def test_node_run_command_loads_no_argparse():
    """`sidecar run` / `gateway run` (every container start) parse without argparse, which would
    bring shutil, bz2 and lzma (~0.6 MiB)."""
    code = ("import sys\nfrom meshproc.runtime import wants_run\nassert wants_run('sidecar', 'd', 'h', ['run'])\n"
            "print(' '.join(m for m in ('argparse', 'shutil', 'bz2', 'lzma') if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60,
                          env=AS_IN_THE_IMAGE)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == []
