"""Attacks on an inbound sidecar in its own process (tests/adapters/sidecar_process.py) on loopback:
slowloris with 1,000 connections, header floods, chunk floods. Under each, the sidecar's RSS stays
within a bound over its warmed-up figure, and another caller keeps being served. The figures are
printed (`pytest -s`); at most 1,000 client connections are open at once, all closed at the end."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import uvloop

from .test_proxy import RawServer, Responses

ROOT = Path(__file__).resolve().parents[2]
HEAD_TIMEOUT_S = 2.0          # the slowloris ends in seconds, not the default 10
BODY_TIMEOUT_S = 2.0          # a stalled body too (default 60)
SLOWLORIS = 1000
RSS_BOUND_MIB = 64            # growth over the warmed-up RSS allowed under any attack
ATTACK_GUARD_S = 120         # bounds each attack test
GOOD = b"GET / HTTP/1.1\r\nhost: payments\r\n\r\n"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


class Sidecar:
    """The sidecar process: started with the limits' environment, killed at the end."""

    def __init__(self, stack: AsyncExitStack, app_port: int, env: dict[str, str]):
        self.dir = tempfile.TemporaryDirectory()
        stack.callback(self.dir.cleanup)
        ready = Path(self.dir.name) / "ready.json"
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.adapters.sidecar_process", str(app_port), str(ready)],
                                     cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **env})
        stack.callback(self._stop)
        deadline = time.monotonic() + 15
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("the sidecar process did not start")
            time.sleep(0.02)
        info = json.loads(ready.read_text())
        self.pid, self.port = info["pid"], info["port"]

    def _stop(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


async def call(port: int) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(GOOD)
        items = await Responses().read(reader, 1)
        return items[0]["status"] if items else 0
    finally:
        writer.close()


async def answer_fast(reader, writer):
    """The attacks' app: each request's body read in blocks (chunked: to the last chunk), then 200; cheap,
    so that the other caller's latency is the sidecar's, not a Python chunk parser's."""
    while True:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).lower()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return
        if b"transfer-encoding: chunked" in head:
            tail = b""
            while not tail.endswith(b"\r\n0\r\n\r\n"):
                block = await reader.read(65536)
                if not block:
                    return
                tail = (tail + block)[-7:]
        elif b"content-length:" in head:
            await reader.readexactly(int(head.split(b"content-length:")[1].split(b"\r\n")[0]))
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        await writer.drain()


def app_in_a_thread(stack: AsyncExitStack) -> RawServer:
    """The app on an event loop of its own thread: its answers are not slowed by the attacker's loop."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    app = asyncio.run_coroutine_threadsafe(RawServer(answer_fast).start(), loop).result(10)

    def stop() -> None:
        asyncio.run_coroutine_threadsafe(app.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()

    stack.callback(stop)
    return app


def blocking_call(port: int) -> int:
    """One request on a connection of its own (plain sockets, from another thread): its status, or 0."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(GOOD)
            data = b""
            while b"\r\n\r\n" not in data:
                piece = sock.recv(4096)
                if not piece:
                    break
                data += piece
            return int(data[9:12]) if data.startswith(b"HTTP/1.1 ") else 0
    except OSError:
        return 0


async def under_attack(sidecar: Sidecar, attack) -> dict:
    """Warm up, then run `attack(port)` while another caller calls every 50 ms and RSS is sampled."""
    for _ in range(200):
        assert await call(sidecar.port) == 200
    baseline = rss_mib(sidecar.pid)
    peak = [baseline]
    served: list[tuple[int, float]] = []
    done = threading.Event()

    def caller():
        while not done.is_set():
            start = time.monotonic()
            served.append((blocking_call(sidecar.port), time.monotonic() - start))
            time.sleep(0.05)

    async def sampler():
        while not done.is_set():
            peak[0] = max(peak[0], rss_mib(sidecar.pid))
            await asyncio.sleep(0.05)

    thread = threading.Thread(target=caller)   # its own thread: not slowed by the attacker's loop
    thread.start()
    sampling = asyncio.ensure_future(sampler())
    start = time.monotonic()
    try:
        outcome = await attack(sidecar.port)
    finally:
        elapsed = time.monotonic() - start
        done.set()
        await sampling
        await asyncio.get_running_loop().run_in_executor(None, thread.join)
    after = rss_mib(sidecar.pid)
    figures = {"baseline_mib": round(baseline, 1), "peak_mib": round(peak[0], 1), "after_mib": round(after, 1),
               "attack_s": round(elapsed, 1), "other_calls": len(served),
               "other_ok": sum(1 for s, _ in served if s == 200),
               "other_max_ms": round(max(t for _, t in served) * 1000) if served else None, "outcome": outcome}
    print(f"\nattack {attack.__name__}: {json.dumps(figures)}")
    return figures


def check(figures: dict) -> None:
    assert figures["other_calls"] >= 1 and figures["other_ok"] == figures["other_calls"], figures
    assert figures["peak_mib"] - figures["baseline_mib"] < RSS_BOUND_MIB, figures


def count(outcomes: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for o in outcomes:
        out[o] = out.get(o, 0) + 1
    return out


async def ending(reader) -> str:
    """How the sidecar ended a connection: its status line's code, `closed` or `reset`."""
    try:
        data = await reader.read(64)
    except ConnectionError:
        return "reset"
    return data[9:12].decode() if data.startswith(b"HTTP/1.1 ") else "closed"


async def slowloris(port: int) -> dict:
    """1,000 connections, each sending a head line every 0.5 s and never its end."""
    conns = []
    for _ in range(0, SLOWLORIS, 100):
        conns += await asyncio.gather(*(asyncio.open_connection("127.0.0.1", port) for _ in range(100)))

    async def one(reader, writer) -> str:
        writer.write(b"GET / HTTP/1.1\r\nhost: payments\r\n")

        async def trickle():
            for i in range(40):
                await asyncio.sleep(0.5)
                if writer.is_closing():
                    return
                writer.write(b"x-slow-%d: 1\r\n" % i)

        slow = asyncio.ensure_future(trickle())
        try:
            return await asyncio.wait_for(ending(reader), HEAD_TIMEOUT_S + 5)
        except asyncio.TimeoutError:
            return "still open"
        finally:
            slow.cancel()
            writer.close()

    return count(await asyncio.gather(*(one(r, w) for r, w in conns)))


async def flood(port: int, n: int, head: bytes, piece: bytes, total: int) -> dict:
    """`n` connections at once, each sending `head` and then `piece` until `total` bytes or the end."""
    async def one() -> str:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(head)
            sent = 0
            while sent < total and not reader.at_eof():
                writer.write(piece)
                sent += len(piece)
                await writer.drain()
            return await asyncio.wait_for(ending(reader), 10)
        except ConnectionError:
            return "reset"
        finally:
            writer.close()

    return count(await asyncio.gather(*(one() for _ in range(n))))


async def header_flood(port: int) -> dict:
    """200 connections sending 256 KiB of 1 KiB header lines each."""
    return await flood(port, 200, b"GET / HTTP/1.1\r\nhost: payments\r\n", b"x-flood: " + b"f" * 1015 + b"\r\n",
                       256 * 1024)


async def tiny_header_flood(port: int) -> dict:
    """100 connections sending 120 KB of `a: b` header lines each."""
    return await flood(port, 100, b"GET / HTTP/1.1\r\nhost: payments\r\n", b"a: b\r\n" * 1000, 120_000)


POST_CHUNKED = b"POST / HTTP/1.1\r\nhost: payments\r\ntransfer-encoding: chunked\r\n\r\n"


async def chunk_flood(port: int) -> dict:
    """10 connections sending 100,000 one-byte chunks each, then the last chunk (the app reads them all)."""
    async def one() -> str:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(POST_CHUNKED)
            for _ in range(100):
                writer.write(b"1\r\nx\r\n" * 1000)
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            return await asyncio.wait_for(ending(reader), 30)
        finally:
            writer.close()

    return count(await asyncio.gather(*(one() for _ in range(10))))


async def chunk_size_flood(port: int) -> dict:
    """50 connections each sending a chunk-size line of 1 MiB of zeros, then 50 a chunk extension of 1 MiB."""
    sizes = await flood(port, 50, POST_CHUNKED, b"0" * 65536, 1024 * 1024)
    extensions = await flood(port, 50, POST_CHUNKED + b"1;", b"e" * 65536, 1024 * 1024)
    return {"chunk_size_line": sizes, "chunk_extension": extensions}


@pytest.mark.parametrize("attack", [slowloris, header_flood, tiny_header_flood, chunk_flood, chunk_size_flood],
                         ids=lambda a: a.__name__)
def test_attack_keeps_rss_bounded_and_others_served(attack):
    async def main():
        async with AsyncExitStack() as stack:
            app = app_in_a_thread(stack)
            sidecar = Sidecar(stack, app.port, {"MESH_HEAD_TIMEOUT": f"{HEAD_TIMEOUT_S}s",
                                                "MESH_BODY_TIMEOUT": f"{BODY_TIMEOUT_S}s"})
            figures = await under_attack(sidecar, attack)
            check(figures)
            return figures["outcome"]

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        outcome = runner.run(asyncio.wait_for(main(), ATTACK_GUARD_S))
    if attack is slowloris:
        assert outcome.get("408", 0) + outcome.get("reset", 0) == SLOWLORIS, outcome
    elif attack in (header_flood, tiny_header_flood):
        assert set(outcome) <= {"431", "reset"}, outcome
    elif attack is chunk_flood:
        assert outcome == {"200": 10}, outcome
    else:   # llhttp takes any number of chunk-size digits and extension bytes: the body timeout ends them
        assert all(set(ends) <= {"408", "reset"} for ends in outcome.values()), outcome
