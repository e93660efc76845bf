"""Observability end to end: meshd's telemetry from real sidecars, canary comparison, anomaly events
and the adaptive policy, and the dashboard in headless Chromium, on the demo shop in real Docker."""

from __future__ import annotations

import json
import os
import time
import urllib.parse

import pytest

from .conftest import ADMIN, GATEWAY, PROJECT, docker_ps, get_json, http, run, wait_for

pytestmark = pytest.mark.e2e


def meshctl(*args: str, check: bool = True):
    return run(["meshctl", *args], check=check, env={**os.environ, "COLUMNS": "250"})


def container_of(service: str) -> str:
    return docker_ps(f"label=com.docker.compose.project={PROJECT}",
                     f"label=com.docker.compose.service={service}")[0]["Names"]


def app_faults(container: str, **faults) -> None:
    code = ("import sys, urllib.request as u\n"
            "u.urlopen(u.Request('http://127.0.0.1:8080/admin/faults', data=sys.argv[1].encode(), method='POST',"
            " headers={'Content-Type': 'application/json'}), timeout=5).read()")
    run(["docker", "exec", container, "python3", "-c", code, json.dumps(faults)])


def stat_of(service: str, version: str | None = None) -> dict | None:
    for row in get_json(f"{ADMIN}/v1/stat?window=30")["services"]:
        if row["service"] == service and (version is None or row["version"] == version):
            return row
    return None


def scraped_after(t0: float) -> bool:
    """meshd has scraped every node once since `t0` (host and meshd share the clock)."""
    st = get_json(f"{ADMIN}/v1/stat?window=30")
    targets = st.get("targets") or {}
    return bool(st.get("scraped_at") and st["scraped_at"] > t0 and targets.get("total")
                and targets.get("up") == targets["total"])


def test_meshd_sees_live_rates_from_the_sidecars(mesh):
    # The session's mesh may come from test_foundation's meshd restart: sidecars older than this
    # meshd are a baseline at their first scrape (their old totals are not a burst of now), so the
    # calls below must come after it.
    t0 = time.time()
    wait_for(lambda: scraped_after(t0), 20, what="meshd to scrape every node once")
    for i in range(100):
        assert http("GET", f"{GATEWAY}/api/orders/{i}")[0] == 200
    row = wait_for(lambda: (lambda r: r if r and r["requests"] >= 100 else None)(stat_of("payments", "v1")),
                   15, what="meshd's window to count the payments calls")
    assert row["success_rate"] == pytest.approx(1.0)
    out = meshctl("stat").stdout
    assert "payments" in out and "orders" in out
    edges = {(e["source"], e["destination"]) for e in get_json(f"{ADMIN}/v1/stat?window=30")["edges"]}
    assert ("orders", "payments") in edges and ("gateway", "orders") in edges
    targets = get_json(f"{ADMIN}/v1/prometheus/targets")
    services = {t["labels"].get("service") for t in targets}
    assert {"orders", "payments", "catalog"} <= services


def test_compare_shows_the_slower_canary(mesh):
    v2 = container_of("catalog-v2")
    meshctl("split", "catalog", "v1=50", "v2=50")
    app_faults(v2, latency_ms=80)
    try:
        for _ in range(200):
            assert http("GET", f"{GATEWAY}/api/catalog")[0] == 200
        out = wait_for(lambda: (lambda o: o if "slower" in o else None)(
            meshctl("compare", "catalog", "v1", "v2", "--window", "30").stdout), 15, what="a verdict")
        print("\n" + out.strip().splitlines()[-1])
        assert "v2 is slower" in out
    finally:
        app_faults(v2, latency_ms=0)
        meshctl("split", "catalog", "--clear", check=False)


def test_error_spike_tightens_policy_and_events_show_it(mesh):
    payments = container_of("payments")
    since = time.time()
    app_faults(payments, fail_rate=0.5, status=500)
    started = time.monotonic()
    try:
        def tightened():
            for i in range(10):
                http("GET", f"{GATEWAY}/api/orders/{i}", timeout=10)
            kinds = {e["kind"] for e in get_json(f"{ADMIN}/v1/events?since={since}")["events"]
                     if e.get("service") == "payments"}
            return kinds if {"error_rate_spike", "adaptive_tighten"} <= kinds else None

        wait_for(tightened, 20, interval=0.1, what="an error-rate event and a tighter policy")
        took = time.monotonic() - started
        snap = get_json(f"{ADMIN}/v1/snapshot")
        policy = snap["services"]["payments"]["policy"]
        print(f"\nadaptive: tighter payments policy pushed {took:.1f}s after the failures began: {policy}")
        assert took <= 10.0
        assert policy["outlier"]["consecutive_5xx"] == 2
    finally:
        app_faults(payments, fail_rate=0.0, status=503)

    def relaxed():
        for i in range(5):
            http("GET", f"{GATEWAY}/api/orders/{i}", timeout=10)
        return any(e["kind"] == "adaptive_relax" and e.get("service") == "payments"
                   for e in get_json(f"{ADMIN}/v1/events?since={since}")["events"])

    wait_for(relaxed, 40, interval=0.5, what="the policy to relax after recovery")
    # back to the label of compose/demo.yml
    assert get_json(f"{ADMIN}/v1/snapshot")["services"]["payments"]["policy"]["outlier"]["consecutive_5xx"] == 10
    out = meshctl("events").stdout
    assert "error_rate_spike" in out and "adaptive_tighten" in out and "adaptive_relax" in out


def test_dashboard_shows_services_and_live_edges_in_chromium(mesh, tmp_path):
    from ..adapters.test_dashboard_browser import CHROMIUM_ARGS, _chromium

    exe = _chromium()
    from playwright.sync_api import sync_playwright

    for i in range(60):
        http("GET", f"{GATEWAY}/api/orders/{i}")
    from meshctl.api import load_admin_token

    token = load_admin_token()
    assert token, "meshd's admin token must be readable (the dashboard sends it with every data call)"
    url = f"{ADMIN}/dashboard#token={urllib.parse.quote(token)}"
    shot = tmp_path / "dashboard.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(url)
            page.wait_for_selector('svg#graph g.node[data-id="payments"]', timeout=15_000)
            page.wait_for_function(
                "() => [...document.querySelectorAll('svg#graph g.edge')].some("
                "e => e.dataset.source === 'orders' && e.dataset.destination === 'payments' && parseFloat(e.dataset.rps) > 0)",
                timeout=15_000)
            nodes = set(page.eval_on_selector_all("svg#graph g.node", "els => els.map(e => e.dataset.id)"))
            page.screenshot(path=str(shot))
        finally:
            browser.close()
    assert {"gateway", "orders", "payments", "inventory", "users", "notifications"} <= nodes
    assert shot.stat().st_size > 10_000
