"""The Swarm control plane's and agent's pure parts: the swarm's facts in the shapes meshd.auth
checks, the per-node status, the agent's view of local tasks, the sidecar's dial of a name."""

from __future__ import annotations

import json
from pathlib import Path

from meshcore.bootstrap import Placement, check_placement
from meshcore.labels import decode_labels
from meshcore.swarm import decode_view
from meshd.control import NodeState
from meshd.docker_adapter import decode_container_attrs, sidecar_name
from meshd.swarm_agent import local_apps
from meshd.swarm_control import swarm_status, task_inspect_attrs, vouched_sidecar_attrs
from meshcore.control_address import parse_proc_net_route
from sidecar.control import ControlClient

FIXTURES = Path(__file__).parent / "swarm_fixtures"
NODE2 = "26575u3vjkz5qdwvsu7gd1t5j"


def view():
    return decode_view(*(json.loads((FIXTURES / f"{n}.json").read_text()) for n in ("services", "tasks", "nodes")))


def payments_on_node2():
    return next(t for t in view().tasks if t.service == "shop_payments" and t.node_id == NODE2)


def test_task_attrs_decode_back_to_the_task_container():
    task = payments_on_node2()
    info = decode_container_attrs(task_inspect_attrs(task))
    assert (info.id, info.name, info.networks, info.running) == (
        task.container.id, task.container.name, {"mesh": "10.0.2.6"}, True)
    spec = decode_labels(info)
    assert (spec.namespace, spec.service, spec.port) == ("shop", "payments", 8080)


def test_a_vouched_sidecar_passes_the_one_host_placement_check():
    task = payments_on_node2()
    app = decode_container_attrs(task_inspect_attrs(task))
    node = decode_container_attrs(vouched_sidecar_attrs(sidecar_name(app), app.id))
    placement = Placement(kind="sidecar", node_labels=node.labels, node_network_mode=node.network_mode,
                          node_running=node.running, app_id=app.id, app_ips=tuple(app.networks.values()),
                          peer_ip="10.0.2.6")
    assert check_placement(placement) is None
    # from another task's address: refused, as on one host
    elsewhere = Placement(**{**placement.__dict__, "peer_ip": "10.0.2.5"})
    assert "not from the app container" in check_placement(elsewhere)


def test_status_lists_nodes_agents_and_sidecars_per_node():
    v = view()
    task = payments_on_node2()
    nodes = {sidecar_name(task.container): NodeState(node=sidecar_name(task.container), kind="sidecar",
                                                      container=task.container.id, connected=True,
                                                      acked_version=7)}
    status = swarm_status(v, nodes, "mesh_agent")
    by_host = {n["hostname"]: n for n in status["nodes"]}
    assert sorted(by_host) == ["meshswarm-1", "meshswarm-2", "meshswarm-3"]
    assert by_host["meshswarm-1"]["leader"] and not by_host["meshswarm-2"]["leader"]
    assert not any(n["agent"] for n in status["nodes"])   # the fixture has no agent service
    node2 = {s["task"]: s for s in by_host["meshswarm-2"]["sidecars"]}
    assert node2[task.container.name] == {"task": task.container.name, "service": "payments",
                                          "connected": True, "acked_version": 7}
    assert sum(len(n["sidecars"]) for n in status["nodes"]) == 8


def test_agent_takes_the_control_planes_labels_and_its_own_engines_facts():
    task = payments_on_node2()
    local = decode_container_attrs({"Id": task.container.id, "Name": "/" + task.container.name,
                                    "Config": {"Labels": {"com.docker.stack.namespace": "shop"}},
                                    "State": {"Running": True, "StartedAt": "2026-12-05T13:35:00Z"}})
    entries = [{"container": task.container.id, "labels": task.container.labels},
               {"container": "not-here", "labels": {"mesh.enable": "true"}}]
    apps = local_apps(entries, {task.container.id: local})
    assert len(apps) == 1
    assert apps[0].started_at == "2026-12-05T13:35:00Z" and apps[0].labels["mesh.enable"] == "true"


ROUTES = """Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT
eth1\t00000000\t010012AC\t0003\t0\t0\t0\t00000000\t0\t0\t0
eth0\t0000000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
"""   # default via 172.18.0.1 (docker_gwbridge), 10.0.0.0/24 on-link (the overlay)


def test_a_control_name_is_dialled_at_its_resolved_overlay_address():
    routes = parse_proc_net_route(ROUTES)
    client = ControlClient("wss://mesh_control:15012/v1/stream", "sidecar", "n", "c", apply=lambda s: None,
                           routes=lambda: routes)
    assert client.dial_url("10.0.0.7") == "wss://10.0.0.7:15012/v1/stream"
    # resolved off-link (or not at all): the namespace's default gateway, as before
    assert client.dial_url("192.0.2.9") == "wss://172.18.0.1:15012/v1/stream"
    assert client.dial_url(None) == "wss://172.18.0.1:15012/v1/stream"


async def test_only_names_are_resolved():
    ip = ControlClient("wss://10.0.0.7:15012/v1/stream", "sidecar", "n", "c", apply=lambda s: None,
                       routes=lambda: [])
    assert await ip._resolve_host() is None
    name = ControlClient("wss://localhost:15012/v1/stream", "sidecar", "n", "c", apply=lambda s: None,
                         routes=lambda: [])
    assert await name._resolve_host() == "127.0.0.1"
    bad = ControlClient("wss://no-such-host.invalid:15012/v1/stream", "sidecar", "n", "c",
                        apply=lambda s: None, routes=lambda: [])
    assert await bad._resolve_host() is None


def test_a_gateway_is_admitted_only_from_its_nodes_agent_task():
    from types import SimpleNamespace

    from meshcore.swarm import SwarmTask, SwarmView
    from meshd.swarm_control import GATEWAY_PREFIX, SwarmAuthenticator
    from meshcore.labels import ContainerInfo

    agent = SwarmTask(id="t", service_id="s", service="mesh_agent", node_id=NODE2,
                      container=ContainerInfo(id="a" * 64, name="mesh_agent.x.t", networks={"mesh": "10.0.3.4"}))
    plane = SimpleNamespace(swarm_view=SwarmView(tasks=[agent]), swarm=SimpleNamespace(agent_service="mesh_agent"))
    auth = SwarmAuthenticator.__new__(SwarmAuthenticator)
    auth.plane = plane
    assert auth._gateway_placement(GATEWAY_PREFIX + NODE2, "10.0.3.4") is None
    assert "not from the agent task" in auth._gateway_placement(GATEWAY_PREFIX + NODE2, "10.0.3.9")
    assert "not from the agent task" in auth._gateway_placement(GATEWAY_PREFIX + "othernode", "10.0.3.4")
    assert "is not the gateway" in auth._gateway_placement("gateway", "10.0.3.4")


def test_meshctl_status_lists_swarm_nodes_agents_gateways_and_sidecars(monkeypatch):
    from tests.unit import test_meshctl_commands as cmds
    from meshctl import overview

    v = view()
    task = payments_on_node2()
    nodes = {sidecar_name(task.container): NodeState(node=sidecar_name(task.container), kind="sidecar",
                                                      container=task.container.id, connected=True)}
    status = {**cmds.STATUS, "swarm": swarm_status(v, nodes, "mesh_agent")}
    monkeypatch.setitem(cmds.ANSWERS, "/v1/status", status)
    result, _ = cmds.invoke(overview.commands, ["status"], columns=200)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    rows = {line.split()[0]: line.split() for line in lines if line.startswith("meshswarm-") and "manager" in line}
    assert rows["meshswarm-1"][1:3] == ["(leader)", "manager"]
    assert rows["meshswarm-2"][-1] == "1/3" and rows["meshswarm-3"][-1] == "0/3"
    assert rows["meshswarm-2"][3:5] == ["no", "no"]     # no agent, no gateway in the fixture
    assert sum("not connected" in line for line in lines) == 7
