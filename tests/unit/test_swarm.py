"""meshcore.swarm: Swarm API objects (recorded from the test cluster, compose/swarm-demo.yml) as
the plain containers and announcements the Compose path turns into a snapshot."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from meshcore.snapshot import build_config, build_workloads
from meshcore.swarm import (
    MESH_INBOUND_PORT, decode_nodes, decode_tasks, decode_view, endpoint_address, node_of_address,
    service_labels, swarm_announcements, task_addresses, task_container_name, tasks_on_node,
)

FIXTURES = Path(__file__).parent / "swarm_fixtures"
NODE1, NODE2, NODE3 = "wx04ecspuxi7f0hi705jojqxj", "26575u3vjkz5qdwvsu7gd1t5j", "0qcktgfd4u0xfw0lpslalyil7"


def load(name: str):
    return json.loads((FIXTURES / f"{name}.json").read_text())


@pytest.fixture
def api():
    return load("services"), load("tasks"), load("nodes")


def test_nodes_decode_roles_and_leader(api):
    nodes = decode_nodes(api[2])
    assert [(n.hostname, n.role, n.state, n.leader) for n in nodes] == [
        ("meshswarm-1", "manager", "ready", True),
        ("meshswarm-2", "manager", "ready", False),
        ("meshswarm-3", "manager", "ready", False),
    ]
    assert nodes[0].id == NODE1 and nodes[0].addr == "192.168.80.2"


def test_every_running_task_becomes_a_container_named_as_the_engine_names_it(api):
    tasks = decode_tasks(api[0], api[1])
    assert len(tasks) == 8
    payments = [t for t in tasks if t.service == "shop_payments"]
    assert {t.node_id for t in payments} == {NODE2, NODE3}
    one = next(t for t in payments if t.node_id == NODE3)
    assert one.container.name == "shop_payments.1.p50hg63gp779xm0xxspp3k5f7"
    assert one.container.id.startswith("25752f50eeba")
    assert one.container.networks == {"mesh": "10.0.2.5"}   # the task's address, never a VIP
    assert one.container.running


@pytest.mark.parametrize("service, expected", [
    # deploy.labels (service labels) are read ...
    ("shop_orders", {"mesh.enable": "true", "mesh.gateway.path": "/api/orders",
                     "com.docker.compose.project": "shop", "com.docker.compose.service": "orders"}),
    # ... and so are container labels
    ("shop_inventory", {"mesh.enable": "true", "mesh.port": "8080",
                        "com.docker.compose.project": "shop", "com.docker.compose.service": "inventory"}),
    ("shop_catalog-v2", {"mesh.service": "catalog", "mesh.version": "v2",
                         "com.docker.compose.service": "catalog-v2"}),
])
def test_labels_from_deploy_and_container_with_the_stack_as_project(api, service, expected):
    svc = next(s for s in api[0] if s["Spec"]["Name"] == service)
    labels = service_labels(svc)
    assert {k: labels.get(k) for k in expected} == expected


def test_deploy_labels_win_over_container_labels():
    svc = {"Spec": {"Name": "st_web", "Labels": {"mesh.port": "9000", "com.docker.stack.namespace": "st"},
                    "TaskTemplate": {"ContainerSpec": {"Labels": {"mesh.port": "8000", "mesh.enable": "true"}}}}}
    assert service_labels(svc)["mesh.port"] == "9000"
    assert service_labels(svc)["mesh.enable"] == "true"


def test_no_stack_no_project_label():
    svc = {"Spec": {"Name": "web", "Labels": {"mesh.enable": "true"}}}
    assert "com.docker.compose.project" not in service_labels(svc)


def test_snapshot_from_swarm_has_stack_namespace_and_task_endpoints(api):
    tasks = decode_tasks(api[0], api[1])
    workloads = build_workloads([t.container for t in tasks])
    assert all(wl.spec is not None for wl in workloads), [wl.error for wl in workloads]
    ready = {t.container.id for t in tasks}
    anns = swarm_announcements(workloads, ready, "mesh.local", network="mesh")
    config, errors = build_config(workloads, anns, "mesh.local")
    assert errors == []
    assert sorted(config.services) == ["catalog", "inventory", "notifications", "orders", "payments", "users"]
    assert config.services["payments"].identity == "spiffe://mesh.local/ns/shop/sa/payments"
    # the traffic policy labels from deploy.labels reach the workload the policy is decoded from
    payments = next(wl for wl in workloads if wl.spec.service == "payments")
    assert payments.container.labels["mesh.retries.attempts"] == "3"
    assert config.services["payments"].policy != config.services["users"].policy
    assert [(e.address, e.port) for e in config.endpoints["payments"]] == [
        ("10.0.2.5", MESH_INBOUND_PORT), ("10.0.2.6", MESH_INBOUND_PORT)]
    assert sorted(e.version for e in config.endpoints["catalog"]) == ["v1", "v2"]
    assert {r.path: r.service for r in config.gateway_routes} == {"/api/orders": "orders", "/api/catalog": "catalog"}


def test_only_tasks_with_a_ready_sidecar_are_endpoints(api):
    tasks = decode_tasks(api[0], api[1])
    workloads = build_workloads([t.container for t in tasks])
    one = next(t for t in tasks if t.service == "shop_payments" and t.node_id == NODE2)
    anns = swarm_announcements(workloads, {one.container.id}, "mesh.local")
    assert [(a.service, a.address) for a in anns] == [("payments", "10.0.2.6")]


def _task(api, service: str) -> dict:
    sid = next(s["ID"] for s in api[0] if s["Spec"]["Name"] == service)
    return copy.deepcopy(next(t for t in api[1] if t["ServiceID"] == sid))


@pytest.mark.parametrize("change, kept, running", [
    (lambda t: t["Status"].update(State="starting"), True, False),     # not yet started (or healthy)
    (lambda t: t.update(DesiredState="shutdown"), False, False),        # being stopped: no sidecar wanted
    (lambda t: t["Status"].update(ContainerStatus={}), False, False),   # no container yet
    (lambda t: t.update(ServiceID="gone"), False, False),               # its service is not listed
])
def test_task_states(api, change, kept, running):
    task = _task(api, "shop_orders")
    change(task)
    tasks = decode_tasks(api[0], [task])
    assert bool(tasks) == kept
    if kept:
        assert tasks[0].container.running == running


def test_global_task_is_named_by_node():
    assert task_container_name("mesh_agent", {"ID": "t1", "NodeID": "n1"}) == "mesh_agent.n1.t1"
    assert task_container_name("shop_orders", {"ID": "t2", "NodeID": "n1", "Slot": 3}) == "shop_orders.3.t2"


@pytest.mark.parametrize("attachments, expected", [
    ([{"Network": {"Spec": {"Name": "mesh"}}, "Addresses": ["10.0.2.5/24"]}], {"mesh": "10.0.2.5"}),
    ([{"Network": {"Spec": {"Name": "ingress", "Ingress": True}}, "Addresses": ["10.0.0.5/24"]},
      {"Network": {"Spec": {"Name": "shop_default"}}, "Addresses": ["10.0.3.4/24"]}], {"shop_default": "10.0.3.4"}),
    ([{"Network": {"Spec": {"Name": "v6"}}, "Addresses": ["fd00::5/64"]}], {}),
    ([{"Network": {"Spec": {"Name": "bad"}}, "Addresses": ["nonsense"]}], {}),
    ([], {}),
])
def test_task_addresses(attachments, expected):
    assert task_addresses({"NetworksAttachments": attachments}) == expected


@pytest.mark.parametrize("networks, preferred, expected", [
    ({"mesh": "10.0.2.5", "a_default": "10.0.3.2"}, "mesh", "10.0.2.5"),
    ({"mesh": "10.0.2.5", "a_default": "10.0.3.2"}, "", "10.0.3.2"),
    ({"a_default": "10.0.3.2"}, "mesh", "10.0.3.2"),
    ({}, "mesh", None),
])
def test_endpoint_address(networks, preferred, expected):
    assert endpoint_address(networks, preferred) == expected


def test_node_of_address_and_tasks_on_node(api):
    view = decode_view(*api)
    assert node_of_address(view.tasks, "shop_payments", "10.0.2.6") == NODE2
    assert node_of_address(view.tasks, "shop_orders", "10.0.2.6") is None   # someone else's address
    assert {t.service for t in tasks_on_node(view.tasks, NODE3)} == {
        "shop_payments", "shop_notifications", "shop_orders"}


def test_task_by_container_needs_a_long_enough_id(api):
    view = decode_view(*api)
    assert view.task_by_container("25752f50eeba").service == "shop_payments"
    assert view.task_by_container("25752") is None
    assert view.task_by_container("ffffffffffff") is None
