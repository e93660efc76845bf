"""meshd.docker_adapter: a node's bootstrap token goes in as a file between create and start, never
in the environment (`docker inspect` shows that); a node whose token could not be copied is removed."""

from __future__ import annotations

import io
import tarfile

import docker.errors
import pytest

from meshcore.bootstrap import TOKEN_DIR_PARENT
from meshcore.labels import ContainerInfo
from meshd.docker_adapter import DockerAdapter

TOKEN = "tok-" + "x" * 40


class FakeContainer:
    def __init__(self, calls: list, options: dict, archive_ok: bool):
        self.id = "c-" + options["name"]
        self.calls, self.archive_ok = calls, archive_ok

    def put_archive(self, path, data):
        self.calls.append(("put_archive", path, data))
        return self.archive_ok

    def start(self):
        self.calls.append(("start",))


class FakeClient:
    def __init__(self, archive_ok: bool = True):
        self.calls: list = []
        self.archive_ok = archive_ok
        self.containers = self
        self.api = self

    def create(self, image, **options):
        self.calls.append(("create", image, options))
        return FakeContainer(self.calls, options, self.archive_ok)

    def remove_container(self, name_or_id, force=False):
        self.calls.append(("remove", name_or_id))


APP = ContainerInfo(id="a" * 64, name="shop-orders-1", labels={"mesh.enable": "true"})


def token_in_archive(data: bytes) -> str:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return tar.extractfile("mesh/bootstrap-token").read().decode()


@pytest.mark.parametrize("make", [
    lambda a: a.create_sidecar(APP, {"MESH_NODE": "shop-orders-1-mesh"}, token=TOKEN),
    lambda a: a.create_gateway({"MESH_NODE": "gateway"}, token=TOKEN),
])
def test_the_token_is_copied_in_between_create_and_start(make):
    client = FakeClient()
    cid = make(DockerAdapter(client, "meshd:latest"))
    steps = [c[0] for c in client.calls]
    assert steps == ["remove", "create", "put_archive", "start"], steps
    _, image, options = client.calls[1]
    assert image == "meshd:latest" and cid == "c-" + options["name"]
    assert TOKEN not in repr(options) and "MESH_BOOTSTRAP_TOKEN" not in options["environment"]
    _, path, data = client.calls[2]
    assert path == TOKEN_DIR_PARENT and token_in_archive(data) == TOKEN


def test_a_node_whose_token_could_not_be_copied_is_removed_not_started():
    client = FakeClient(archive_ok=False)
    with pytest.raises(docker.errors.APIError, match="could not be copied into shop-orders-1-mesh"):
        DockerAdapter(client, "meshd:latest").create_sidecar(APP, {}, token=TOKEN)
    assert [c[0] for c in client.calls] == ["remove", "create", "put_archive", "remove"]
    assert client.calls[-1] == ("remove", "c-shop-orders-1-mesh")


def test_no_token_no_archive():
    client = FakeClient()
    DockerAdapter(client, "meshd:latest").create_gateway({})
    assert [c[0] for c in client.calls] == ["remove", "create", "start"]
