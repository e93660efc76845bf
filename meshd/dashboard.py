"""The mesh dashboard: one page on meshd's admin port (127.0.0.1:15014, local only) at GET /dashboard.

Plain HTML, CSS and a small vanilla JavaScript file from meshd/static/ (no build step, no CDN): the
page polls the JSON endpoints (/v1/graph, /v1/stat, /v1/compare, /v1/events) every 2 s and draws the
service graph as SVG, RED figures per service and version, canary comparisons and recent events.
Those endpoints need meshd's admin token: open the URL `meshctl dashboard` prints (token in the
fragment, which browsers never send to a server); the script keeps it in sessionStorage.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

STATIC_DIR = Path(__file__).resolve().parent / "static"
# The page and its two files hold no data: meshd's admin-token check may let these GETs through
# (the page's script then sends the token, taken from the URL fragment `#token=...` that
# `meshctl dashboard` prints, as a bearer header on every JSON request).
PUBLIC_PATHS = frozenset({"/dashboard", "/dashboard/", "/dashboard/dashboard.js", "/dashboard/dashboard.css"})
FILES = {
    "dashboard.js": "application/javascript",
    "dashboard.css": "text/css",
}
# Everything from this origin only; nothing inline but styles set by the script on SVG elements.
HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
                               "script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _read(name: str) -> bytes:
    return (STATIC_DIR / name).read_bytes()


def add_routes(app: web.Application) -> None:
    """GET /dashboard and its two static files."""

    async def page(_req: web.Request) -> web.Response:
        return web.Response(body=_read("dashboard.html"), content_type="text/html", charset="utf-8",
                            headers=HEADERS)

    async def static(req: web.Request) -> web.Response:
        name = req.match_info["name"]
        if name not in FILES:
            raise web.HTTPNotFound()
        return web.Response(body=_read(name), content_type=FILES[name], charset="utf-8", headers=HEADERS)

    app.router.add_get("/dashboard", page)
    app.router.add_get("/dashboard/", page)
    app.router.add_get("/dashboard/{name}", static)
