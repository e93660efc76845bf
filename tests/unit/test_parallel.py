"""meshd.parallel.run_bounded: Docker calls of a rebuild a few at a time, every one even when some fail."""

from __future__ import annotations

import asyncio

import pytest

from meshd.parallel import run_bounded


@pytest.mark.parametrize("works, limit", [(10, 3), (3, 4), (1, 1), (0, 2)])
def test_at_most_limit_at_once_and_all_of_them(works, limit):
    async def run():
        running, peak, done = 0, 0, []

        async def work(i: int) -> int:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.001 * (i % 3))
            running -= 1
            done.append(i)
            return i * 10

        results = await run_bounded([lambda i=i: work(i) for i in range(works)], limit)
        return results, peak, sorted(done)

    results, peak, done = asyncio.run(run())
    assert results == [i * 10 for i in range(works)]
    assert done == list(range(works))
    assert peak == min(works, limit)


def test_a_failure_stops_none_of_the_others():
    async def run():
        async def fail():
            raise TimeoutError("Read timed out")

        async def ok():
            await asyncio.sleep(0)
            return "ok"

        return await run_bounded([fail, ok, fail, ok], 2)

    results = asyncio.run(run())
    assert [type(r).__name__ if isinstance(r, Exception) else r for r in results] == \
        ["TimeoutError", "ok", "TimeoutError", "ok"]
