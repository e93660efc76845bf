"""Docker at the edge: containers in, plain ContainerInfo out; sidecar and gateway containers made."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import docker
import docker.errors
import requests

from meshcore.bootstrap import TOKEN_DIR_PARENT, TOKEN_ENV, token_archive
from meshcore.labels import (
    ContainerInfo, OWNER_LABEL, ROLE_LABEL, SIDECAR_FOR_LABEL, is_mesh_enabled, is_mesh_owned,
)

OWNER = "meshd"
SIDECAR_ROLE = "sidecar"
GATEWAY_ROLE = "gateway"
GATEWAY_NAME = "meshd-gateway"
INSPECT_PARALLEL = 4   # inspections of one listing in flight at once


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
        health=str((state.get("Health") or {}).get("Status") or ""),
        paused=bool(state.get("Paused")),
        created=str(attrs.get("Created") or ""),
        token_in_env=any(str(e).startswith(TOKEN_ENV + "=") for e in config.get("Env") or ()),
    )


def decode_container_summary(summary: dict[str, Any]) -> ContainerInfo:
    """A ContainerInfo from a `GET /containers/json` entry (pure): all an inspection gives but the
    start time, which stays empty (the plan then does not judge a sidecar by it)."""
    state = summary.get("State") or ""
    status = summary.get("Status") or ""
    health = next((h for h, marker in (("unhealthy", "(unhealthy)"), ("healthy", "(healthy)"),
                                       ("starting", "(health: starting)")) if marker in status), "")
    networks = (summary.get("NetworkSettings") or {}).get("Networks") or {}
    names = summary.get("Names") or [""]
    return ContainerInfo(
        id=summary.get("Id", ""),
        name=names[0].lstrip("/"),
        labels=dict(summary.get("Labels") or {}),
        exposed_ports=tuple(sorted({p["PrivatePort"] for p in summary.get("Ports") or []
                                    if p.get("Type", "tcp") == "tcp" and isinstance(p.get("PrivatePort"), int)})),
        networks={name: net.get("IPAddress") for name, net in networks.items() if net.get("IPAddress")},
        running=state in ("running", "paused"),
        started_at="",
        network_mode=(summary.get("HostConfig") or {}).get("NetworkMode", ""),
        image=summary.get("ImageID", ""),
        health=health,
        paused=state == "paused",
    )


@dataclass(frozen=True)
class DockerView:
    """One full listing: meshed app containers, our sidecars, our gateway, network gateways."""

    apps: list[ContainerInfo]
    sidecars: list[ContainerInfo]
    gateway: ContainerInfo | None
    network_gateways: dict[str, str]  # network name -> gateway IPv4 (the host's address on it)
    image_id: str | None              # id of the mesh image sidecars should run

    def mesh_address(self, app: ContainerInfo) -> str | None:
        """The app's IPv4 on a mesh bridge (where meshd, in the host namespace, reaches its sidecar)."""
        return next((app.networks[n] for n in sorted(self.network_gateways) if app.networks.get(n)), None)


def sidecar_name(app: ContainerInfo) -> str:
    """The sidecar container's name for an app container."""
    return f"{app.name}-mesh"


def bridge_gateways(networks: list[dict[str, Any]], names: set[str]) -> dict[str, str]:
    """network name -> IPv4 gateway (the host's address on it) of the bridge networks among `names`,
    from one `GET /networks` listing (pure). Nothing is remembered between listings: Compose re-creates
    `<project>_default` under the same name with a new subnet on every `down` + `up`."""
    out: dict[str, str] = {}
    for net in networks:
        name = net.get("Name") or ""
        if name not in names or (net.get("Driver") or "") != "bridge":
            continue  # mDNS and the control channel live on bridge networks only
        for cfg in (net.get("IPAM") or {}).get("Config") or []:
            gw = cfg.get("Gateway") or ""
            if gw and ":" not in gw:
                out[name] = gw
                break
    return out


class DockerAdapter:
    """Blocking Docker SDK calls; meshd runs them in a worker thread."""

    def __init__(self, client: docker.DockerClient, image: str):
        self.client = client
        self.image = image
        # The last inspection of each container, by id (ids are never reused), with the time of the
        # container's state: used only when a fresh inspection times out, so that one slow answer of
        # a loaded engine degrades that container's entry instead of failing the whole listing.
        self._inspected: dict[str, ContainerInfo] = {}
        self.stale: list[str] = []   # names of containers this listing could not inspect in time
        self._pool = ThreadPoolExecutor(INSPECT_PARALLEL, thread_name_prefix="docker-inspect")

    def list_view(self) -> DockerView:
        """List every container once and inspect the ones that matter to the mesh (a few at a time:
        an inspection waits while the engine tears that container down)."""
        apps, sidecars, gateway = [], [], None
        inspected: dict[str, ContainerInfo] = {}
        self.stale = []
        summaries = [s for s in self.client.api.containers(all=True)
                     if is_mesh_enabled(s.get("Labels") or {}) or is_mesh_owned(s.get("Labels") or {})]
        for summary, info in zip(summaries, self._pool.map(self._inspect, summaries)):
            if info is None:
                continue  # gone between list and inspect; the next event rebuilds again
            labels = summary.get("Labels") or {}
            inspected[info.id] = info
            if labels.get(OWNER_LABEL) == OWNER and labels.get(ROLE_LABEL) == SIDECAR_ROLE:
                sidecars.append(info)
            elif labels.get(OWNER_LABEL) == OWNER and labels.get(ROLE_LABEL) == GATEWAY_ROLE:
                gateway = info
            elif not is_mesh_owned(labels):
                apps.append(info)
        self._inspected = inspected
        names = {n for app in apps if app.running for n in app.networks}
        gateways = bridge_gateways(self.client.api.networks(), names) if names else {}
        try:
            image_id = self.client.images.get(self.image).id
        except (docker.errors.ImageNotFound, requests.exceptions.Timeout, requests.exceptions.ConnectionError):
            image_id = None   # unknown: the plan then replaces no sidecar for its image
        return DockerView(apps=apps, sidecars=sidecars, gateway=gateway, network_gateways=gateways,
                          image_id=image_id)

    def _inspect(self, summary: dict[str, Any]) -> ContainerInfo | None:
        """One container of the listing, inspected; when the engine does not answer in time, its
        last inspection or else the listing's own summary stands in (named in `stale`)."""
        try:
            return decode_container_attrs(self.client.api.inspect_container(summary["Id"]))
        except docker.errors.NotFound:
            return None
        except (requests.exceptions.Timeout, requests.exceptions.ConnectionError):
            info = self._inspected.get(summary["Id"]) or decode_container_summary(summary)
            self.stale.append(info.name)
            return info

    def _create_node(self, token: str, **options: Any) -> str:
        """Create a node container, copy its bootstrap token in as a file (meshcore.bootstrap: never
        in its environment, which `docker inspect` shows), then start it; returns its id."""
        container = self.client.containers.create(self.image, **options)
        try:
            if token and not container.put_archive(TOKEN_DIR_PARENT, token_archive(token)):
                raise docker.errors.APIError(f"the bootstrap token could not be copied into {options['name']}")
            container.start()
        except Exception:
            self.remove(container.id)   # never leave a node that cannot bootstrap
            raise
        return container.id

    def create_sidecar(self, app: ContainerInfo, env: dict[str, str], token: str = "") -> str:
        """Start the sidecar of `app` in its network namespace, with its one-time `token`; returns
        the container id."""
        name = sidecar_name(app)
        self.remove(name)
        return self._create_node(
            token, command=["sidecar", "run"], name=name,
            network_mode=f"container:{app.id}", cap_add=["NET_ADMIN", "NET_RAW"],
            labels={OWNER_LABEL: OWNER, ROLE_LABEL: SIDECAR_ROLE, SIDECAR_FOR_LABEL: app.id},
            environment=env, restart_policy={"Name": "on-failure", "MaximumRetryCount": 5},
            log_config={"Type": "json-file", "Config": {"max-size": "10m", "max-file": "2"}},
        )

    def create_gateway(self, env: dict[str, str], volumes: list[str] | None = None, token: str = "") -> str:
        """Start the gateway container in the host network namespace, with its one-time `token`;
        returns its id."""
        self.remove(GATEWAY_NAME)
        return self._create_node(
            token, command=["gateway", "run"], name=GATEWAY_NAME,
            network_mode="host", labels={OWNER_LABEL: OWNER, ROLE_LABEL: GATEWAY_ROLE},
            environment=env, volumes=volumes or None, restart_policy={"Name": "unless-stopped"},
            log_config={"Type": "json-file", "Config": {"max-size": "10m", "max-file": "2"}},
        )

    def set_paused(self, container_id: str, paused: bool) -> bool:
        """Freeze or thaw a container (a start hold); False when it is gone or already so."""
        try:
            (self.client.api.pause if paused else self.client.api.unpause)(container_id)
            return True
        except (docker.errors.NotFound, docker.errors.APIError):
            return False

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
