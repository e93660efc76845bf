"""Bounded parallelism for Docker calls: a `compose up` or `down` of 100 containers is 100 calls."""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, Iterable

# Docker calls of one rebuild in flight at once: enough that one slow container (its removal waits
# for its process to die and its namespace to be torn down) does not hold up the others, few enough
# not to add to the load of an engine that is already busy with a `compose down`, and under the
# default executor's threads (min(32, CPUs + 4)), which the other steps of meshd also use.
DOCKER_PARALLEL = 4


async def run_bounded(works: Iterable[Callable[[], Awaitable[object]]], limit: int = DOCKER_PARALLEL) -> list:
    """Await every work, at most `limit` at a time, in order of start; each one's result, or the
    exception it raised (one failure stops none of the others)."""
    gate = asyncio.Semaphore(limit)

    async def one(work: Callable[[], Awaitable[object]]) -> object:
        async with gate:
            return await work()

    return await asyncio.gather(*(one(w) for w in works), return_exceptions=True)
