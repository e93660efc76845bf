"""Shared by the data-path adapter tests: both event loops the sidecar may run on, and polling."""

from __future__ import annotations

import asyncio

import uvloop

GUARD_S = 20  # no test may take longer than this; it bounds every wait
LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def make_runner(loop_name: str):
    """run(async_fn, *args): runs it to completion on a fresh loop of that kind, bounded by GUARD_S."""
    def runner(fn, *args):
        with asyncio.Runner(loop_factory=LOOPS[loop_name]) as r:
            return r.run(asyncio.wait_for(fn(*args), GUARD_S))
    return runner


async def eventually(pred, what="condition", timeout=GUARD_S):
    """Poll `pred` toward a deadline instead of sleeping a fixed time."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def serve_on_loopback(app, stack) -> int:
    """Serve an aiohttp app on 127.0.0.1 (ephemeral port) until `stack` closes; returns the port."""
    from aiohttp import web

    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    stack.push_async_callback(runner.cleanup)
    return runner.addresses[0][1]
