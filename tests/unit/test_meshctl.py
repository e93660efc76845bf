"""meshctl: `analyze` on compose files in tmp_path; `status`/`services` against a fake admin API."""

from __future__ import annotations

import asyncio
import json
import socket
import textwrap
import threading

import pytest
from aiohttp import web
from typer.testing import CliRunner

from meshctl.cli import app
from meshctl.overview import format_uptime
from meshctl.compose import ComposeError, containers_from_compose

WIDE = {"COLUMNS": "200", "MESHD_API": ""}


def run(*args: str, env: dict | None = None):
    return CliRunner().invoke(app, list(args), env={**WIDE, **(env or {})})


# ---- analyze ------------------------------------------------------------------------------------

GOOD = """
services:
  web:
    image: shop/web
    ports: ["8080:80"]
    labels:
      mesh.enable: "true"
      mesh.gateway.path: /
  catalog-v1:
    image: shop/catalog
    expose: ["9000"]
    labels: ["mesh.enable=true", "mesh.service=catalog"]
  catalog-v2:
    image: shop/catalog
    ports: [{target: 9000, published: 19000}]
    labels: ["mesh.enable=true", "mesh.service=catalog", "mesh.version=v2", "mesh.gateway.path=/api/catalog"]
  db:
    image: postgres
"""


def write(tmp_path, text: str, name: str = "compose.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_analyze_good_file(tmp_path):
    result = run("analyze", str(write(tmp_path, GOOD)))
    assert result.exit_code == 0, result.output
    assert "OK" in result.output
    assert "catalog" in result.output and "v1, v2" in result.output
    assert "/api/catalog -> catalog" in result.output
    assert "-> web" in result.output


@pytest.mark.parametrize("labels, label", [
    ('mesh.port: abc', "mesh.port"),
    ('mesh.protocol: udp', "mesh.protocol"),
    ('mesh.retries.on: "unavailable,not-found"', "mesh.retries.on"),
    ('mesh.foo: "1"', "mesh.foo"),
    ('mesh.gateway.path: api', "mesh.gateway.path"),
])
def test_analyze_bad_label(tmp_path, labels, label):
    text = f"""
    services:
      orders:
        image: shop/orders
        expose: [8080]
        labels:
          mesh.enable: "true"
          {labels}
    """
    result = run("analyze", str(write(tmp_path, text)))
    assert result.exit_code == 1, result.output
    assert f"service orders: label {label}" in result.output


def test_analyze_accepts_grpc_and_http2_services(tmp_path):
    text = """
    services:
      recommendations-v1:
        image: shop/recommend
        labels: {mesh.enable: "true", mesh.service: recommendations, mesh.version: v1, mesh.port: "50051",
                 mesh.protocol: grpc, mesh.retries.on: "unavailable,resource-exhausted,connect-failure"}
      recommendations-v2:
        image: shop/recommend
        labels: {mesh.enable: "true", mesh.service: recommendations, mesh.version: v2, mesh.port: "50051",
                 mesh.protocol: grpc, mesh.retries.on: "unavailable,resource-exhausted,connect-failure"}
      feed:
        image: shop/feed
        labels: {mesh.enable: "true", mesh.port: "8443", mesh.protocol: http2}
    """
    result = run("analyze", str(write(tmp_path, text)))
    assert result.exit_code == 0, result.output
    assert "recommendations: grpc port 50051, versions v1, v2" in result.output
    assert "feed: http2 port 8443" in result.output


def test_analyze_passes_the_demo_with_its_grpc_service():
    from pathlib import Path
    demo = Path(__file__).resolve().parents[2] / "compose" / "demo.yml"
    result = run("analyze", str(demo), "--project", "shop")
    assert result.exit_code == 0, result.output
    assert "recommendations: grpc port 50051, versions v1, v2" in result.output


def test_analyze_cross_service_errors(tmp_path):
    text = """
    services:
      a:
        image: x
        expose: [8080]
        labels: {mesh.enable: "true", mesh.gateway.path: /api}
      b:
        image: x
        expose: [8080]
        labels: {mesh.enable: "true", mesh.gateway.path: /api}
      orders-v1:
        image: x
        expose: [8080]
        labels: {mesh.enable: "true", mesh.service: orders}
      orders-v2:
        image: x
        expose: [9090]
        labels: {mesh.enable: "true", mesh.service: orders}
    """
    result = run("analyze", str(write(tmp_path, text)))
    assert result.exit_code == 1, result.output
    assert "service b: label mesh.gateway.path" in result.output
    assert "already belongs to a" in result.output
    assert "service orders-v2: label mesh.port" in result.output


def test_analyze_missing_port_gives_hint(tmp_path):
    text = """
    services:
      orders:
        image: x
        labels: ["mesh.enable=true"]
    """
    result = run("analyze", str(write(tmp_path, text)))
    assert result.exit_code == 1
    assert "service orders: label mesh.port" in result.output
    assert "EXPOSE" in result.output


@pytest.mark.parametrize("text", [
    "services: [unclosed\n",
    "services:\n  a:\n    image: x\n   labels: {\n",
    "just a string\n",
    "services: 5\n",
])
def test_analyze_bad_yaml_exit_2(tmp_path, text):
    result = run("analyze", str(write(tmp_path, text)))
    assert result.exit_code == 2, result.output
    assert "error:" in result.output


def test_analyze_missing_file_exit_2(tmp_path):
    result = run("analyze", str(tmp_path / "nope.yaml"))
    assert result.exit_code == 2
    assert "no such file" in result.output


def test_analyze_project_sets_namespace(tmp_path):
    path = write(tmp_path, GOOD)
    result = run("analyze", str(path), "--project", "Demo Shop")
    assert result.exit_code == 0 and "project demoshop" in result.output
    result = run("analyze", str(path))
    assert f"project {tmp_path.name.lower()}" in result.output.replace("\n", "")


@pytest.mark.parametrize("service, expected_ports", [
    ({"expose": [8080]}, (8080,)),
    ({"expose": ["8080/tcp", "53/udp"]}, (8080,)),
    ({"expose": ["7000-7002"]}, (7000, 7001, 7002)),
    ({"ports": ["8080:80"]}, (80,)),
    ({"ports": ["127.0.0.1:8080:80/tcp"]}, (80,)),
    ({"ports": ["[::1]:8080:80"]}, (80,)),
    ({"ports": ["3000"]}, (3000,)),
    ({"ports": [3000]}, (3000,)),
    ({"ports": ["53:53/udp"]}, ()),
    ({"ports": [{"target": 80, "published": 8080}, {"target": "81", "protocol": "udp"}]}, (80,)),
    ({"expose": ["80"], "ports": ["8080:80", "9090:90"]}, (80, 90)),
    ({}, ()),
])
def test_compose_ports(service, expected_ports):
    [info] = containers_from_compose({"services": {"s": service}}, "proj")
    assert info.exposed_ports == expected_ports


@pytest.mark.parametrize("labels, expected", [
    ({"mesh.enable": True, "mesh.port": 8080}, {"mesh.enable": "true", "mesh.port": "8080"}),
    (["mesh.enable=true", "mesh.gateway.path=/a=b", "flag"], {"mesh.enable": "true", "mesh.gateway.path": "/a=b",
                                                               "flag": ""}),
    (None, {}),
])
def test_compose_labels(labels, expected):
    [info] = containers_from_compose({"services": {"s": {"labels": labels}}}, "proj")
    assert info.name == "s"
    assert info.labels == {**expected, "com.docker.compose.project": "proj", "com.docker.compose.service": "s"}


@pytest.mark.parametrize("doc", [
    {}, {"services": []}, {"services": {"s": "x"}}, {"services": {"s": {"labels": "x"}}},
    {"services": {"s": {"ports": ["abc"]}}}, {"services": {"s": {"expose": ["1-99999"]}}},
])
def test_compose_shape_errors(doc):
    with pytest.raises(ComposeError):
        containers_from_compose(doc, "p")


# ---- status / services against a fake admin API ------------------------------------------------

STATUS = {
    "meshd": {"version": "0.1.0", "uptime_s": 3725.5, "snapshot_version": 7},
    "nodes": [
        {"node": "shop-orders-1-mesh", "kind": "sidecar", "service": "orders", "connected": True,
         "acked_version": 7, "nacked_version": None, "nack_reason": None},
        {"node": "shop-catalog-1-mesh", "kind": "sidecar", "service": "catalog", "connected": True,
         "acked_version": 5, "nacked_version": 6, "nack_reason": "endpoints.catalog[0].port: expected int"},
        {"node": "gateway", "kind": "gateway", "service": None, "connected": False,
         "acked_version": None, "nacked_version": None, "nack_reason": None},
    ],
    "label_errors": [{"container": "shop-billing-1", "label": "mesh.port",
                      "message": "'abc' is not a port number"}],
    "sidecars": [{"app": "shop-orders-1", "sidecar": "shop-orders-1-mesh", "state": "running"},
                 {"app": "shop-catalog-1", "sidecar": "shop-catalog-1-mesh", "state": "created"}],
}

SERVICES = {"services": [
    {"name": "catalog", "namespace": "shop", "protocol": "http", "port": 9000,
     "identity": "spiffe://mesh.local/ns/shop/sa/catalog", "versions": {"v1": 2, "v2": 1},
     "endpoints": [{"instance": "a" * 64, "address": "172.18.0.5", "port": 15006, "version": "v1"},
                   {"instance": "b" * 64, "address": "172.18.0.6", "port": 15006, "version": "v1"},
                   {"instance": "c" * 64, "address": "172.18.0.7", "port": 15006, "version": "v2"}]},
    {"name": "db", "namespace": "shop", "protocol": "tcp", "port": 5432,
     "identity": "spiffe://mesh.local/ns/shop/sa/db", "versions": {}, "endpoints": []},
]}


@pytest.fixture(scope="module")
def fake_meshd():
    """An aiohttp admin API on 127.0.0.1 in its own thread and loop; yields its base URL."""
    routes = {"/v1/status": STATUS, "/v1/services": SERVICES}

    async def handler(request: web.Request) -> web.Response:
        if request.path not in routes:
            return web.json_response({"error": "not found"}, status=404)
        return web.json_response(routes[request.path])

    loop = asyncio.new_event_loop()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    application = web.Application()
    application.router.add_get("/{tail:.*}", handler)
    runner = web.AppRunner(application)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.SockSite(runner, sock).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}"
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=5)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=5)
    loop.close()


@pytest.fixture
def dead_url():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there any more
    return f"http://127.0.0.1:{port}"


def test_status_table(fake_meshd):
    result = run("status", "--api", fake_meshd)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "meshd UP" in out and "snapshot version 7" in out and "1h 2m 5s" in out
    for node in ("shop-orders-1-mesh", "shop-catalog-1-mesh", "gateway"):
        assert node in out
    assert "behind 7" in out
    assert "v6: endpoints.catalog[0].port: expected int" in out
    assert "shop-billing-1" in out and "mesh.port" in out and "'abc' is not a port number" in out
    assert "created" in out and "running" in out


@pytest.mark.parametrize("how", ["flag", "global", "env"])
def test_status_api_url_sources(fake_meshd, how):
    if how == "flag":
        result = run("status", "--api", fake_meshd)
    elif how == "global":
        result = run("--api", fake_meshd, "status")
    else:
        result = run("status", env={"MESHD_API": fake_meshd})
    assert result.exit_code == 0, result.output
    assert "shop-orders-1-mesh" in result.output


def test_status_json(fake_meshd):
    result = run("status", "--api", fake_meshd, "--json")
    assert result.exit_code == 0
    assert json.loads(result.output) == STATUS


def test_services_table(fake_meshd):
    result = run("services", "--api", fake_meshd)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "catalog" in out and "db" in out
    assert "spiffe://mesh.local/ns/shop/sa/catalog" in out
    assert "v1: 2 instances" in out and "v2: 1 instance" in out
    assert "172.18.0.5:15006 v1, 172.18.0.6:15006 v1, 172.18.0.7:15006 v2" in out   # no terminal: one cell
    assert "5432" in out and "tcp" in out


def test_services_json(fake_meshd):
    result = run("services", "--api", fake_meshd, "--json")
    assert result.exit_code == 0
    assert json.loads(result.output) == SERVICES


@pytest.mark.parametrize("command", [["status"], ["services"], ["status", "--json"]])
def test_meshd_unreachable(dead_url, command):
    result = run(*command, "--api", dead_url)
    assert result.exit_code == 1
    assert dead_url in result.output
    assert "not reachable" in result.output


def test_meshd_api_error(fake_meshd, monkeypatch):
    from meshctl.api import MeshdApiError, MeshdClient

    with pytest.raises(MeshdApiError, match="HTTP 404"):
        MeshdClient(fake_meshd).get_json("/v1/nope")


@pytest.mark.parametrize("seconds, expected", [
    (0, "0s"), (59.9, "59s"), (61, "1m 1s"), (3725.5, "1h 2m 5s"), (90061, "1d 1h 1m 1s"), (None, "?"),
])
def test_format_uptime(seconds, expected):
    assert format_uptime(seconds) == expected
