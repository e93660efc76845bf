"""User-space instructions per request of each sidecar, counted by valgrind (callgrind):

    python -m bench.instructions [--requests N] [--pure] [--profile DIR]

The bench's mesh pair (bench/sidecar_runner.py, as `python -m bench` starts it) runs under callgrind
in front of nginx; N sequential keep-alive requests go through it, then the same pair is started
again and stopped with none. The difference of the two runs' instruction totals over N is each
sidecar's user-space cost of one request (kernel work is not counted). Instruction counts repeat
to within a fraction of a percent where wall-clock CPU on a shared VM drifts by tens of percent, so
this tells whether a change to the data path did less work; whether that work took less time is
the A/B's question (bench/ab.py). `--pure` runs the Python source of the data path (MESHD_PURE_PYTHON)
instead of the compiled module. `--profile DIR` runs the loaded pair once more with instrumentation
on only while the requests after the first are sent (callgrind_control -i; the first opens the
connections) and leaves its callgrind files in DIR,
for `callgrind_annotate --inclusive=yes DIR/callgrind-inbound.out` to say which functions the
instructions are spent in. Loopback only; about a minute per run (callgrind is ~50x slower).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import env
from .datapath import sidecar_cmd, start_nginx
from .pki import write_pki

READY_S = 600   # imports under callgrind take a while


def _total(path: Path) -> int:
    m = re.search(r"^(?:summary|totals):\s+(\d+)", path.read_text(errors="replace"), re.M)
    if m is None:
        raise RuntimeError(f"no instruction total in {path}")
    return int(m.group(1))


def _pair_run(workdir: Path, python: str, requests: int, pure: bool, window: bool = False) -> dict[str, int]:
    """Instructions of each sidecar process from start to exit, with `requests` sent in between
    (only while they are sent, with `window`)."""
    pki = write_pki(workdir / "tls", ("frontend", "payments"))
    app_port = env.free_port()
    procs = env.Procs()
    roles: dict[str, subprocess.Popen] = {}
    try:
        start_nginx(procs, env.which("nginx"), workdir, app_port)
        child_env = {k: v for k, v in os.environ.items() if k != "MESHD_PURE_PYTHON"}
        if pure:
            child_env["MESHD_PURE_PYTHON"] = "1"
        in_port, out_port = env.free_port(), env.free_port()
        for role, port, extra, tls in (
                ("inbound", in_port, ["--app-port", str(app_port)], pki["payments"]),
                ("outbound", out_port, ["--dest-port", str(in_port), "--mode", "transparent"], pki["frontend"])):
            ready = workdir / f"{role}.ready"
            cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={workdir}/callgrind-{role}.out",
                   *(["--instr-atstart=no"] if window else []),
                   *sidecar_cmd(python, role, port, tls, ready, extra)]
            roles[role] = subprocess.Popen(cmd, cwd=workdir, env=child_env, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL)
            env.wait_file(ready, READY_S, roles[role], f"{role} under callgrind")
        ok = 0
        failed = None
        if requests:
            conn = http.client.HTTPConnection("127.0.0.1", out_port, timeout=60)
            for i in range(requests + window):
                if window and i == 1:
                    # The first request made the connections (TLS handshakes, slow enough under
                    # callgrind to hit the connect timeout while instrumented): count from the next.
                    _instrument(roles, "on")
                conn.request("GET", "/", headers={"Host": "payments"})
                resp = conn.getresponse()
                body = resp.read()
                if resp.status != 200 and failed is None:
                    failed = f"{resp.status} {resp.getheaders()} {body[:200]!r}"
                ok += resp.status == 200
            conn.close()
        if ok != requests + window:
            raise RuntimeError(f"{requests + window - ok} of {requests + window} requests through the pair "
                               f"failed; the first: {failed}")
        if window:
            _instrument(roles, "off")
        time.sleep(0.5)
        for proc in roles.values():
            proc.send_signal(signal.SIGTERM)
        for proc in roles.values():
            proc.wait(timeout=READY_S)
        return {role: _total(workdir / f"callgrind-{role}.out") for role in roles}
    finally:
        for proc in roles.values():
            if proc.poll() is None:
                proc.kill()
        procs.stop_all()


def _instrument(roles: dict[str, subprocess.Popen], state: str) -> None:
    for proc in roles.values():
        subprocess.run(["callgrind_control", "-i", state, str(proc.pid)], check=True,
                       stdout=subprocess.DEVNULL, timeout=60)


def measure(requests: int, pure: bool, profile: Path | None = None) -> dict:
    if shutil.which("valgrind") is None:
        raise RuntimeError("valgrind is not installed (apt-get install valgrind)")
    with tempfile.TemporaryDirectory(prefix="meshd-instr-") as tmp:
        python = env.product_python(Path(tmp))
        idle = _pair_run(Path(tmp) / "idle", python, 0, pure)
        loaded = _pair_run(Path(tmp) / "loaded", python, requests, pure)
        if profile is not None:
            _pair_run(Path(tmp) / "window", python, requests, pure, window=True)
            profile.mkdir(parents=True, exist_ok=True)
            for out in (Path(tmp) / "window").glob("callgrind-*.out*"):
                shutil.copy(out, profile / out.name)
    return {"data_path": "Python source" if pure else env.data_path_build(), "requests": requests,
            "instructions_per_request": {role: round((loaded[role] - idle[role]) / requests)
                                         for role in loaded}}


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=1500)
    p.add_argument("--pure", action="store_true", help="the data path's Python source")
    p.add_argument("--profile", type=Path, help="leave callgrind files of the requests alone here")
    args = p.parse_args(argv)
    print(json.dumps(measure(args.requests, args.pure, args.profile), indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
