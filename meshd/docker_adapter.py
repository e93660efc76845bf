"""Docker at the edge: containers in, plain ContainerInfo out; sidecar and gateway containers made."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import docker
import docker.errors

from meshcore.labels import (
    ContainerInfo, OWNER_LABEL, ROLE_LABEL, SIDECAR_FOR_LABEL, is_mesh_enabled, is_mesh_owned,
)

OWNER = "meshd"
SIDECAR_ROLE = "sidecar"
GATEWAY_ROLE = "gateway"
GATEWAY_NAME = "meshd-gateway"


def decode_container_attrs(attrs: dict[str, Any]) -> ContainerInfo:
    """A ContainerInfo from `docker inspect` output (pure)."""
    config = attrs.get("Config") or {}
    state = attrs.get("State") or {}
    host_config = attrs.get("HostConfig") or {}
    networks = (attrs.get("NetworkSettings") or {}).get("Networks") or {}
    exposed = []
    for key in (config.get("ExposedPorts") or {}):
        port, _, proto = key.partition("/")
        if proto in ("", "tcp") and port.isdigit():
            exposed.append(int(port))
    return ContainerInfo(
        id=attrs.get("Id", ""),
        name=(attrs.get("Name") or "").lstrip("/"),
        labels=dict(config.get("Labels") or {}),
        exposed_ports=tuple(sorted(exposed)),
        networks={name: net.get("IPAddress") for name, net in networks.items() if net.get("IPAddress")},
        running=bool(state.get("Running")) and not state.get("Restarting"),
        started_at=state.get("StartedAt", ""),
        network_mode=host_config.get("NetworkMode", ""),
        image=attrs.get("Image", ""),
    )


@dataclass(frozen=True)
class DockerView:
    """One full listing: meshed app containers, our sidecars, our gateway, network gateways."""

    apps: list[ContainerInfo]
    sidecars: list[ContainerInfo]
    gateway: ContainerInfo | None
    network_gateways: dict[str, str]  # network name -> gateway IPv4 (the host's address on it)
    image_id: str | None              # id of the mesh image sidecars should run


def sidecar_name(app: ContainerInfo) -> str:
    """The sidecar container's name for an app container."""
    return f"{app.name}-mesh"


class DockerAdapter:
    """Blocking Docker SDK calls; meshd runs them in a worker thread."""

    def __init__(self, client: docker.DockerClient, image: str):
        self.client = client
        self.image = image
        self._network_gateways: dict[str, str] = {}

    def list_view(self) -> DockerView:
        """List every container once and inspect the ones that matter to the mesh."""
        apps, sidecars, gateway = [], [], None
        for summary in self.client.api.containers(all=True):
            labels = summary.get("Labels") or {}
            if not (is_mesh_enabled(labels) or is_mesh_owned(labels)):
                continue
            try:
                info = decode_container_attrs(self.client.api.inspect_container(summary["Id"]))
            except docker.errors.NotFound:
                continue  # gone between list and inspect; the next event rebuilds again
            if labels.get(OWNER_LABEL) == OWNER and labels.get(ROLE_LABEL) == SIDECAR_ROLE:
                sidecars.append(info)
            elif labels.get(OWNER_LABEL) == OWNER and labels.get(ROLE_LABEL) == GATEWAY_ROLE:
                gateway = info
            elif not is_mesh_owned(labels):
                apps.append(info)
        names = {n for app in apps if app.running for n in app.networks}
        gateways = {n: gw for n in sorted(names) if (gw := self._network_gateway(n))}
        try:
            image_id = self.client.images.get(self.image).id
        except docker.errors.ImageNotFound:
            image_id = None
        return DockerView(apps=apps, sidecars=sidecars, gateway=gateway, network_gateways=gateways,
                          image_id=image_id)

    def _network_gateway(self, name: str) -> str | None:
        if name not in self._network_gateways:
            try:
                net = self.client.api.inspect_network(name)
            except docker.errors.NotFound:
                return None
            if (net.get("Driver") or "") != "bridge":
                return None  # mDNS and the control channel live on bridge networks only
            for cfg in (net.get("IPAM") or {}).get("Config") or []:
                gw = cfg.get("Gateway")
                if gw and ":" not in gw:
                    self._network_gateways[name] = gw
                    break
        return self._network_gateways.get(name)

    def create_sidecar(self, app: ContainerInfo, env: dict[str, str]) -> str:
        """Start the sidecar of `app` in its network namespace; returns the container id."""
        name = sidecar_name(app)
        self.remove(name)
        container = self.client.containers.run(
            self.image, command=["sidecar", "run"], name=name, detach=True,
            network_mode=f"container:{app.id}", cap_add=["NET_ADMIN", "NET_RAW"],
            labels={OWNER_LABEL: OWNER, ROLE_LABEL: SIDECAR_ROLE, SIDECAR_FOR_LABEL: app.id},
            environment=env, restart_policy={"Name": "on-failure", "MaximumRetryCount": 5},
            log_config={"Type": "json-file", "Config": {"max-size": "10m", "max-file": "2"}},
        )
        return container.id

    def create_gateway(self, env: dict[str, str], volumes: list[str] | None = None) -> str:
        """Start the gateway container in the host network namespace; returns its id."""
        self.remove(GATEWAY_NAME)
        container = self.client.containers.run(
            self.image, command=["gateway", "run"], name=GATEWAY_NAME, detach=True,
            network_mode="host", labels={OWNER_LABEL: OWNER, ROLE_LABEL: GATEWAY_ROLE},
            environment=env, volumes=volumes or None, restart_policy={"Name": "unless-stopped"},
            log_config={"Type": "json-file", "Config": {"max-size": "10m", "max-file": "2"}},
        )
        return container.id

    def remove(self, name_or_id: str) -> bool:
        """Force-remove a container; False when it did not exist."""
        try:
            self.client.api.remove_container(name_or_id, force=True)
            return True
        except docker.errors.NotFound:
            return False
        except docker.errors.APIError as exc:
            if "already in progress" in str(exc):
                return True
            raise
