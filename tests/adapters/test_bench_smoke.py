"""The benchmark harness (bench/, `make bench`) works: each data path and the control plane for
about a second, numbers present and files written. Never asserts a speed.

Needs no apt package: the pure-Python app and load generator (bench.pyapp, bench.pyload) stand in
for nginx and wrk, so the direct and mesh paths always run; the run with wrk, nginx and the HAProxy
pair happens where those are installed (`make bench` installs them) and is skipped elsewhere.
"""

from __future__ import annotations

import json
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
        if "mesh" in paths and "haproxy" in paths:
            assert dp["ratios"][sc]["rps_mesh_over_haproxy"] > 0
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


def test_datapath_with_the_python_app_and_load_generator(tmp_path):
    res = run(_args(tmp_path, "--parts", "datapath", "--python-tools", "--scenarios", "c1,close",
                    "--paths", "direct,mesh"), **QUIET)
    assert res["datapath"]["app"] == "pyapp" and res["datapath"]["load_tool"] == "pyload"
    _check_datapath(res, tmp_path, ["direct", "mesh"], ["c1", "close"])


def test_datapath_with_wrk_nginx_and_haproxy(tmp_path):
    missing = [t for t in ("wrk", "nginx", "haproxy") if env.which(t) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (`make bench` installs them)")
    res = run(_args(tmp_path, "--parts", "datapath", "--scenarios", "c32"), **QUIET)
    assert res["datapath"]["app"] == "nginx" and res["datapath"]["load_tool"] == "wrk"
    _check_datapath(res, tmp_path, ["direct", "mesh", "haproxy"], ["c32"])
    verdicts = {name: verdict for name, _, verdict in targets(res)}
    assert verdicts["req/s at 32 connections >= 0.8x HAProxy"] in ("met", "NOT met")


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
