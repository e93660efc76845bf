"""Docker Swarm's API objects as the mesh sees them: tasks as plain containers; pure, stdlib only.

The Swarm control plane lists services, tasks and nodes on a manager's engine (`GET /services`,
`/tasks`, `/nodes`). Each running task becomes the same ContainerInfo the Compose path reads from
`docker inspect`, so that meshcore.snapshot builds one MeshConfig for both:

- labels: the task's container labels (`labels:` of a stack service) overlaid by the service labels
  (`deploy.labels`, where Traefik's Swarm provider reads them), so `mesh.*` works in either place;
- namespace: the stack (`com.docker.stack.namespace`), given to the labels decoder as the Compose
  project; the service's name in the stack (`<stack>_` stripped) as the Compose service;
- addresses: the task's overlay addresses (NetworksAttachments), never the service VIP: IPVS would
  balance connections behind the mesh and the per-endpoint SPIFFE check would no longer hold.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any, Iterable

from .labels import COMPOSE_PROJECT, COMPOSE_SERVICE, ContainerInfo, spiffe_id
from .snapshot import Announcement, Workload

STACK_NAMESPACE = "com.docker.stack.namespace"   # set by `docker stack deploy` on services and containers
SWARM_TASK_ID = "com.docker.swarm.task.id"       # set by the engine on every task container
SWARM_NODE_ID = "com.docker.swarm.node.id"
# The sidecar's inbound listener (the mesh port every caller dials; see RESERVED_PORTS in labels).
MESH_INBOUND_PORT = 15006


@dataclass(frozen=True)
class SwarmNode:
    """One node of the swarm (`GET /nodes`)."""

    id: str
    hostname: str
    role: str            # "manager" | "worker"
    state: str           # "ready" | "down" | "unknown" | "disconnected"
    availability: str    # "active" | "pause" | "drain"
    leader: bool = False
    addr: str = ""


@dataclass(frozen=True)
class SwarmTask:
    """One task with a container, as plain data: where it runs, and the container it is."""

    id: str
    service_id: str
    service: str                 # the Swarm service name (`<stack>_<name>`)
    node_id: str
    container: ContainerInfo
    state: str = ""              # Status.State: "running" once started (and healthy, with a health check)
    desired: str = ""            # DesiredState


def decode_nodes(nodes: Iterable[dict[str, Any]]) -> list[SwarmNode]:
    """SwarmNode per `GET /nodes` entry, sorted by hostname (pure)."""
    out = []
    for n in nodes:
        spec = n.get("Spec") or {}
        status = n.get("Status") or {}
        manager = n.get("ManagerStatus") or {}
        out.append(SwarmNode(
            id=n.get("ID", ""), hostname=(n.get("Description") or {}).get("Hostname", ""),
            role=spec.get("Role", ""), state=status.get("State", ""),
            availability=spec.get("Availability", ""), leader=bool(manager.get("Leader")),
            addr=status.get("Addr", "")))
    return sorted(out, key=lambda n: (n.hostname, n.id))


def _strip_prefix(cidr: str) -> str:
    """`10.0.1.5/24` -> `10.0.1.5`; '' when not an IPv4 address (IPv6 is not meshed yet)."""
    try:
        iface = ipaddress.ip_interface(cidr)
    except ValueError:
        return ""
    return str(iface.ip) if iface.version == 4 else ""


def task_addresses(task: dict[str, Any]) -> dict[str, str]:
    """network name -> the task's IPv4 address on it, from NetworksAttachments (ingress excluded:
    the routing mesh's network carries published ports, never mesh traffic)."""
    out: dict[str, str] = {}
    for att in task.get("NetworksAttachments") or []:
        net = att.get("Network") or {}
        spec = net.get("Spec") or {}
        if spec.get("Ingress") or (spec.get("Labels") or {}).get("com.docker.swarm.internal") == "true":
            continue
        name = spec.get("Name") or net.get("ID", "")
        for cidr in att.get("Addresses") or []:
            ip = _strip_prefix(cidr)
            if ip:
                out[name] = ip
                break
    return out


def task_container_name(service: str, task: dict[str, Any]) -> str:
    """The engine's name for a task's container: `<service>.<slot>.<task id>` (replicated) or
    `<service>.<node id>.<task id>` (global, no slot)."""
    slot = task.get("Slot")
    middle = str(slot) if slot else task.get("NodeID", "")
    return f"{service}.{middle}.{task.get('ID', '')}"


def service_labels(service: dict[str, Any]) -> dict[str, str]:
    """The labels a service's tasks are meshed by: container labels, then `deploy.labels` over
    them, then the stack and the service's name in it as the Compose project and service."""
    spec = service.get("Spec") or {}
    container = ((spec.get("TaskTemplate") or {}).get("ContainerSpec") or {}).get("Labels") or {}
    labels = {**container, **(spec.get("Labels") or {})}
    name = spec.get("Name", "")
    stack = labels.get(STACK_NAMESPACE, "")
    if stack:
        labels.setdefault(COMPOSE_PROJECT, stack)
        short = name[len(stack) + 1:] if name.startswith(stack + "_") else name
        labels.setdefault(COMPOSE_SERVICE, short)
    return labels


def decode_tasks(services: Iterable[dict[str, Any]], tasks: Iterable[dict[str, Any]]) -> list[SwarmTask]:
    """The tasks that have (or are to have) a container and should run, as SwarmTasks (pure).

    A task is `running` only in state running: Swarm moves a task with a health check there only
    once it is healthy, so no health is carried. Tasks of services not listed are left out."""
    by_id = {s.get("ID", ""): s for s in services}
    out = []
    for t in tasks:
        service = by_id.get(t.get("ServiceID", ""))
        status = t.get("Status") or {}
        cid = (status.get("ContainerStatus") or {}).get("ContainerID") or ""
        if service is None or not cid or t.get("DesiredState") != "running":
            continue
        name = (service.get("Spec") or {}).get("Name", "")
        image = (((service.get("Spec") or {}).get("TaskTemplate") or {}).get("ContainerSpec") or {}).get("Image", "")
        info = ContainerInfo(
            id=cid, name=task_container_name(name, t), labels=service_labels(service),
            networks=task_addresses(t), running=status.get("State") == "running",
            started_at=status.get("Timestamp", ""), image=image, created=t.get("CreatedAt", ""))
        out.append(SwarmTask(id=t.get("ID", ""), service_id=service.get("ID", ""), service=name,
                             node_id=t.get("NodeID", ""), container=info, state=status.get("State", ""),
                             desired=t.get("DesiredState", "")))
    return sorted(out, key=lambda t: t.container.name)


def endpoint_address(networks: dict[str, str], preferred: str = "") -> str | None:
    """The address callers dial a task at: on the `preferred` network (the mesh's overlay) when the
    task is on it, else on its first network by name; None without any."""
    if preferred and networks.get(preferred):
        return networks[preferred]
    return next((networks[n] for n in sorted(networks) if networks[n]), None)


def swarm_announcements(workloads: Iterable[Workload], ready: set[str], trust_domain: str,
                        network: str = "") -> list[Announcement]:
    """What mDNS would have announced on one host: one endpoint per meshed running task whose
    sidecar is ready (its container id in `ready`), at the task's overlay address and the mesh port."""
    out = []
    for wl in workloads:
        info, spec = wl.container, wl.spec
        if spec is None or not info.running or info.id not in ready:
            continue
        address = endpoint_address(info.networks, network)
        if address is None:
            continue
        out.append(Announcement(instance=info.id, service=spec.service, version=spec.version,
                                address=address, port=MESH_INBOUND_PORT,
                                identity=spiffe_id(trust_domain, spec.namespace, spec.service),
                                protocol=spec.protocol))
    return out


def tasks_on_node(tasks: Iterable[SwarmTask], node_id: str) -> list[SwarmTask]:
    """The tasks the engine placed on one node."""
    return [t for t in tasks if t.node_id == node_id]


def node_of_address(tasks: Iterable[SwarmTask], service: str, address: str) -> str | None:
    """The node of the running task of `service` that holds `address` (who is calling, by source
    address on the overlay); None when no such task."""
    for t in tasks:
        if t.service == service and t.container.running and address in t.container.networks.values():
            return t.node_id
    return None


@dataclass(frozen=True)
class SwarmView:
    """One listing of the swarm: nodes, and the tasks of every service."""

    nodes: list[SwarmNode] = field(default_factory=list)
    tasks: list[SwarmTask] = field(default_factory=list)

    def task_by_container(self, container_id: str) -> SwarmTask | None:
        """The task whose container has this id (full id, or a prefix of at least 12 characters)."""
        if len(container_id) < 12:
            return None
        return next((t for t in self.tasks if t.container.id.startswith(container_id)), None)


def decode_view(services: list[dict[str, Any]], tasks: list[dict[str, Any]],
                nodes: list[dict[str, Any]]) -> SwarmView:
    """A SwarmView from the three listings (pure)."""
    return SwarmView(nodes=decode_nodes(nodes), tasks=decode_tasks(services, tasks))
