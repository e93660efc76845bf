"""bench.h2path's pure parts: h2load's summary and per-request log, the answer check, the per-round
ratios of its runs (bench.datapath.pair_ratios); the Envoy pair's HTTP/2 configuration; the profile's
categories of the HTTP/2 path's frames."""

from __future__ import annotations

import pytest

from bench.datapath import pair_ratios
from bench.envoy_pair import envoy_config
from bench.h2path import GRPC_MESSAGE, KINDS, answered_ok, latency_quantiles, parse_h2load
from bench.profile import COMPILED, H2_BRIDGE, H2_LIBRARY, _owner

H2LOAD_OUT = """\
starting benchmark...
spawning thread #0: 1 total client(s). Timing-based test with 0s of warm-up time and 5s of main duration for measurements.
Main benchmark duration is started for client #0.

finished in 5.00s, 1205.40 req/s, 181.23KB/s
requests: 6027 total, 6059 started, 6027 done, 6025 succeeded, 2 failed, 0 errored, 1 timeout
status codes: 6025 2xx, 0 3xx, 0 4xx, 2 5xx
traffic: 906.14KB (927891) total, 110.77KB (113430) headers (space savings 93.90%), 588.57KB (602700) data
"""


@pytest.mark.parametrize("text, expected", [
    (H2LOAD_OUT, {"seconds": 5.0, "done": 6027, "succeeded": 6025, "failed": 2, "errored": 0, "timeout": 1,
                  "status": {"2xx": 6025, "3xx": 0, "4xx": 0, "5xx": 2}}),
    ("finished in 365.72ms, 54686.80 req/s, 7.04MB/s\n"
     "requests: 20000 total, 20000 started, 20000 done, 20000 succeeded, 0 failed, 0 errored, 0 timeout\n",
     {"seconds": 0.36572, "done": 20000, "succeeded": 20000, "failed": 0, "errored": 0, "timeout": 0}),
])
def test_parse_h2load(text, expected):
    out = parse_h2load(text)
    assert out.pop("seconds") == pytest.approx(expected.pop("seconds"))
    assert out == expected


def test_parse_h2load_without_a_summary_raises():
    with pytest.raises(ValueError):
        parse_h2load("invalid URI\n")


def test_latency_quantiles_from_the_per_request_log():
    rows = [f"1700000000{i:06d}\t200\t{d}" for i, d in enumerate(range(1, 101))]
    rows += ["1700000001000000\t503\t7", "1700000001000001\t-1\t9999999", "garbage"]
    q, bad = latency_quantiles("\n".join(rows) + "\n")
    # 101 completed calls (the 503 counts, the failed stream's -1 does not); nearest rank
    assert q == {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p999": 100.0}
    assert bad == 2
    assert latency_quantiles("") == ({"p50": 0.0, "p90": 0.0, "p99": 0.0, "p999": 0.0}, 0)


def _answer(status=200, body=GRPC_MESSAGE, trailers=None, content_type="application/grpc"):
    return {"status": status, "body": body, "trailers": {"grpc-status": "0"} if trailers is None else trailers,
            "headers": {"content-type": content_type}}


@pytest.mark.parametrize("kind, answer, ok", [
    ("grpc", _answer(), True),
    ("grpc", _answer(trailers={"grpc-status": "14"}), False),
    ("grpc", _answer(trailers={}), False),
    ("grpc", _answer(content_type="text/plain"), False),
    ("grpc", _answer(status=503), False),
    ("grpc", _answer(body=b""), False),
    ("http2", _answer(body=b"0123456789" * 10, trailers={}, content_type="text/plain"), True),
    ("http2", _answer(body=b"short", trailers={}, content_type="text/plain"), False),
])
def test_answered_ok(kind, answer, ok):
    assert answered_ok(KINDS[kind], answer) is ok


def _run(path, rd, rps, cpu=None, p99=1.0, hwm=1000):
    roles = {} if cpu is None else {"outbound": {"hwm_kib": hwm}, "inbound": {"hwm_kib": hwm}}
    return {"scenario": "grpc-c1m32", "round": rd, "path": path, "rps": rps,
            "latency_ms": {"p50": p99 / 2, "p90": p99 / 1.5, "p99": p99}, "cpu_s_per_1000": {} if cpu is None else {"pair": cpu},
            "memory_kib": roles}


def test_ratios_of_the_h2_runs_are_per_round_then_the_median():
    runs = [_run("direct", 0, 1000), _run("mesh", 0, 100, cpu=1.0, p99=10, hwm=3000),
            _run("envoy", 0, 400, cpu=0.1, p99=5, hwm=6000),
            _run("direct", 1, 1000), _run("mesh", 1, 200, cpu=1.0, p99=10, hwm=3000),
            _run("envoy", 1, 400, cpu=0.2, p99=5, hwm=6000),
            _run("direct", 2, 1000), _run("mesh", 2, 300, cpu=0.9, p99=10, hwm=3000),
            _run("envoy", 2, 400, cpu=0.3, p99=5, hwm=6000)]
    r = pair_ratios(runs)["grpc-c1m32"]
    assert r["rps_mesh_over_envoy"] == 0.5
    assert r["cpu_mesh_over_envoy"] == 5.0       # per round: 10, 5, 3
    assert r["p99_mesh_over_envoy"] == 2.0 and r["hwm_mesh_over_envoy"] == 0.5
    assert r["rps_mesh_over_direct"] == 0.2 and r["rps_envoy_over_direct"] == 0.4
    assert "rps_mesh_over_haproxy" not in r and r["rounds"] == 3


@pytest.mark.parametrize("http2, alpn, codec, upstream", [
    (False, ["http/1.1"], "HTTP1", "http_protocol_options"),
    (True, ["h2"], "HTTP2", "http2_protocol_options"),
])
def test_envoy_pair_config_speaks_http2_when_asked(tmp_path, http2, alpn, codec, upstream):
    pki = {"ca": tmp_path / "ca.pem", "frontend": tmp_path / "frontend", "payments": tmp_path / "payments"}
    for role in ("outbound", "inbound"):
        cfg = envoy_config(role, 1, 2, 3, pki, http2)["static_resources"]
        chain = cfg["listeners"][0]["filter_chains"][0]
        assert chain["filters"][0]["typed_config"]["codec_type"] == codec
        cluster = cfg["clusters"][0]
        options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
        assert list(options["explicit_http_config"]) == [upstream]
        tls = chain.get("transport_socket") or cluster.get("transport_socket")
        assert tls["typed_config"]["common_tls_context"]["alpn_protocols"] == alpn


@pytest.mark.parametrize("frame, category", [
    ("HeaderTable.search (hpack/table.py:191)", H2_LIBRARY),
    ("send_headers (/usr/lib/python3/dist-packages/h2/connection.py:80)", H2_LIBRARY),
    ("Frame.__repr__ (hyperframe/frame.py:70)", H2_LIBRARY),
    ("_serve_stream (sidecar/datapath/h2bridge.py:120)", H2_BRIDGE),
    ("parse_request_head (sidecar/datapath/h2.py:40)", H2_BRIDGE),
    ("_Upstream_data_received (sidecar/datapath/engine.cpython-311-x86_64-linux-gnu.so)", COMPILED),
    ("__pyx_f_engine (sidecar/datapath/engine.c:1234)", COMPILED),
    ("data_received (sidecar/proxy.c:99)", COMPILED),
    ("WeakSet.add (_weakrefset.py:85)", "other Python (asyncio, stdlib)"),
    ("_PyEval_EvalFrameDefault (ceval.c:1)", None),
])
def test_profile_categories_of_http2_frames(frame, category):
    """py-spy's frames of the HTTP/2 path land in their own categories (summarize_raw)."""
    assert _owner(frame) == category


def test_replace_section_inserts_a_new_section_before_the_first_heading_found():
    from bench.report import replace_section

    text = "# r\n\n## Data path\n\nd\n\n## Targets\n\nt\n"
    out = replace_section(text, "## HTTP/2 and gRPC", "## HTTP/2 and gRPC\n\nh\n", before=("## Cost", "## Targets"))
    assert out == "# r\n\n## Data path\n\nd\n\n## HTTP/2 and gRPC\n\nh\n\n## Targets\n\nt\n"
    again = replace_section(out, "## HTTP/2 and gRPC", "## HTTP/2 and gRPC\n\nh2\n", before=("## Targets",))
    assert again == out.replace("\nh\n", "\nh2\n")


def test_flame_graph_titles_keep_no_machine_paths(tmp_path):
    from bench.profile import scrub_title

    svg = tmp_path / "profile-grpc-inbound.svg"
    svg.write_text(f'<text id="title">/opt/x/bin/py-spy record --pid 7 --native -o {svg}</text><g>h2 (h2/a.py:1)</g>')
    scrub_title(svg, "/opt/x/bin/py-spy")
    assert svg.read_text() == ('<text id="title">py-spy record --pid 7 --native -o profile-grpc-inbound.svg</text>'
                               '<g>h2 (h2/a.py:1)</g>')
