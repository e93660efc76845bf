"""The node's admin port (15020 for sidecars, Istio's merged-metrics port): metrics, readiness, config.

A small HTTP/1.1 server on asyncio and httptools (no web framework: it would cost the sidecar
~10 MiB of memory): GET and HEAD only, keep-alive and pipelining, bounded request heads and bodies.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Callable

from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser, parse_url

from meshcore.snapshot import encode_snapshot

if TYPE_CHECKING:
    from .control import ControlClient

ADMIN_PORT = 15020
MAX_HEAD = 8 * 1024        # request line + headers; larger: 431 and close
MAX_BODY = 64 * 1024       # admin requests carry no body; a larger one: 413 and close
IDLE_TIMEOUT_S = 75.0      # an idle (or slowly sending) connection is closed after this
TEXT = "text/plain; charset=utf-8"
JSON = "application/json; charset=utf-8"
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            413: "Payload Too Large", 431: "Request Header Fields Too Large", 503: "Service Unavailable"}

# A route answers (status, content type, body, extra headers).
Reply = tuple[int, str, bytes, tuple[tuple[str, str], ...]]


def _json(body: dict, status: int = 200) -> Reply:
    """A JSON reply."""
    return status, JSON, json.dumps(body).encode(), ()


class AdminApp:
    """The admin routes: path -> a function answering a GET (or HEAD) of it."""

    def __init__(self, routes: dict[str, Callable[[], Reply]]):
        self.routes = routes

    def respond(self, method: str, path: str) -> Reply:
        """The reply to one request (404 unknown path, 405 other than GET/HEAD)."""
        route = self.routes.get(path)
        if route is None:
            return 404, TEXT, b"404: Not Found", ()
        if method not in ("GET", "HEAD"):
            return 405, TEXT, b"405: Method Not Allowed", (("Allow", "GET, HEAD"),)
        return route()


def not_ready_reason(control: ControlClient, is_listening: Callable[[], bool]) -> str | None:
    """Why the node cannot serve yet (no config, listeners down, no workload certificate), or None."""
    if control.current is None:
        return "no config from meshd yet"
    if not is_listening():
        return "listeners not up"
    agent = getattr(control, "agent", None)
    if agent is not None and not agent.has_valid_cert():
        return "no workload certificate yet"
    return None


def build_admin_app(control: ControlClient, render_metrics: Callable[[], bytes], is_listening: Callable[[], bool]) -> AdminApp:
    """`/metrics` (Prometheus text), `/healthz/ready` (200 once serving with a config), `/config`."""

    def metrics() -> Reply:
        return 200, TEXT, render_metrics(), (("X-Content-Type-Options", "nosniff"),)

    def ready() -> Reply:
        reason = not_ready_reason(control, is_listening)
        if reason is not None:
            return _json({"ready": False, "reason": reason}, 503)
        return _json({"ready": True, "version": control.current.version})

    def config() -> Reply:
        agent = getattr(control, "agent", None)
        return _json({"control_connected": control.connected, "nacks": control.nacks,
                      "control_last_error": getattr(control, "last_error", None),
                      "tls": agent.describe() if agent is not None else None,
                      "control_refusals": getattr(control, "refusals", 0),
                      "snapshot": encode_snapshot(control.current) if control.current else None})

    return AdminApp({"/metrics": metrics, "/healthz/ready": ready, "/config": config})


class _AdminConnection(asyncio.Protocol):
    """One client connection: parse requests with httptools, answer each in order."""

    def __init__(self, app: AdminApp, conns: set):
        self.app = app
        self.conns = conns
        self.parser = HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.head = 0
        self.body = 0
        self.done = False          # a final reply was written: ignore anything else
        self.write_paused = False  # the client does not read its replies
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.conns.add(self)
        self._arm()

    def connection_lost(self, exc) -> None:
        self.conns.discard(self)
        if self.timer is not None:
            self.timer.cancel()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False

    def data_received(self, data: bytes) -> None:
        if self.done:
            return
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade:
            self._finish()         # the reply is written; what follows is not HTTP/1.1
        except HttpParserError:
            if not self.done:
                self._reply(400, TEXT, b"400: Bad Request", (), close=True)

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url, self.head, self.body = b"", 0, 0

    def on_url(self, url: bytes) -> None:
        self.url += url
        self._count_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)

    def on_body(self, body: bytes) -> None:
        self.body += len(body)
        if self.body > MAX_BODY and not self.done:
            self._reply(413, TEXT, b"413: Payload Too Large", (), close=True)
            raise HttpParserError("body too large")

    def on_message_complete(self) -> None:
        if self.done:
            return
        if self.write_paused:      # pipelining without reading the replies: stop here
            self._finish()
            return
        method = self.parser.get_method().decode("ascii", "replace")
        try:
            path = (parse_url(self.url).path or b"").decode("utf-8")
        except (HttpParserError, UnicodeDecodeError):
            self._reply(400, TEXT, b"400: Bad Request", (), close=True)
            return
        status, ctype, body, headers = self.app.respond(method, path)
        keep = self.parser.should_keep_alive() and not self.parser.should_upgrade()
        self._reply(status, ctype, body, headers, close=not keep, head_only=method == "HEAD")
        self._arm()

    def _count_head(self, n: int) -> None:
        self.head += n
        if self.head > MAX_HEAD and not self.done:
            self._reply(431, TEXT, b"431: Request Header Fields Too Large", (), close=True)
            raise HttpParserError("head too large")

    def _reply(self, status: int, ctype: str, body: bytes, headers, close: bool, head_only: bool = False) -> None:
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, '')}", f"Content-Type: {ctype}",
                 f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in headers)]
        if close:
            lines.append("Connection: close")
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head_only else body))
        if close:
            self._finish()

    def _finish(self) -> None:
        self.done = True
        self.transport.close()     # after the buffered replies are written

    def _arm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_later(IDLE_TIMEOUT_S, self._finish)


class AdminServer:
    """A listening admin port; `cleanup()` stops it and closes its connections."""

    def __init__(self, server: asyncio.AbstractServer, conns: set):
        self.server = server
        self.conns = conns

    @property
    def port(self) -> int:
        """The port it listens on (useful when started on port 0)."""
        return self.server.sockets[0].getsockname()[1]

    async def cleanup(self) -> None:
        """Stop listening and close every connection."""
        self.server.close()
        for conn in list(self.conns):
            conn.transport.close()
        await self.server.wait_closed()


async def start_admin(app: AdminApp, host: str, port: int) -> AdminServer:
    """Serve the admin app on host:port; returns the server to clean up."""
    conns: set[_AdminConnection] = set()
    server = await asyncio.get_running_loop().create_server(lambda: _AdminConnection(app, conns), host, port,
                                                            reuse_address=True)
    return AdminServer(server, conns)
