"""The dashboard in a real headless browser (Debian's chromium driven by Playwright for Python).

A meshd admin app with the telemetry routes and meshd's admin-token check is fed canned telemetry
(two scrapes of canned exposition text per node); the page, opened with the token in its URL
fragment as `meshctl dashboard` prints it, must draw the services and the edges with non-zero rates, without a console
error (the page's Content-Security-Policy forbids inline scripts), and a screenshot is taken.

Skipped when Playwright or chromium is missing, except under CI=true, where that is a failure:
CI must `apt-get install -y chromium` and `pip install playwright` (never `playwright install`).
"""

from __future__ import annotations

import os
import shutil
import time

import pytest
from aiohttp import web

from meshd.dashboard import PUBLIC_PATHS
from meshd.metrics_hub import TelemetryHub, Target, add_routes
from meshd.traces import SettingsBook, TraceStore, add_routes as add_trace_routes
from meshcore.spans import KIND_CLIENT, KIND_SERVER, SpanRecord
from meshcore.telemetry_settings import TelemetrySettings
from sidecar.telemetry import Telemetry, render_metrics

from .test_meshd_telemetry import LoopThread

CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def _chromium() -> str:
    """The chromium executable, or skip (fail under CI=true) saying what is missing."""
    missing = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("Playwright for Python (pip install playwright)")
    exe = os.environ.get("MESH_TEST_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        missing.append("chromium (apt-get install -y chromium)")
    if missing:
        message = "dashboard browser test needs " + " and ".join(missing)
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + ": CI must install it")
        pytest.skip(message)
    return exe


def _canned_hub() -> TelemetryHub:
    gateway, frontend, catalog = Telemetry(), Telemetry(), Telemetry()
    targets = [Target("127.0.0.1:1", "gateway", "gateway", "gateway", "", "mesh"),
               Target("127.0.0.1:2", "frontend-1-mesh", "sidecar", "frontend", "v1", "shop"),
               Target("127.0.0.1:3", "catalog-v1-1-mesh", "sidecar", "catalog", "v1", "shop"),
               Target("127.0.0.1:4", "catalog-v2-1-mesh", "sidecar", "catalog", "v2", "shop")]
    hub = TelemetryHub(None, targets=lambda: targets, adaptive=None)
    hub.last_targets = targets
    now = time.monotonic()
    for i, at in enumerate((now - 4.0, now - 2.0)):
        if i:  # the second scrape sees 2 s of traffic
            for _ in range(40):
                gateway.record_request("source", "gateway", "v1", "frontend", "frontend", "v1", 200, "-", 9.0)
            for _ in range(20):
                frontend.record_request("source", "frontend", "v1", "catalog", "catalog", "v1", 200, "-", 3.0)
            for n in range(20):
                frontend.record_request("source", "frontend", "v1", "catalog", "catalog", "v2",
                                        503 if n < 4 else 200, "-", 150.0)
            for _ in range(20):
                catalog.record_request("destination", "frontend", "v1", "catalog", "catalog", "v1", 200, "-", 2.0)
        for addr, t in (("127.0.0.1:1", gateway), ("127.0.0.1:2", frontend), ("127.0.0.1:3", catalog)):
            hub.ingest(addr, render_metrics(t).decode(), at)
    hub.events.add("error_rate_spike", "catalog v2: error rate 18.2% (canned)", "catalog", "v2")
    return hub


TOKEN = "t" * 43


def _admin_middlewares() -> list:
    """meshd's admin-token check, letting the dashboard's static files through (as meshd does)."""
    try:
        from meshd.security_api import admin_auth_middleware
    except ImportError:
        return []
    check = admin_auth_middleware(TOKEN)

    @web.middleware
    async def guarded(request, handler):
        if request.method == "GET" and request.path in PUBLIC_PATHS:
            return await handler(request)
        return await check(request, handler)

    return [guarded]


TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def _canned_traces() -> TraceStore:
    """One trace: gateway -> frontend (server) -> frontend->catalog (client) -> catalog (server, 503)."""
    t0 = int(time.time() * 1e9)
    ms = 1_000_000
    rows = [("gateway", "a1", None, "GET frontend", KIND_SERVER, 0, 9, 200),
            ("frontend", "a2", "a1", "GET /", KIND_SERVER, 1, 8, 200),
            ("frontend", "a3", "a2", "GET catalog", KIND_CLIENT, 2, 6, 503),
            ("catalog", "a4", "a3", "GET /items", KIND_SERVER, 3, 5, 503)]
    store = TraceStore()
    store.add([SpanRecord(trace_id=TRACE_ID, span_id=sid.ljust(16, "0"), parent_id=parent and parent.ljust(16, "0"),
                          name=name, kind=kind, start_ns=t0 + a * ms, end_ns=t0 + b * ms, service=svc,
                          attributes=(("http.response.status_code", code),), error=code >= 500)
               for svc, sid, parent, name, kind, a, b, code in rows])
    return store


class _MemoryStore:
    def __init__(self):
        self.data = {}

    def get(self, key, default=None):
        return self.data.get(key, default)

    def put(self, key, value):
        self.data[key] = value


@pytest.fixture
def dashboard_url():
    lt = LoopThread()
    hub = _canned_hub()
    state = {}

    async def start():
        app = web.Application(middlewares=_admin_middlewares())
        add_routes(app, hub)

        async def publish():
            return 1
        add_trace_routes(app, _canned_traces(), SettingsBook(_MemoryStore(), TelemetrySettings()), publish)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        state["runner"] = runner
        return f"http://127.0.0.1:{runner.addresses[0][1]}/dashboard#token={TOKEN}"

    url = lt.run(start())
    yield url
    lt.run(state["runner"].cleanup())
    lt.close()


def test_dashboard_draws_the_graph_in_chromium(dashboard_url, tmp_path):
    exe = _chromium()
    from playwright.sync_api import sync_playwright

    shot = tmp_path / "dashboard.png"
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(dashboard_url)
            page.wait_for_selector('svg#graph g.node[data-id="catalog"]', timeout=10_000)
            page.wait_for_selector("#canary .card", timeout=10_000)
            nodes = page.eval_on_selector_all("svg#graph g.node", "els => els.map(e => e.dataset.id)")
            assert {"gateway", "frontend", "catalog"} <= set(nodes)
            edges = page.eval_on_selector_all(
                "svg#graph g.edge",
                "els => els.map(e => [e.dataset.source, e.dataset.destination, parseFloat(e.dataset.rps),"
                " e.querySelector('text').textContent])")
            by_pair = {(s, d): (rps, label) for s, d, rps, label in edges}
            # 40 requests each over the covered span (a few seconds, as wall time passes): equal rates
            assert by_pair[("gateway", "frontend")][0] > 0
            assert by_pair[("frontend", "catalog")][0] == pytest.approx(by_pair[("gateway", "frontend")][0], rel=0.2)
            assert all(rps > 0 and "rps" in label for rps, label in by_pair.values())
            assert "10.0% err" in by_pair[("frontend", "catalog")][1]
            rows = page.eval_on_selector_all("#red tbody tr", "els => els.map(e => e.dataset.service + ' ' + e.dataset.version)")
            assert "catalog v1" in rows and "catalog v2" in rows
            canary = page.inner_text("#canary")
            assert "catalog: v1 vs v2" in canary and "v2 fails more" in canary
            assert "canned" in page.inner_text("#events")
            assert "#token" not in page.url  # taken out of the address bar
            page.click(f'#traces tr[data-trace="{TRACE_ID}"]')
            page.wait_for_selector("#trace .span", timeout=10_000)
            spans = page.eval_on_selector_all("#trace .span", "els => els.map(e => [e.textContent, e.className,"
                                              " parseFloat(e.style.paddingLeft)])")
            assert [t.split()[0] for t, _, _ in spans] == ["gateway", "frontend", "frontend", "catalog"]
            assert [d for _, _, d in spans] == sorted(d for _, _, d in spans)   # indented by depth
            assert "bad" in spans[3][1] and "503" in spans[3][0] and "bad" not in spans[0][1]
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert not errors, errors
    data = shot.read_bytes()
    if os.environ.get("MESH_TEST_SCREENSHOT"):
        shutil.copy(shot, os.environ["MESH_TEST_SCREENSHOT"])
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
