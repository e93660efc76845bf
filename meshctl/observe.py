"""meshctl stat / top / compare / events / dashboard / trace / traces / tracing: the mesh's live RED
figures, canary verdicts and events, from meshd's telemetry (GET /v1/stat, /v1/compare, /v1/events),
the dashboard's URL, and traces from meshd's trace store (GET /v1/traces) with their settings."""

from __future__ import annotations

import time
from typing import Any, Optional

import typer

from .context import Grid, ReadCommand, command_group, session

commands = command_group()
WINDOW = typer.Option(60.0, "--window", "-w", help="seconds of history to look at (1..300)")


def fmt_rps(x: Any) -> str:
    if x is None:
        return "-"
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def fmt_pct(x: Any) -> str:
    return "-" if x is None else f"{x * 100:.2f}%"


def fmt_ms(x: Any) -> str:
    if x is None:
        return "-"
    return f"{x:.0f} ms" if x >= 10 else f"{x:.1f} ms"


def _style(row: dict) -> str | None:
    rate = row.get("error_rate")
    if not row.get("requests"):
        return "dim"
    if rate is not None and rate >= 0.2:
        return "bold red"
    if rate is not None and rate > 0.01:
        return "yellow"
    return None


def stat_tables(data: dict) -> list[Grid]:
    """Tables of a /v1/stat body: per service and version, then per call edge."""
    from rich.text import Text

    tight = {t["service"]: t.get("adaptive") for t in data.get("totals") or []
             if (t.get("adaptive") or {}).get("mode") == "tight"}
    targets = data.get("targets") or {}
    grid = Grid(f"services (last {data.get('window_s', 60):g} s, {targets.get('up', 0)}/"
                f"{targets.get('total', 0)} nodes scraped)",
                (("service", "left"), ("version", "left"), ("RPS", "right"), ("success", "right"),
                 ("p50", "right"), ("p90", "right"), ("p99", "right"), ("requests", "right")))
    for r in data.get("services") or []:
        name = Text(str(r.get("service")))
        if r.get("service") in tight:
            name.append(" (tightened)", style="yellow")
        grid.add_row(name, Text(str(r.get("version"))), fmt_rps(r.get("rps")), fmt_pct(r.get("success_rate")),
                     fmt_ms(r.get("p50_ms")), fmt_ms(r.get("p90_ms")), fmt_ms(r.get("p99_ms")),
                     str(r.get("requests", 0)), style=_style(r))
    out = [grid]
    edges = data.get("edges") or []
    if edges:
        calls = Grid("calls (source -> destination)", (("source", "left"), ("destination", "left"),
                                                        ("RPS", "right"), ("success", "right"), ("p99", "right")))
        for e in edges:
            calls.add_row(Text(str(e.get("source"))), Text(str(e.get("destination"))), fmt_rps(e.get("rps")),
                          fmt_pct(e.get("success_rate")), fmt_ms(e.get("p99_ms")), style=_style(e))
        out.append(calls)
    return out


def _fmt_time(ts: Any) -> str:
    try:
        return time.strftime("%H:%M:%S", time.localtime(float(ts)))
    except (TypeError, ValueError):
        return "?"


def events_table(events: list[dict], title: str = "events") -> Grid:
    """A table of /v1/events entries: time, kind, service and version, message."""
    from rich.text import Text

    grid = Grid(f"{title} ({len(events)})", ("time", "kind", "service", "message"))
    for e in events:
        bad = any(w in str(e.get("kind")) for w in ("spike", "jump", "nack", "tighten", "ejection", "expiry", "refused"))
        grid.add_row(_fmt_time(e.get("ts")), Text(str(e.get("kind")), style="red" if bad else "green"),
                     Text(" ".join(x for x in (e.get("service"), e.get("version")) if x) or "-"),
                     Text(str(e.get("message"))))
    return grid


def trace_tree(data: dict):
    """A rich Tree of one trace (GET /v1/traces/{id}): a line per span with service, kind, name,
    status, flags, duration and a bar placing it on the trace's time line."""
    from rich.text import Text
    from rich.tree import Tree

    info = data.get("trace") or {}
    spans = data.get("spans") or []
    total = float(info.get("duration_ms") or 0.0) or 1.0
    t0 = min((s.get("start", 0.0) for s in spans), default=0.0)
    root = Tree(Text(f"trace {info.get('trace_id')}  {info.get('spans')} spans  "
                     f"{fmt_ms(info.get('duration_ms'))}  services: {', '.join(info.get('services') or [])}",
                     style="bold"))
    width = 24
    nodes: list = [root]
    for s in spans:
        attrs = s.get("attributes") or {}
        offset = (s.get("start", t0) - t0) * 1000.0
        lo = int(width * offset / total)
        hi = max(lo + 1, int(width * (offset + s.get("duration_ms", 0.0)) / total))
        bar = " " * lo + "█" * (min(hi, width) - lo)
        status = attrs.get("http.response.status_code", "-")
        flags = attrs.get("mesh.response_flags", "-")
        line = Text()
        line.append(f"{s.get('service')}", style="cyan")
        line.append(f" {s.get('kind', '').lower()} ")
        line.append(str(s.get("name")))
        line.append(f"  {status}", style="red" if s.get("error") else "green")
        if flags not in ("-", None):
            line.append(f" {flags}", style="yellow")
        line.append(f"  +{fmt_ms(offset)} {fmt_ms(s.get('duration_ms'))}  ")
        line.append(f"|{bar:<{width}}|", style="dim")
        if s.get("orphan"):
            line.append("  (parent span not received)", style="dim")
        depth = int(s.get("depth", 0))
        del nodes[depth + 1:]
        parent = nodes[min(depth, len(nodes) - 1)]
        nodes.append(parent.add(line))
    return root


def stat_path(window: float) -> str:
    return f"/v1/stat?window={window:g}"


@commands.command(cls=ReadCommand)
def stat(ctx: typer.Context, window: float = WINDOW) -> None:
    """Requests/s, success rate and p50/p90/p99 per service and version (and per call edge)."""
    mesh = session(ctx)
    data = mesh.read(stat_path(window))
    if data is None:
        return
    if not data.get("services"):
        mesh.show("no traffic seen yet (meshd scrapes every sidecar's /metrics every 2 s)")
        return
    mesh.show(*stat_tables(data))


@commands.command(cls=ReadCommand)
def top(ctx: typer.Context,
        window: float = typer.Option(10.0, "--window", "-w", help="seconds of history (1..300)"),
        interval: float = typer.Option(1.0, "--interval", help="seconds between refreshes"),
        once: bool = typer.Option(False, "--once", help="print one frame and exit")) -> None:
    """A live view of the mesh (refreshes every second until Ctrl-C); -o json prints one frame's data."""
    mesh = session(ctx)

    def fetch() -> tuple[dict, list]:
        return mesh.get(stat_path(window)), mesh.get("/v1/events?since=15m&limit=8").get("events") or []

    if mesh.json:
        data, events = fetch()
        mesh.print_json({"stat": data, "events": events})
        return
    from rich.console import Group
    from rich.text import Text

    def frame():
        data, events = fetch()
        parts: list = [Text(f"meshctl top  {mesh.api_client().base_url}  {time.strftime('%H:%M:%S')}  "
                            "(Ctrl-C to quit)", style="bold")]
        parts += stat_tables(data)
        if events:
            parts.append(events_table(list(reversed(events)), "recent events"))
        return Group(*(mesh.renderable(p) for p in parts))

    if once:
        mesh.show(frame())
        return
    from rich.live import Live

    try:
        if not mesh.is_terminal():  # a pipe or a log: a frame after the other (as `top -b`)
            while True:
                mesh.show(frame())
                time.sleep(max(0.2, interval))
        with Live(frame(), console=mesh.console, refresh_per_second=4, screen=False) as live:
            while True:
                time.sleep(max(0.2, interval))
                live.update(frame())
    except KeyboardInterrupt:
        pass


@commands.command(cls=ReadCommand)
def compare(ctx: typer.Context,
            service: str = typer.Argument(..., metavar="SERVICE", help="mesh service"),
            a: str = typer.Argument(..., metavar="V1", help="baseline version, e.g. v1"),
            b: str = typer.Argument(..., metavar="V2", help="candidate version, e.g. v2"),
            window: float = WINDOW) -> None:
    """Two versions of a service side by side (success, latency) and a verdict line."""
    from urllib.parse import urlencode

    data = session(ctx).read("/v1/compare?" + urlencode({"service": service, "a": a, "b": b,
                                                          "window": f"{window:g}"}))
    if data is None:
        return
    from rich.text import Text

    left, right = data.get("a") or {}, data.get("b") or {}
    grid = Grid(f"{service}: {a} vs {b} (last {data.get('window_s', window):g} s)",
                ("", (a, "right"), (b, "right")))
    for name, key, fmt in (("requests", "requests", str), ("RPS", "rps", fmt_rps),
                           ("success", "success_rate", fmt_pct), ("p50", "p50_ms", fmt_ms),
                           ("p90", "p90_ms", fmt_ms), ("p99", "p99_ms", fmt_ms)):
        grid.add_row(name, fmt(left.get(key)), fmt(right.get(key)))
    session(ctx).show(grid, Text(f"verdict: {data.get('verdict')}",
                                 style="bold red" if data.get("significant") else "green"))


@commands.command(cls=ReadCommand)
def dashboard(ctx: typer.Context) -> None:
    """Print the dashboard's URL (meshd's admin port, local only), with the admin token in its fragment."""
    mesh = session(ctx)
    mesh.get("/v1/stat?window=10")  # meshd is up and the token is accepted
    client = mesh.api_client()
    url = f"{client.base_url}/dashboard"
    if getattr(client, "token", None):
        from urllib.parse import quote

        url += "#token=" + quote(client.token, safe="")
    if mesh.json:
        mesh.print_json({"url": url})
    else:
        typer.echo(url)


@commands.command(cls=ReadCommand)
def events(ctx: typer.Context,
           since: Optional[str] = typer.Option(None, "--since",
                                               help="a duration back from now (10m, 1h) or epoch seconds"),
           limit: int = typer.Option(100, "--limit", help="at most this many (the newest)")) -> None:
    """Mesh events: error spikes, latency jumps, ejections, NACKs, adaptive policy changes, refused nodes."""
    from urllib.parse import urlencode

    query = {"limit": str(limit)}
    if since:
        query["since"] = since
    data = session(ctx).read("/v1/events?" + urlencode(query))
    if data is None:
        return
    found = data.get("events") or []
    session(ctx).show(events_table(found) if found else "no events" + (f" since {since}" if since else ""))


@commands.command(cls=ReadCommand)
def trace(ctx: typer.Context,
          trace_id: str = typer.Argument(..., metavar="TRACE_ID", help="32 hex digits (from `meshctl traces`,"
                                         " an access log line, or a traceparent header)")) -> None:
    """One request's spans as a tree, with timings, from meshd's trace store."""
    tid = trace_id.strip().lower()
    if tid.startswith("00-") and tid.count("-") == 3:
        tid = tid.split("-")[1]  # a whole traceparent value
    if len(tid) != 32 or any(ch not in "0123456789abcdef" for ch in tid):
        raise typer.BadParameter(f"{trace_id!r} is not a trace id (32 hex digits)", param_hint="TRACE_ID")
    data = session(ctx).read(f"/v1/traces/{tid}")
    if data is not None:
        session(ctx).show(trace_tree(data))


@commands.command(cls=ReadCommand)
def traces(ctx: typer.Context,
           service: Optional[str] = typer.Option(None, "--service", help="only traces touching this service"),
           errors: bool = typer.Option(False, "--errors", help="only traces with a failed span"),
           limit: int = typer.Option(20, "--limit", help="at most this many (newest first)")) -> None:
    """Recent traces in meshd's store, newest first."""
    from urllib.parse import urlencode

    query = {"limit": str(limit)}
    if service:
        query["service"] = service
    if errors:
        query["errors"] = "1"
    data = session(ctx).read("/v1/traces?" + urlencode(query))
    if data is None:
        return
    mesh = session(ctx)
    found = data.get("traces") or []
    if not found:
        mesh.show("no traces stored yet (sampling is set by `meshctl tracing --sampling`)")
        return
    grid = Grid(f"traces ({len(found)} of {data.get('stored', 0)} stored)",
                (("time", "left"), ("trace id", "left"), ("root", "left"), ("spans", "right"),
                 ("duration", "right"), ("errors", "right")))
    for t in found:
        grid.add_row(_fmt_time(t.get("start")), t.get("trace_id"), t.get("root"), str(t.get("spans")),
                     fmt_ms(t.get("duration_ms")), str(t.get("errors")), style="red" if t.get("errors") else None)
    mesh.show(grid)


@commands.command(cls=ReadCommand)
def tracing(ctx: typer.Context,
            sampling: Optional[str] = typer.Option(None, "--sampling",
                                                   help="percent of new traces sampled, 0-100 (default 1)"),
            endpoint: Optional[str] = typer.Option(None, "--endpoint",
                                                   help="external OTLP/HTTP collector URL (Jaeger, Tempo);"
                                                        " \"\" turns it off"),
            access_log: Optional[str] = typer.Option(None, "--access-log",
                                                     help="off | errors | sampled (sampled traces and errors) | full")
            ) -> None:
    """Show or change the mesh's tracing and access-log settings (pushed to every node)."""
    mesh = session(ctx)
    change: dict = {}
    if sampling is not None:
        change["sampling"] = sampling
    if endpoint is not None:
        change["otlp_endpoint"] = endpoint or None
    if access_log is not None:
        change["access_log"] = access_log
    data = mesh.call("PUT", "/v1/telemetry/settings", change) if change else mesh.get("/v1/telemetry/settings")
    if mesh.json:
        mesh.print_json(data)
    else:
        st = data.get("settings") or {}
        typer.echo(f"sampling: {st.get('sampling'):g}%")
        typer.echo(f"otlp endpoint: {st.get('otlp_endpoint') or 'none (meshd store only)'}")
        typer.echo(f"access log: {st.get('access_log')}")
    if "version" in data:
        mesh.report_push(data["version"], wait=True)
