"""meshd's rebuild with a fake Docker: one failing sidecar, listener, mDNS address or Docker listing
degrades only itself, is a problem in status and an event, and clears when it works again."""

from __future__ import annotations

import socket
from datetime import datetime, timezone

import pytest
import requests
from aiohttp import web

import meshd.app as app_module
from meshcore.labels import COMPOSE_PROJECT, COMPOSE_SERVICE, ContainerInfo
from meshd.app import Meshd, Settings
from meshd.docker_adapter import DockerView

UNROUTABLE = "192.0.2.1"   # TEST-NET-1 (RFC 5737): never an address of this host


def app(name: str) -> ContainerInfo:
    labels = {"mesh.enable": "true", "mesh.port": "8080", COMPOSE_SERVICE: name, COMPOSE_PROJECT: "p"}
    return ContainerInfo(id=f"id-{name}", name=f"p-{name}-1", labels=labels, exposed_ports=(8080,),
                         networks={"p_default": "172.30.0.5"}, running=True, started_at="2026-12-05T10:00:00.0Z")


class FakeDocker:
    """The adapter's surface that a rebuild uses; `fail_create` names apps whose sidecar cannot be made."""

    def __init__(self, apps):
        self.view = DockerView(apps=apps, sidecars=[], gateway=None,
                               network_gateways={"p_default": UNROUTABLE}, image_id=None)
        self.fail_create: set[str] = set()
        self.list_error: Exception | None = None
        self.created: list[str] = []
        self.client = None

    def list_view(self):
        if self.list_error is not None:
            raise self.list_error
        return self.view

    def create_sidecar(self, container, env, token=""):
        if container.name in self.fail_create:
            raise RuntimeError(f"Conflict: the container name {container.name}-mesh is already in use")
        self.created.append(container.name)
        assert env["MESH_CONTROL_URL"].startswith(f"wss://{UNROUTABLE}:")
        return f"sc-{container.name}"

    def remove(self, name_or_id):
        return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
async def meshd(tmp_path, monkeypatch):
    monkeypatch.setattr(app_module, "CONTROL_PORT", free_port())
    monkeypatch.setattr(app_module, "RETRY_S", 3600.0)   # retries are driven by the test
    md = Meshd(Settings(state_dir=str(tmp_path), manage_gateway=False), client=object())
    md.docker = FakeDocker([app("a"), app("b")])
    runner = web.AppRunner(web.Application())
    await runner.setup()
    md._control_runner = runner
    md._warming = False
    yield md
    for site in md._control_sites.values():
        await site.stop()
    await runner.cleanup()
    await md.discovery.close()


def kinds(md) -> set[tuple[str, str]]:
    return {(p["kind"], p["subject"]) for p in md.status()["problems"]}


async def test_one_failure_degrades_only_itself(meshd):
    meshd.docker.fail_create = {"p-a-1"}
    await meshd.rebuild()
    # b got its sidecar although a's failed; the bridge address that is not on this host failed
    # its listener and its mDNS browser, and loopback still listens; a snapshot was published.
    assert meshd.docker.created == ["p-b-1"]
    assert kinds(meshd) == {("sidecar_create", "p-a-1-mesh"), ("control_listen", UNROUTABLE),
                            ("mdns_browse", UNROUTABLE)}
    assert set(meshd._control_sites) == {"127.0.0.1"}
    assert meshd.hub.latest is not None
    problem = next(p for p in meshd.status()["problems"] if p["kind"] == "sidecar_create")
    assert "already in use" in problem["message"] and problem["attempts"] == 1
    events = meshd.telemetry.events.since()
    assert [e["kind"] for e in events] == ["problem"] * 3
    assert any("p-a-1-mesh" in e["message"] for e in events)

    # retried: a repeat is counted, not a new event; once it works the problem clears with one event
    await meshd.rebuild()
    assert next(p for p in meshd.status()["problems"] if p["kind"] == "sidecar_create")["attempts"] == 2
    assert len(meshd.telemetry.events.since()) == 3
    meshd.docker.fail_create = set()
    await meshd.rebuild()
    assert ("sidecar_create", "p-a-1-mesh") not in kinds(meshd)
    cleared = [e for e in meshd.telemetry.events.since() if e["kind"] == "problem_cleared"]
    assert len(cleared) == 1 and "p-a-1-mesh" in cleared[0]["message"]


async def test_docker_listing_failure_keeps_the_last_view(meshd):
    await meshd.rebuild()
    view = meshd.view
    meshd.docker.list_error = requests.exceptions.ReadTimeout("Read timed out. (read timeout=60)")
    with pytest.raises(requests.exceptions.ReadTimeout):
        await meshd.rebuild()
    assert meshd.view is view and ("docker_list", "docker") in kinds(meshd)
    meshd.docker.list_error = None
    await meshd.rebuild()
    assert ("docker_list", "docker") not in kinds(meshd)


async def test_status_names_unconnected_sidecars(meshd, monkeypatch):
    sc = ContainerInfo(id="sc-a", name="p-a-1-mesh", labels={"mesh.owner": "meshd", "mesh.role": "sidecar",
                                                             "mesh.sidecar.for": "id-a"},
                       running=True, started_at="2020-01-01T00:00:00.5Z")
    meshd.docker.view = DockerView(apps=[app("a")], sidecars=[sc], gateway=None,
                                   network_gateways={"p_default": UNROUTABLE}, image_id=None)
    await meshd.rebuild()
    asked = []

    async def fake_read(ip, timeout=1.0):
        asked.append(ip)
        return "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"

    monkeypatch.setattr(app_module, "read_control_error", fake_read)
    body = meshd.status()
    await meshd.unconnected_reasons(body)
    entry = body["sidecars"][0]
    assert entry["connected"] is False and "CERTIFICATE_VERIFY_FAILED" in entry["control_error"]
    assert body["unconnected"] == ["p-a-1-mesh"] and asked == ["172.30.0.5"]
    # a sidecar started a moment ago is given its grace period: not reported yet
    body = meshd.status()
    await meshd.unconnected_reasons(body, grace_s=1e12)
    assert body["unconnected"] == [] and "control_error" not in body["sidecars"][0]


def test_docker_time():
    expected = datetime(2026, 12, 5, 10, 0, 0, tzinfo=timezone.utc).timestamp() + 0.25
    assert app_module.docker_time("2026-12-05T10:00:00.250000000Z") == pytest.approx(expected)
    assert app_module.docker_time("0001-01-01T00:00:00Z") < 0          # Docker's "never"
    assert app_module.docker_time("") == 0.0 and app_module.docker_time("garbage") == 0.0


async def test_a_replaced_sidecar_does_not_stay_connected(meshd):
    """`docker restart` of an app: its sidecar, in the namespace that is gone, is replaced by one of
    the same name. The old control connection (no FIN ever comes from a vanished namespace) must not
    count as the new sidecar's, connected and ACKed, while the new one is still starting."""
    from meshd.control import NodeState

    old = ContainerInfo(id="sc-a-old", name="p-a-1-mesh", running=True, started_at="2026-12-05T09:00:00.0Z",
                        labels={"mesh.owner": "meshd", "mesh.role": "sidecar", "mesh.sidecar.for": "id-a"})
    meshd.docker.view = DockerView(apps=[app("a")], sidecars=[old], gateway=None,
                                   network_gateways={"p_default": UNROUTABLE}, image_id=None)
    meshd.hub.nodes["p-a-1-mesh"] = NodeState(node="p-a-1-mesh", kind="sidecar", container="id-a",
                                              connected=True, acked_version=4)
    await meshd.rebuild()
    assert meshd.docker.created == ["p-a-1"]            # replaced (started before the app's start)
    assert "p-a-1-mesh" not in meshd.hub.nodes          # until the new one connects
    entry = meshd.status()["sidecars"][0]
    assert entry["connected"] is False and entry["acked_version"] is None


async def test_hold_released_only_by_a_listing_after_it(meshd, monkeypatch):
    """`compose start` of a stopped app: the hold comes from the start event while meshd's last
    listing still shows the app stopped; that listing must not make meshd forget the (paused) app."""
    import dataclasses
    import time

    thawed = []
    meshd.docker.set_paused = lambda cid, paused: thawed.append((cid, paused)) or True
    monkeypatch.setattr(app_module, "sidecar_ready", lambda ip: _true())
    stopped = dataclasses.replace(app("a"), running=False, networks={})
    meshd.docker.view = DockerView(apps=[stopped], sidecars=[], gateway=None, network_gateways={}, image_id=None)
    await meshd.rebuild()                       # the listing before the start
    meshd.holds.add("id-a", time.time() + 1)    # the start event comes after it
    await meshd._release_ready_holds()
    assert meshd.holds.since and thawed == []   # still held: the listing is older than the hold
    meshd.docker.view = DockerView(apps=[app("a")], sidecars=[], gateway=None,
                                   network_gateways={"p_default": UNROUTABLE}, image_id=None)
    meshd.view_listed_at = time.time() + 2      # a listing begun after the hold: the app runs
    meshd.view = meshd.docker.view
    await meshd._release_ready_holds()
    assert thawed == [("id-a", False)] and not meshd.holds.since


async def _true() -> bool:
    return True
