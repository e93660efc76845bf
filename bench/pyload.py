"""A pure-Python stand-in for wrk (when wrk is missing, and in the smoke test): N keep-alive
connections (or a new connection per request), closed loop, latency of every request.

    python -m bench.pyload --port P --connections N --duration S [--close] [--host H]

Prints one line `BENCHJSON {...}` in the same form as bench/wrk_report.lua.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from httptools import HttpParserError, HttpResponseParser


class _Conn(asyncio.Protocol):
    def __init__(self, gen: "_Load") -> None:
        self.gen = gen
        self.transport = None
        self.parser = HttpResponseParser(self)
        self.t0 = 0
        self.lost: asyncio.Future = asyncio.get_running_loop().create_future()
        self.done = asyncio.get_running_loop().create_future()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def send(self) -> None:
        self.done = asyncio.get_running_loop().create_future()
        self.t0 = time.perf_counter_ns()
        self.transport.write(self.gen.request)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except HttpParserError:
            self.gen.errors["read"] += 1
            self.transport.abort()

    def on_body(self, data: bytes) -> None:
        self.gen.bytes += len(data)

    def on_message_complete(self) -> None:
        if self.parser.get_status_code() >= 400:
            self.gen.errors["status"] += 1
        if not self.done.done():
            self.done.set_result(time.perf_counter_ns() - self.t0)

    def connection_lost(self, exc) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        if not self.done.done():
            self.done.set_exception(ConnectionError("closed before the response"))


class _Load:
    def __init__(self, port: int, host: str, close: bool) -> None:
        self.port = port
        self.close = close
        headers = f"GET / HTTP/1.1\r\nHost: {host}\r\n" + ("Connection: close\r\n" if close else "")
        self.request = (headers + "\r\n").encode()
        self.latencies: list[int] = []
        self.errors = {"connect": 0, "read": 0, "write": 0, "status": 0, "timeout": 0}
        self.bytes = 0

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(lambda: _Conn(self), "127.0.0.1", self.port)
        return conn

    async def worker(self, until: float) -> None:
        conn = None
        while time.monotonic() < until:
            try:
                if conn is None or conn.transport.is_closing():
                    conn = await self._connect()
                conn.send()
                ns = await asyncio.wait_for(conn.done, 5.0)
            except asyncio.TimeoutError:
                self.errors["timeout"] += 1
                conn = None
                continue
            except OSError:
                self.errors["connect" if conn is None else "read"] += 1
                conn = None
                await asyncio.sleep(0.01)
                continue
            self.latencies.append(ns)
            if self.close or not conn.parser.should_keep_alive():
                conn.transport.close()
                conn = None
        if conn is not None:
            conn.transport.close()


async def run(port: int, connections: int, duration: float, close: bool, host: str) -> dict:
    gen = _Load(port, host, close)
    start = time.monotonic()
    await asyncio.gather(*(gen.worker(start + duration) for _ in range(connections)))
    elapsed = time.monotonic() - start
    lat = sorted(gen.latencies)

    def pct(p: float) -> float:
        if not lat:
            return 0.0
        return lat[min(len(lat) - 1, int(round(p / 100.0 * (len(lat) - 1))))] / 1000.0

    return {"requests": len(lat), "duration_us": int(elapsed * 1e6), "bytes": gen.bytes,
            "errors": gen.errors, "tool": "pyload",
            "latency_us": {"p50": pct(50), "p90": pct(90), "p99": pct(99), "p999": pct(99.9),
                           "max": lat[-1] / 1000.0 if lat else 0.0,
                           "mean": sum(lat) / len(lat) / 1000.0 if lat else 0.0}}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.pyload")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--connections", type=int, default=1)
    p.add_argument("--duration", type=float, default=1.0)
    p.add_argument("--close", action="store_true", help="a new connection per request")
    p.add_argument("--host", default="payments")
    args = p.parse_args(argv)
    coro = run(args.port, args.connections, args.duration, args.close, args.host)
    try:
        import uvloop
        result = uvloop.run(coro)
    except ImportError:  # pragma: no cover
        result = asyncio.run(coro)
    print("BENCHJSON " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
