"""Egress control end to end: under MESH_EGRESS=registry-only a meshed app reaches a host outside
the mesh only when its `mesh.egress` lists it; a blocked call is answered 502 `EB` by its own
sidecar, counted, and listed by `meshctl events`. The default (allow-any) passes it through."""

from __future__ import annotations

import time

import pytest

from .conftest import ADMIN, get_json, recreate_meshd, wait_for
from .lifecycle import curl, project, wait_mesh_ok

pytestmark = pytest.mark.e2e

EP = "lcegress"


def _restart_meshd(egress: str | None) -> None:
    recreate_meshd("MESH_EGRESS", egress)
    # Back means published and every node reconnected and on its version: the next tests read status.
    wait_for(lambda: get_json(f"{ADMIN}/v1/status")["meshd"]["snapshot_version"], 60, what="meshd back")
    wait_mesh_ok(what="every node reconnected to the restarted meshd")


@pytest.fixture
def egress_project(mesh):
    project(EP, "down", file="egress.yml", check=False)
    project(EP, "up", "-d", file="egress.yml")
    try:
        wait_mesh_ok(what="the egress project meshed")
        yield EP
    finally:
        project(EP, "down", file="egress.yml", check=False)
        _restart_meshd(None)


def test_registry_only_blocks_what_mesh_egress_does_not_list(egress_project):
    assert curl(EP, "http://egext/", client="egdenied")[0] == 200        # allow-any: passthrough
    _restart_meshd("registry-only")
    since = time.time()

    def blocked() -> tuple[int, str] | None:
        code, body = curl(EP, "http://egext/", client="egdenied")
        return (code, body) if code == 502 else None

    code, body = wait_for(blocked, 60, interval=1.0, what="the denied client's call blocked (502)")
    assert "is blocked: registry-only" in body, body[:300]   # the sidecar's own answer, not egext's
    assert curl(EP, "http://egext/", client="egallowed")[0] == 200       # listed: still passes

    def event() -> list[dict]:
        # meshd raises the event when it sees the sidecar's blocked counter grow between two
        # scrapes (its first scrape after a restart is a baseline): keep calling meanwhile.
        assert curl(EP, "http://egext/", client="egdenied")[0] == 502
        return [e for e in get_json(f"{ADMIN}/v1/events?since={since}")["events"]
                if e["kind"] == "egress_blocked" and "egdenied" in e.get("message", "")]

    print(wait_for(event, 60, interval=1.0, what="an egress_blocked event naming the caller")[0]["message"])
