"""gRPC through the mesh on real containers, the protocol issue's "done when": one grpcio channel
balanced per call over three replicas; server-streaming and bidi calls of 1,000 messages that stream
(the first message arrives before the last is sent) through two sidecars; retries on the UNAVAILABLE
status; a caller denied by a policy reads PERMISSION_DENIED and the metrics carry grpc_response_status;
`meshctl compare` on the demo's gRPC service after a split; one trace across a gRPC hop.

The servers are the demo's recommendations engine (demo/recommend.py) in projects/grpc.yml; the
client is projects/grpccli.py, run in a meshed container of the demo image."""

from __future__ import annotations

import json
import os
import re
import secrets

import pytest

from .conftest import ADMIN, GATEWAY, http, metric_sum, metrics, run, wait_for
from .lifecycle import ipv4, project, service_containers, wait_mesh_ok

pytestmark = pytest.mark.e2e

GP = "lcgrpc"
RANKER_REPLICAS = 3


def meshctl(*args: str, check: bool = True):
    return run(["meshctl", *args], env={**os.environ, "COLUMNS": "250"}, check=check)


@pytest.fixture(scope="module")
def grpc_project(mesh):
    project(GP, "down", file="grpc.yml", check=False)
    project(GP, "up", "-d", "--scale", f"ranker={RANKER_REPLICAS}", file="grpc.yml")
    try:
        wait_mesh_ok(what="the gRPC project meshed")
        yield GP
    finally:
        project(GP, "down", file="grpc.yml", check=False)


def grpccli(*args: str, metadata: dict | None = None, timeout: float = 120) -> dict:
    """Run projects/grpccli.py in the meshed client container; its JSON answer."""
    client = service_containers(GP, "gcli")[0]["Id"]
    proc = run(["docker", "exec", "-e", f"GRPC_METADATA={json.dumps(metadata or {})}", client,
                "python3", "/srv/grpccli.py", *args], timeout=timeout)
    return json.loads(proc.stdout)


def grpc_requests(service: str, reporter: str, **labels: str) -> float:
    """istio_requests_total of gRPC calls from gcli to `service`, summed over the sidecars of `reporter`
    (destination: the service's replicas; source: the client)."""
    sidecars = service_containers(GP, service) if reporter == "destination" else service_containers(GP, "gcli")
    return sum(metric_sum(metrics(ipv4(c)), "istio_requests_total", reporter=reporter, source_workload="gcli",
                          destination_service=service, request_protocol="grpc", **labels) for c in sidecars)


def test_one_channel_spreads_300_calls_over_3_replicas(grpc_project):
    replicas = {c["Config"]["Hostname"] for c in service_containers(GP, "ranker")}
    assert len(replicas) == RANKER_REPLICAS
    result = grpccli("unary", "ranker:50051", "300")
    assert result["failed"] == {}, result
    shares = {host: n / 300 for host, n in result["instances"].items()}
    print(f"\n300 unary calls on one channel over {RANKER_REPLICAS} replicas: {result['instances']}")
    assert set(shares) == replicas, (shares, replicas)
    assert min(shares.values()) >= 0.25, shares


def test_streams_of_1000_messages_flow_through_two_sidecars(grpc_project):
    before = grpc_requests("ranker", "destination", grpc_response_status="0")
    # Server streaming: a message every millisecond; the first must arrive long before the server
    # sends the last (a mesh that buffered the stream would deliver the first after the last).
    watched = grpccli("watch", "ranker:50051", "1000", "1")
    assert watched["count"] == 1000 and watched["in_order"], watched
    lead = watched["last_sent"] - watched["first_arrived"]
    print(f"\nWatch, 1000 messages: first arrived {(watched['first_arrived'] - watched['first_sent']) * 1000:.1f} ms "
          f"after it was sent and {lead:.3f} s before the server sent the last; the last arrived "
          f"{(watched['last_arrived'] - watched['last_sent']) * 1000:.1f} ms after it was sent")
    assert watched["first_arrived"] < watched["last_sent"], watched
    # Bidi in lockstep: each message is written only once the answer to the one before arrived.
    followed = grpccli("follow", "ranker:50051", "1000")
    print(f"Follow, 1000 messages in lockstep: {followed['last_written'] - followed['first_arrived']:.2f} s "
          f"from the first answer to the last message written")
    assert followed["count"] == 1000 and followed["in_order"] and followed["ended_cleanly"], followed
    assert followed["status"] == "OK" and followed["first_arrived"] < followed["last_written"], followed
    # Both calls went through the replicas' sidecars (counted there, from gcli, grpc-status 0).
    wait_for(lambda: grpc_requests("ranker", "destination", grpc_response_status="0") - before >= 2, 10,
             what="the two streaming calls counted by the ranker's sidecars")


def test_retries_on_unavailable_hide_a_30_percent_failure_rate(grpc_project):
    retried = grpccli("unary", "flaky:50051", "300")
    plain = grpccli("unary", "flaky-noretry:50051", "300")
    ok_retried = sum(retried["instances"].values()) / 300
    ok_plain = sum(plain["instances"].values()) / 300
    print(f"\n30% UNAVAILABLE: {ok_retried:.1%} of 300 calls succeed with mesh.retries.on=unavailable "
          f"(failed: {retried['failed']}), {ok_plain:.1%} without retries (failed: {plain['failed']})")
    assert ok_retried >= 0.97, retried
    assert ok_plain <= 0.85 and set(plain["failed"]) == {"UNAVAILABLE"}, plain


def test_a_denied_caller_reads_permission_denied_and_metrics_carry_the_grpc_status(grpc_project):
    assert grpccli("unary", "ranker:50051", "5")["failed"] == {}
    meshctl("policy", "deny", "gcli", "ranker")
    try:
        def all_denied() -> dict | None:
            result = grpccli("unary", "ranker:50051", "5")
            return result if result["failed"] == {"PERMISSION_DENIED": 5} else None

        denied = wait_for(all_denied, 20, interval=0.5, what="calls from gcli to ranker denied")
        print(f"\ndenied by policy: {denied['failed']} {denied['details']}")

        def counted() -> dict:
            found = {reporter: grpc_requests("ranker", reporter, grpc_response_status="7")
                     for reporter in ("source", "destination")}
            return found if sum(found.values()) >= 5 else {}
        print(f"istio_requests_total{{grpc_response_status=\"7\"}} by reporter: "
              f"{wait_for(counted, 10, what='denied calls counted with grpc_response_status 7')}")
    finally:
        meshctl("policy", "remove", "gcli", "ranker", check=False)
    wait_for(lambda: grpccli("unary", "ranker:50051", "5")["failed"] == {}, 20, interval=0.5,
             what="calls allowed again once the rule is removed")
    assert grpc_requests("ranker", "destination", grpc_response_status="0") >= 5


# ---- on the demo shop: catalog -> recommendations (gRPC) ------------------------------------------

def _tally(calls: int) -> dict:
    status, _, body = http("GET", f"{GATEWAY}/api/catalog/recommendations/tally?calls={calls}", timeout=120)
    assert status == 200, body[:300]
    return json.loads(body)


def _compare_rows(out: str) -> dict[str, list[str]]:
    """`meshctl compare`'s table (its plain form: columns apart by two spaces or more) as
    {row name: [v1 cell, v2 cell]}."""
    rows = {}
    for line in out.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) == 3:
            rows[cells[0]] = cells[1:]
    return rows


def test_meshctl_compare_shows_both_versions_of_the_grpc_service_after_a_split(mesh):
    meshctl("split", "recommendations", "v1=50", "v2=50")
    try:
        tally = _tally(400)
        assert not tally["failed"] and set(tally["answered_by_version"]) == {"v1", "v2"}, tally

        last = [""]

        def compared() -> tuple[str, dict] | None:
            out = last[0] = meshctl("compare", "recommendations", "v1", "v2", "--window", "60").stdout
            rows = _compare_rows(out)
            counts = [int(c) for c in rows.get("requests", []) if c.isdigit()]
            return (out, rows) if len(counts) == 2 and min(counts) >= 50 else None

        try:
            out, rows = wait_for(compared, 30, interval=1.0, what="meshctl compare counting both versions")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nlast output:\n{last[0]}") from None
    finally:
        meshctl("split", "recommendations", "--clear", check=False)
    print(f"\nsplit 50/50, 400 calls: {tally['answered_by_version']}\n{out}")
    assert "recommendations: v1 vs v2" in out and "verdict:" in out
    # the tally's calls all succeeded (other tests' calls in the window may not have: 99% at least)
    assert all(float(cell.rstrip("%")) >= 99.0 for cell in rows["success"]), rows
    assert all(cell.endswith("ms") for cell in rows["p50"] + rows["p99"]), rows


def test_a_traced_grpc_call_is_one_trace_across_both_sidecars(mesh):
    trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
    status, _, body = http("GET", f"{GATEWAY}/api/catalog/recommendations?user=ada&item=mug",
                           headers={"traceparent": f"00-{trace_id}-{client_span}-01"}, timeout=10)
    assert status == 200, body

    def spans() -> list[dict] | None:
        status, _, raw = http("GET", f"{ADMIN}/v1/traces/{trace_id}")
        if status != 200:
            return None
        found = json.loads(raw)["spans"]
        have = {(s["service"], s["kind"]) for s in found}
        return found if {("catalog", "CLIENT"), ("recommendations", "SERVER")} <= have else None

    found = wait_for(spans, 20, what="the gRPC hop's spans in meshd's store")
    assert {s["trace_id"] for s in found} == {trace_id}
    caller = [s for s in found if s["service"] == "catalog" and s["kind"] == "CLIENT"
              and s["attributes"].get("mesh.destination") == "recommendations"]
    callee = [s for s in found if s["service"] == "recommendations" and s["kind"] == "SERVER"]
    assert len(caller) == 1 and len(callee) == 1, [(s["service"], s["kind"], s["name"]) for s in found]
    catalog = next(s for s in found if s["service"] == "catalog" and s["kind"] == "SERVER")
    assert caller[0]["parent_id"] == catalog["span_id"] and callee[0]["parent_id"] == caller[0]["span_id"]
    assert not caller[0]["error"] and not callee[0]["error"]
    out = meshctl("trace", trace_id).stdout
    print(f"\n{out}")
    assert "recommendations server" in out and "catalog client" in out
