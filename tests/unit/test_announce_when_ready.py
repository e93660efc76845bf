"""sidecar.cli.announce_when_ready: an instance is announced (mDNS) only once it can serve."""

from __future__ import annotations

import asyncio

from sidecar.cli import announce_when_ready


class Control:
    current = None
    agent = None


class Agent:
    valid = False

    def has_valid_cert(self) -> bool:
        return self.valid


class Announcer:
    def __init__(self, fail: bool = False):
        self.started = 0
        self.fail = fail

    async def start(self) -> None:
        if self.fail:
            raise OSError("no multicast")
        self.started += 1


def test_announced_only_after_config_listeners_and_certificate():
    async def scenario():
        control, announcer, listening = Control(), Announcer(), [False]
        control.agent = Agent()
        task = asyncio.ensure_future(announce_when_ready(announcer, control, lambda: listening[0], poll_s=0.001))
        steps = []
        for change in ("config", "listeners", "certificate"):
            await asyncio.sleep(0.02)
            steps.append((change, announcer.started))
            if change == "config":
                control.current = object()
            elif change == "listeners":
                listening[0] = True
            else:
                control.agent.valid = True
        assert await asyncio.wait_for(task, 1.0) is True
        return steps, announcer.started

    steps, started = asyncio.run(scenario())
    assert steps == [("config", 0), ("listeners", 0), ("certificate", 0)] and started == 1


def test_a_failed_announcement_is_reported_not_raised():
    async def scenario():
        control = Control()
        control.current = object()
        return await announce_when_ready(Announcer(fail=True), control, lambda: True, poll_s=0.001)

    assert asyncio.run(scenario()) is False
