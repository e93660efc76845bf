"""Pure reconcile decisions of meshd: which sidecars to create and remove, what each is told."""

from __future__ import annotations

from dataclasses import dataclass

from meshcore.labels import ContainerInfo, SIDECAR_FOR_LABEL, spiffe_id
from meshcore.protocol import CONTROL_PATH, CONTROL_PORT
from meshcore.snapshot import Workload


@dataclass(frozen=True)
class SidecarPlan:
    """What to change so that every healthy meshed container has exactly one current sidecar."""

    create: tuple[Workload, ...]
    remove: tuple[ContainerInfo, ...]
    keep: tuple[ContainerInfo, ...]


def _is_current(sidecar: ContainerInfo, app: ContainerInfo, image_id: str | None) -> bool:
    if not sidecar.running:
        return False
    # A sidecar started before its app's latest start sits in a network namespace that is gone.
    if app.started_at and sidecar.started_at and sidecar.started_at < app.started_at:
        return False
    if image_id and sidecar.image and sidecar.image != image_id:
        return False
    # Made by an older meshd: its (spent) token would stay in `docker inspect` for good.
    return not sidecar.token_in_env


def plan_sidecars(workloads: list[Workload], sidecars: list[ContainerInfo],
                  image_id: str | None) -> SidecarPlan:
    """Decide creations and removals; adopts existing current sidecars, never duplicates."""
    wanted = {wl.container.id: wl for wl in workloads if wl.spec is not None and wl.container.running}
    by_app: dict[str, list[ContainerInfo]] = {}
    remove: list[ContainerInfo] = []
    for sc in sorted(sidecars, key=lambda s: (not s.running, s.started_at), reverse=False):
        app_id = sc.labels.get(SIDECAR_FOR_LABEL, "")
        if app_id not in wanted:
            remove.append(sc)
        else:
            by_app.setdefault(app_id, []).append(sc)
    create: list[Workload] = []
    keep: list[ContainerInfo] = []
    for app_id, wl in sorted(wanted.items()):
        current = [sc for sc in by_app.get(app_id, []) if _is_current(sc, wl.container, image_id)]
        stale = [sc for sc in by_app.get(app_id, []) if sc not in current]
        remove.extend(stale)
        if current:
            # Keep the newest current one; any extra is a duplicate.
            current.sort(key=lambda s: s.started_at, reverse=True)
            keep.append(current[0])
            remove.extend(current[1:])
        else:
            create.append(wl)
    return SidecarPlan(create=tuple(create), remove=tuple(remove), keep=tuple(keep))


def build_sidecar_env(wl: Workload, node_name: str, control_host: str, trust_domain: str,
                      bundle_pem: str = "") -> dict[str, str]:
    """The environment a sidecar starts with (see docs/DESIGN.md); never a secret: `docker inspect`
    shows it. `bundle_pem` is the mesh's trust bundle (public), with which the node verifies meshd's
    control endpoint; the one-time bootstrap token goes in as a file (meshd.docker_adapter).
    """
    spec = wl.spec
    assert spec is not None
    env = {
        "MESH_CONTROL_URL": f"wss://{control_host}:{CONTROL_PORT}{CONTROL_PATH}",
        "MESH_NODE": node_name,
        "MESH_CONTAINER": wl.container.id,
        "MESH_SERVICE": spec.service,
        "MESH_NAMESPACE": spec.namespace,
        "MESH_VERSION": spec.version,
        "MESH_APP_PORT": str(spec.port),
        "MESH_PROTOCOL": spec.protocol,
        "MESH_CAPTURE": spec.capture,
        "MESH_IDENTITY": spiffe_id(trust_domain, spec.namespace, spec.service),
    }
    if bundle_pem:
        env["MESH_CA_BUNDLE"] = bundle_pem
    return env


def control_host_for(app: ContainerInfo, network_gateways: dict[str, str]) -> str | None:
    """The address of meshd as seen from an app's network namespace (its first bridge's gateway)."""
    for name in sorted(app.networks):
        if name in network_gateways:
            return network_gateways[name]
    return None
