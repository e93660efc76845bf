"""decode_container_attrs on realistic `docker inspect` output (the pure part of the Docker adapter)."""

from __future__ import annotations

import copy

import pytest

from meshcore.labels import ContainerInfo
from meshd.docker_adapter import decode_container_attrs, sidecar_name

APP_ID = "3f2a9c0d1e7b" + "4" * 52
IMAGE_ID = "sha256:9b1f" + "c" * 60

INSPECT = {
    "Id": APP_ID,
    "Created": "2024-05-01T09:59:58.123456789Z",
    "Path": "/docker-entrypoint.sh",
    "State": {
        "Status": "running", "Running": True, "Paused": False, "Restarting": False, "OOMKilled": False,
        "Dead": False, "Pid": 4242, "ExitCode": 0, "Error": "",
        "StartedAt": "2024-05-01T10:00:00.123456789Z", "FinishedAt": "0001-01-01T00:00:00Z",
    },
    "Image": IMAGE_ID,
    "Name": "/shop-orders-1",
    "RestartCount": 0,
    "HostConfig": {"NetworkMode": "shop_default", "RestartPolicy": {"Name": "", "MaximumRetryCount": 0}},
    "Config": {
        "Hostname": "3f2a9c0d1e7b",
        "ExposedPorts": {"8080/tcp": {}, "53/udp": {}, "9090/tcp": {}},
        "Env": ["PATH=/usr/local/bin:/usr/bin"],
        "Image": "shop/orders:1.4",
        "Labels": {
            "com.docker.compose.project": "shop", "com.docker.compose.service": "orders",
            "mesh.enable": "true", "mesh.port": "8080",
        },
    },
    "NetworkSettings": {
        "Bridge": "", "SandboxKey": "/var/run/docker/netns/1a2b3c",
        "Ports": {"8080/tcp": None},
        "Networks": {
            "shop_default": {
                "IPAMConfig": None, "Links": None, "Aliases": ["shop-orders-1", "orders"],
                "NetworkID": "e" * 64, "EndpointID": "f" * 64, "Gateway": "172.20.0.1",
                "IPAddress": "172.20.0.5", "IPPrefixLen": 16, "IPv6Gateway": "", "GlobalIPv6Address": "",
                "MacAddress": "02:42:ac:14:00:05",
            },
            "shop_backend": {
                "Gateway": "172.21.0.1", "IPAddress": "172.21.0.9", "IPPrefixLen": 16,
                "GlobalIPv6Address": "fd00::9",
            },
        },
    },
}


def test_running_app_container():
    info = decode_container_attrs(INSPECT)
    assert info == ContainerInfo(
        id=APP_ID, name="shop-orders-1",
        labels={"com.docker.compose.project": "shop", "com.docker.compose.service": "orders",
                "mesh.enable": "true", "mesh.port": "8080"},
        exposed_ports=(8080, 9090),   # 53/udp is not a TCP port the mesh can carry
        networks={"shop_default": "172.20.0.5", "shop_backend": "172.21.0.9"},
        running=True, started_at="2024-05-01T10:00:00.123456789Z",
        network_mode="shop_default", image=IMAGE_ID, created="2024-05-01T09:59:58.123456789Z")
    assert sidecar_name(info) == "shop-orders-1-mesh"


@pytest.mark.parametrize("health, status, serving", [
    (None, "", True), ({"Status": "starting"}, "starting", False), ({"Status": "healthy"}, "healthy", True),
    ({"Status": "unhealthy", "FailingStreak": 3}, "unhealthy", False),
])
def test_health_status(health, status, serving):
    attrs = copy.deepcopy(INSPECT)
    if health is not None:
        attrs["State"]["Health"] = health
    info = decode_container_attrs(attrs)
    assert info.health == status and info.serving is serving


def test_labels_are_a_copy():
    attrs = copy.deepcopy(INSPECT)
    info = decode_container_attrs(attrs)
    attrs["Config"]["Labels"]["mesh.port"] = "1"
    assert info.labels["mesh.port"] == "8080"


@pytest.mark.parametrize("exposed, expected", [
    ({"8080/tcp": {}}, (8080,)),
    ({"53/udp": {}}, ()),
    ({"5353/udp": {}, "80/tcp": {}, "443/tcp": {}}, (80, 443)),
    ({"7000/sctp": {}, "7001/tcp": {}}, (7001,)),
    ({"8080": {}}, (8080,)),          # no protocol given means tcp
    ({}, ()),
    (None, ()),
])
def test_exposed_ports(exposed, expected):
    attrs = copy.deepcopy(INSPECT)
    attrs["Config"]["ExposedPorts"] = exposed
    assert decode_container_attrs(attrs).exposed_ports == expected


@pytest.mark.parametrize("state, running", [
    ({"Status": "running", "Running": True, "Restarting": False}, True),
    # Docker reports Running=true while a container is in its restart loop: not usable.
    ({"Status": "restarting", "Running": True, "Restarting": True}, False),
    ({"Status": "exited", "Running": False, "Restarting": False, "ExitCode": 137}, False),
    ({"Status": "created", "Running": False, "StartedAt": "0001-01-01T00:00:00Z"}, False),
    ({}, False),
])
def test_running_state(state, running):
    attrs = copy.deepcopy(INSPECT)
    attrs["State"] = state
    assert decode_container_attrs(attrs).running is running


def test_stopped_container_has_no_addresses():
    attrs = copy.deepcopy(INSPECT)
    attrs["State"] = {"Status": "exited", "Running": False, "Restarting": False,
                      "StartedAt": "2024-05-01T10:00:00.123456789Z", "FinishedAt": "2024-05-01T11:00:00.5Z"}
    for net in attrs["NetworkSettings"]["Networks"].values():
        net["IPAddress"] = ""
    info = decode_container_attrs(attrs)
    assert info.networks == {}
    assert info.running is False
    assert info.started_at == "2024-05-01T10:00:00.123456789Z"


def test_sidecar_in_app_namespace():
    attrs = {
        "Id": "b" * 64, "Name": "/shop-orders-1-mesh", "Image": IMAGE_ID,
        "State": {"Running": True, "Restarting": False, "StartedAt": "2024-05-01T10:00:01.5Z"},
        "HostConfig": {"NetworkMode": f"container:{APP_ID}"},
        "Config": {"Labels": {"mesh.owner": "meshd", "mesh.role": "sidecar", "mesh.sidecar.for": APP_ID},
                   "ExposedPorts": None},
        # a container sharing another's namespace has no networks of its own
        "NetworkSettings": {"Networks": {}},
    }
    info = decode_container_attrs(attrs)
    assert info.network_mode == f"container:{APP_ID}"
    assert info.networks == {} and info.exposed_ports == ()
    assert info.labels["mesh.sidecar.for"] == APP_ID
    assert info.name == "shop-orders-1-mesh"


@pytest.mark.parametrize("attrs", [
    {"Id": "c" * 64},
    {"Id": "c" * 64, "Config": None, "State": None, "HostConfig": None, "NetworkSettings": None, "Name": None},
    {"Id": "c" * 64, "Config": {"Labels": None, "ExposedPorts": None}, "NetworkSettings": {"Networks": None}},
])
def test_missing_sections(attrs):
    info = decode_container_attrs(attrs)
    assert info == ContainerInfo(id="c" * 64, name="", labels={}, exposed_ports=(), networks={},
                                 running=False, started_at="", network_mode="", image="")


def _net(name: str, driver: str, *gateways: str) -> dict:
    return {"Name": name, "Id": name * 4, "Driver": driver,
            "IPAM": {"Config": [{"Subnet": "x", "Gateway": gw} for gw in gateways]}}


def test_bridge_gateways_from_one_listing():
    from meshd.docker_adapter import bridge_gateways

    listing = [_net("rp_default", "bridge", "fd00::1", "172.25.0.1"), _net("other", "bridge", "172.26.0.1"),
               _net("ov", "overlay", "10.0.1.1"), _net("v6only", "bridge", "fd01::1"),
               {"Name": "noipam", "Driver": "bridge"}]
    assert bridge_gateways(listing, {"rp_default", "ov", "v6only", "noipam", "gone"}) == {"rp_default": "172.25.0.1"}
    # `down` + `up` re-creates the network under the same name with a new subnet: the next listing
    # alone decides (nothing is remembered by name).
    assert bridge_gateways([_net("rp_default", "bridge", "172.27.0.1")], {"rp_default"}) == {"rp_default": "172.27.0.1"}


class _FakeApi:
    """Docker's low-level API as the adapter calls it; `slow` ids time out on inspect."""

    def __init__(self, attrs: dict[str, dict], networks: list[dict]):
        self.attrs, self.nets, self.slow = attrs, networks, set()

    def containers(self, all=False):
        return [{"Id": cid, "Names": [a["Name"]], "Labels": a["Config"]["Labels"], "State": "running"}
                for cid, a in self.attrs.items()]

    def inspect_container(self, cid):
        import requests

        if cid in self.slow:
            raise requests.exceptions.ReadTimeout("Read timed out. (read timeout=60)")
        return self.attrs[cid]

    def networks(self):
        return self.nets


def _adapter(api):
    from types import SimpleNamespace

    import docker.errors

    from meshd.docker_adapter import DockerAdapter

    def get(_name):
        raise docker.errors.ImageNotFound("no image")

    return DockerAdapter(SimpleNamespace(api=api, images=SimpleNamespace(get=get)), "meshd:latest")


def test_list_view_network_recreated_and_slow_inspect():
    attrs = copy.deepcopy(INSPECT)
    api = _FakeApi({APP_ID: attrs}, [_net("shop_default", "bridge", "172.20.0.1")])
    adapter = _adapter(api)
    view = adapter.list_view()
    assert view.network_gateways == {"shop_default": "172.20.0.1"} and adapter.stale == []
    # the network is re-created under its name with a new gateway: the next listing says so
    api.nets = [_net("shop_default", "bridge", "172.29.0.1")]
    assert adapter.list_view().network_gateways == {"shop_default": "172.29.0.1"}
    # one container's inspect times out: its last inspection stands in, named in `stale`
    api.slow.add(APP_ID)
    view = adapter.list_view()
    assert [a.id for a in view.apps] == [APP_ID] and adapter.stale == ["shop-orders-1"]
    # ... and for a container never inspected before, the listing's own summary (no start time):
    # one slow answer of a loaded engine fails neither the listing nor the rebuild
    fresh = _adapter(api)
    view = fresh.list_view()
    assert [(a.id, a.running, a.started_at) for a in view.apps] == [(APP_ID, True, "")]
    assert fresh.stale == ["shop-orders-1"]


# `GET /containers/json?all=1` entries as Docker 20.10 writes them
SUMMARY = {
    "Id": APP_ID, "Names": ["/shop-orders-1"], "Image": "shop/orders:1.4", "ImageID": IMAGE_ID,
    "Command": "/docker-entrypoint.sh", "Created": 1714557598,
    "Ports": [{"PrivatePort": 9090, "Type": "tcp"}, {"PrivatePort": 53, "Type": "udp"},
              {"IP": "0.0.0.0", "PrivatePort": 8080, "PublicPort": 8080, "Type": "tcp"},
              {"IP": "::", "PrivatePort": 8080, "PublicPort": 8080, "Type": "tcp"}],
    "Labels": {"mesh.enable": "true", "mesh.port": "8080"},
    "State": "running", "Status": "Up 3 minutes (healthy)",
    "HostConfig": {"NetworkMode": "shop_default"},
    "NetworkSettings": {"Networks": {"shop_default": {"IPAddress": "172.20.0.5"}, "idle": {"IPAddress": ""}}},
}


@pytest.mark.parametrize("state, status, running, paused, health", [
    ("running", "Up 3 minutes (healthy)", True, False, "healthy"),
    ("running", "Up 2 seconds (health: starting)", True, False, "starting"),
    ("running", "Up 1 hour (unhealthy)", True, False, "unhealthy"),
    ("paused", "Up 4 seconds (Paused)", True, True, ""),
    ("restarting", "Restarting (1) 2 seconds ago", False, False, ""),
    ("exited", "Exited (0) 5 seconds ago", False, False, ""),
])
def test_decode_container_summary(state, status, running, paused, health):
    from meshd.docker_adapter import decode_container_summary

    info = decode_container_summary({**SUMMARY, "State": state, "Status": status})
    assert info == ContainerInfo(id=APP_ID, name="shop-orders-1", labels=SUMMARY["Labels"], exposed_ports=(8080, 9090),
                                 networks={"shop_default": "172.20.0.5"}, running=running, started_at="",
                                 network_mode="shop_default", image=IMAGE_ID, health=health, paused=paused)


def test_decode_container_summary_missing_sections():
    from meshd.docker_adapter import decode_container_summary

    assert decode_container_summary({"Id": "c" * 64, "Names": None, "Ports": None, "NetworkSettings": None}) == \
        ContainerInfo(id="c" * 64, name="", labels={}, exposed_ports=(), networks={}, running=False,
                      started_at="", network_mode="", image="")


def test_a_bootstrap_token_in_the_environment_is_noted_never_kept():
    token = "spent-" + "t" * 40
    attrs = {**INSPECT, "Config": {**INSPECT["Config"], "Env": ["PATH=/usr/bin", f"MESH_BOOTSTRAP_TOKEN={token}"]}}
    info = decode_container_attrs(attrs)
    assert info.token_in_env and token not in repr(info)
    assert not decode_container_attrs(INSPECT).token_in_env
