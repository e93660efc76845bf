"""The demo's gRPC service (demo/recommend.py) and the shop's route to it (demo/shop.py), on loopback:
grpcio servers and clients in this process, no mesh in between."""

from __future__ import annotations

import queue
import sys
from pathlib import Path

import pytest

grpc = pytest.importorskip("grpc")

DEMO = Path(__file__).resolve().parents[2] / "demo"
sys.path.insert(0, str(DEMO))
import recommend  # noqa: E402  (demo/ is a folder of scripts, not a package)
import shop  # noqa: E402


@pytest.fixture
def server_of():
    """server_of(version, **faults) -> the loopback address of a started recommendations server."""
    servers = []

    def start(version: str, fail_rate: float = 0.0, fail_code: str = "UNAVAILABLE") -> str:
        recommender = recommend.recommender_from_env(
            {"VERSION": version, "FAIL_RATE": str(fail_rate), "FAIL_CODE": fail_code})
        server, port = recommend.serve(recommender, "127.0.0.1:0", workers=4)
        servers.append(server)
        return f"127.0.0.1:{port}"
    yield start
    for server in servers:
        server.stop(grace=None)


def stubs(channel):
    return (channel.unary_unary(recommend.RECOMMEND, request_serializer=recommend.encode,
                                response_deserializer=recommend.decode),
            channel.unary_stream(recommend.WATCH, request_serializer=recommend.encode,
                                 response_deserializer=recommend.decode))


@pytest.mark.parametrize("version, algorithm", [("v1", "popular"), ("v2", "similar-items")])
def test_recommend_names_the_version_and_algorithm_that_answered(server_of, version, algorithm):
    with grpc.insecure_channel(server_of(version)) as channel:
        call, _ = stubs(channel)
        answer = call({"user": "ada", "item": "mug", "count": 4}, timeout=5)
    assert (answer["version"], answer["algorithm"]) == (version, algorithm)
    assert len(answer["items"]) == 4 and "mug" not in answer["items"]
    assert set(answer["items"]) <= set(recommend.CATALOG)


def test_the_two_algorithms_rank_differently():
    v1 = recommend.rank("popular", "ada", "shirt")
    v2 = recommend.rank("similar-items", "ada", "shirt")
    assert sorted(v1) == sorted(v2) and v1 != v2
    assert v1 == [name for name in recommend.CATALOG if name != "shirt"]
    # similar-items: the items sharing most letters with "shirt" come first ("sticker": s, t, i, r)
    assert v2[0] == "sticker"


def test_watch_streams_count_messages_in_rank_order(server_of):
    with grpc.insecure_channel(server_of("v2")) as channel:
        _, watch = stubs(channel)
        messages = list(watch({"user": "ada", "item": "hat", "count": 12, "interval_ms": 0}, timeout=5))
    assert [m["rank"] for m in messages] == list(range(1, 13))
    ranked = recommend.rank("similar-items", "ada", "hat")
    assert [m["item"] for m in messages] == [ranked[n % len(ranked)] for n in range(12)]
    assert {m["version"] for m in messages} == {"v2"}


def test_watch_stamps_each_message_when_sent(server_of):
    with grpc.insecure_channel(server_of("v1")) as channel:
        _, watch = stubs(channel)
        messages = list(watch({"count": 3, "interval_ms": 50}, timeout=5))
    sent = [m["sent_at"] for m in messages]
    assert sent == sorted(sent) and sent[2] - sent[0] >= 0.09   # two intervals between first and last


def test_follow_answers_each_message_before_the_next_is_sent(server_of):
    with grpc.insecure_channel(server_of("v2")) as channel:
        follow = channel.stream_stream(recommend.FOLLOW, request_serializer=recommend.encode,
                                       response_deserializer=recommend.decode)
        outbox: queue.Queue = queue.Queue()
        answers = follow(iter(outbox.get, None), timeout=5)
        got = []
        for item in ("hat", "mug", "shirt"):     # lockstep: the next message only after an answer
            outbox.put({"user": "ada", "item": item})
            got.append(next(answers))
        outbox.put(None)
        assert list(answers) == []
    assert [(m["n"], m["item"]) for m in got] == [(1, "hat"), (2, "mug"), (3, "shirt")]
    assert got[2]["items"] == recommend.rank("similar-items", "ada", "shirt")[:3]
    assert {m["version"] for m in got} == {"v2"}


@pytest.mark.parametrize("request_message", [
    {"count": 0}, {"count": recommend.MAX_COUNT + 1}, {"count": "3"}, {"count": True}, {"user": 7},
])
def test_bad_requests_are_invalid_argument(server_of, request_message):
    with grpc.insecure_channel(server_of("v1")) as channel:
        call, watch = stubs(channel)
        for method in (call, lambda m, timeout: list(watch(m, timeout=timeout))):
            with pytest.raises(grpc.RpcError) as failed:
                method(request_message, timeout=5)
            assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_injected_faults_end_with_the_asked_status(server_of):
    with grpc.insecure_channel(server_of("v1", fail_rate=1.0, fail_code="resource_exhausted")) as channel:
        call, _ = stubs(channel)
        with pytest.raises(grpc.RpcError) as failed:
            call({}, timeout=5)
    assert failed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert failed.value.details() == "injected fault"


@pytest.mark.parametrize("env, problem", [
    ({"ALGORITHM": "random"}, "ALGORITHM"), ({"FAIL_RATE": "2"}, "FAIL_RATE"),
    ({"FAIL_CODE": "OK"}, "FAIL_CODE"), ({"FAIL_CODE": "BROKEN"}, "FAIL_CODE"),
])
def test_bad_settings_are_named(env, problem):
    with pytest.raises(ValueError, match=problem):
        recommend.recommender_from_env(env)


# ---- the shop's route, over one grpc.aio channel -------------------------------------------------

async def shop_of(target, monkeypatch):
    """A started aiohttp test client of the shop's catalog role, its channel to `target`."""
    from aiohttp.test_utils import TestClient, TestServer
    monkeypatch.setattr(shop, "RECOMMENDATIONS_TARGET", target)
    monkeypatch.setattr(shop, "ROLE", "catalog")
    client = TestClient(TestServer(shop.make_app("catalog"), host="127.0.0.1"))
    await client.start_server()
    return client


@pytest.fixture
async def shop_client(server_of, monkeypatch):
    """The shop's catalog role, its channel to a v2 recommendations server."""
    client = await shop_of(server_of("v2"), monkeypatch)
    yield client
    await client.close()


@pytest.mark.parametrize("path", ["/recommendations", "/api/catalog/recommendations"])
async def test_shop_recommendations_say_which_version_answered(shop_client, path):
    for _ in range(3):   # one channel for every call
        resp = await shop_client.get(path, params={"user": "ada", "item": "hat", "count": "2"})
        body = await resp.json()
        assert resp.status == 200, body
        assert body["service"] == "catalog"
        assert body["answered_by"]["version"] == "v2" and body["answered_by"]["algorithm"] == "similar-items"
        assert body["recommendations"] == recommend.rank("similar-items", "ada", "hat")[:2]


async def test_shop_watch_collects_the_stream(shop_client):
    resp = await shop_client.get("/recommendations/watch", params={"count": "4", "interval_ms": "10"})
    body = await resp.json()
    assert resp.status == 200, body
    assert [m["rank"] for m in body["stream"]] == [1, 2, 3, 4]
    assert {m["answered_by"]["version"] for m in body["stream"]} == {"v2"}


async def test_shop_names_the_grpc_status_of_a_failed_call(shop_client):
    resp = await shop_client.get("/recommendations", params={"count": "0"})
    body = await resp.json()
    assert resp.status == 502
    assert body["grpc_status"] == "INVALID_ARGUMENT"
    resp = await shop_client.get("/recommendations", params={"count": "many"})
    assert resp.status == 400


async def test_shop_answers_502_unavailable_when_the_service_is_down(monkeypatch):
    import socket
    with socket.socket() as probe:          # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    monkeypatch.setattr(shop, "RECOMMEND_DEADLINE_S", 1.0)
    client = await shop_of(f"127.0.0.1:{free}", monkeypatch)
    try:
        resp = await client.get("/recommendations")
        body = await resp.json()
    finally:
        await client.close()
    assert resp.status == 502
    assert body["grpc_status"] in ("UNAVAILABLE", "DEADLINE_EXCEEDED")


async def test_shop_tally_counts_the_versions_that_answered(shop_client):
    resp = await shop_client.get("/api/catalog/recommendations/tally", params={"calls": "64"})
    body = await resp.json()
    assert resp.status == 200, body
    assert body["calls"] == 64
    assert body["answered_by_version"] == {"v2": 64} and body["share"] == {"v2": 1.0} and body["failed"] == {}


async def test_shop_tally_counts_failures_by_grpc_status(server_of, monkeypatch):
    client = await shop_of(server_of("v1", fail_rate=1.0), monkeypatch)
    try:
        resp = await client.get("/recommendations/tally", params={"calls": "10"})
        body = await resp.json()
        assert (await client.get("/recommendations/tally", params={"calls": "0"})).status == 400
        assert (await client.get("/recommendations/tally", params={"calls": "x"})).status == 400
    finally:
        await client.close()
    assert resp.status == 200, body
    assert body["answered_by_version"] == {} and body["failed"] == {"UNAVAILABLE": 10}
