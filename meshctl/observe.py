"""meshctl stat / top / compare / events / dashboard / trace / traces / tracing: the mesh's live RED
figures, canary verdicts and events, from meshd's telemetry (GET /v1/stat, /v1/compare, /v1/events),
the dashboard's URL, and traces from meshd's trace store (GET /v1/traces) with their settings."""

from __future__ import annotations

import time
from typing import Any, Optional

import typer

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


def stat_tables(data: dict) -> list:
    """Rich renderables for a /v1/stat body: per service and version, then per edge."""
    from rich.table import Table
    from rich.text import Text

    tight = {t["service"]: t.get("adaptive") for t in data.get("totals") or []
             if (t.get("adaptive") or {}).get("mode") == "tight"}
    targets = data.get("targets") or {}
    table = Table(title=f"services (last {data.get('window_s', 60):g} s, {targets.get('up', 0)}/"
                        f"{targets.get('total', 0)} nodes scraped)", title_justify="left")
    for col, justify in (("service", "left"), ("version", "left"), ("RPS", "right"), ("success", "right"),
                         ("p50", "right"), ("p90", "right"), ("p99", "right"), ("requests", "right")):
        table.add_column(col, justify=justify, overflow="fold")
    for r in data.get("services") or []:
        name = Text(str(r.get("service")))
        if r.get("service") in tight:
            name.append(" (tightened)", style="yellow")
        table.add_row(name, Text(str(r.get("version"))), fmt_rps(r.get("rps")), fmt_pct(r.get("success_rate")),
                      fmt_ms(r.get("p50_ms")), fmt_ms(r.get("p90_ms")), fmt_ms(r.get("p99_ms")),
                      str(r.get("requests", 0)), style=_style(r))
    out = [table]
    edges = data.get("edges") or []
    if edges:
        et = Table(title="calls (source -> destination)", title_justify="left")
        for col, justify in (("source", "left"), ("destination", "left"), ("RPS", "right"), ("success", "right"),
                             ("p99", "right")):
            et.add_column(col, justify=justify, overflow="fold")
        for e in edges:
            et.add_row(Text(str(e.get("source"))), Text(str(e.get("destination"))), fmt_rps(e.get("rps")),
                       fmt_pct(e.get("success_rate")), fmt_ms(e.get("p99_ms")), style=_style(e))
        out.append(et)
    return out


def _fmt_time(ts: Any) -> str:
    try:
        return time.strftime("%H:%M:%S", time.localtime(float(ts)))
    except (TypeError, ValueError):
        return "?"


def events_table(events: list[dict], title: str = "events"):
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"{title} ({len(events)})", title_justify="left")
    for col in ("time", "kind", "service", "message"):
        table.add_column(col, overflow="fold")
    for e in events:
        bad = any(w in str(e.get("kind")) for w in ("spike", "jump", "nack", "tighten", "ejection", "expiry"))
        table.add_row(_fmt_time(e.get("ts")), Text(str(e.get("kind")), style="red" if bad else "green"),
                      Text(" ".join(x for x in (e.get("service"), e.get("version")) if x) or "-"),
                      Text(str(e.get("message"))))
    return table


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


def register(app: typer.Typer) -> None:
    """Add the observability commands to meshctl."""
    from .cli import API_HELP

    def client(ctx: typer.Context, api: Optional[str]):
        from .cli import _client

        return _client(ctx, api)

    def call(c, path: str) -> Any:
        from .traffic import _call

        return _call(c, "GET", path)

    def fetch(ctx: typer.Context, api: Optional[str], path: str, as_json: bool) -> dict | None:
        """GET `path`; with --json print it and answer None (the command is done)."""
        data = call(client(ctx, api), path)
        if not as_json:
            return data
        from .cli import _print_json

        _print_json(data)
        return None

    def stat_path(window: float) -> str:
        return f"/v1/stat?window={window:g}"

    @app.command()
    def stat(ctx: typer.Context,
             api: Optional[str] = typer.Option(None, "--api", help=API_HELP, show_default=False),
             window: float = WINDOW,
             as_json: bool = typer.Option(False, "--json", help="print the raw JSON of GET /v1/stat")) -> None:
        """Requests/s, success rate and p50/p90/p99 per service and version (and per call edge)."""
        data = fetch(ctx, api, stat_path(window), as_json)
        if data is None:
            return
        from .cli import _console

        console = _console()
        if not data.get("services"):
            console.print("no traffic seen yet (meshd scrapes every sidecar's /metrics every 2 s)")
            return
        for table in stat_tables(data):
            console.print(table)

    @app.command()
    def top(ctx: typer.Context,
            api: Optional[str] = typer.Option(None, "--api", help=API_HELP, show_default=False),
            window: float = typer.Option(10.0, "--window", "-w", help="seconds of history (1..300)"),
            interval: float = typer.Option(1.0, "--interval", help="seconds between refreshes"),
            once: bool = typer.Option(False, "--once", help="print one frame and exit")) -> None:
        """A live view of the mesh (refreshes every second until Ctrl-C)."""
        from rich.console import Group
        from rich.text import Text

        from .cli import _console

        c = client(ctx, api)

        def frame():
            data = call(c, stat_path(window))
            events = call(c, "/v1/events?since=15m&limit=8").get("events") or []
            parts: list = [Text(f"meshctl top  {c.base_url}  {time.strftime('%H:%M:%S')}  (Ctrl-C to quit)",
                                style="bold")]
            parts += stat_tables(data)
            if events:
                parts.append(events_table(list(reversed(events)), "recent events"))
            return Group(*parts)

        console = _console()
        if once:
            console.print(frame())
            return
        from rich.live import Live

        try:
            with Live(frame(), console=console, refresh_per_second=4, screen=False) as live:
                while True:
                    time.sleep(max(0.2, interval))
                    live.update(frame())
        except KeyboardInterrupt:
            pass

    @app.command()
    def compare(ctx: typer.Context,
                service: str = typer.Argument(..., metavar="SERVICE", help="mesh service"),
                a: str = typer.Argument(..., metavar="V1", help="baseline version, e.g. v1"),
                b: str = typer.Argument(..., metavar="V2", help="candidate version, e.g. v2"),
                api: Optional[str] = typer.Option(None, "--api", help=API_HELP, show_default=False),
                window: float = WINDOW,
                as_json: bool = typer.Option(False, "--json", help="print the raw JSON of GET /v1/compare")) -> None:
        """Two versions of a service side by side (success, latency) and a verdict line."""
        from urllib.parse import urlencode

        data = fetch(ctx, api, "/v1/compare?" + urlencode({"service": service, "a": a, "b": b,
                                                          "window": f"{window:g}"}), as_json)
        if data is None:
            return
        from rich.table import Table
        from rich.text import Text

        from .cli import _console

        console = _console()
        left, right = data.get("a") or {}, data.get("b") or {}
        table = Table(title=f"{service}: {a} vs {b} (last {data.get('window_s', window):g} s)", title_justify="left")
        table.add_column("")
        table.add_column(a, justify="right")
        table.add_column(b, justify="right")
        for name, key, fmt in (("requests", "requests", str), ("RPS", "rps", fmt_rps),
                               ("success", "success_rate", fmt_pct), ("p50", "p50_ms", fmt_ms),
                               ("p90", "p90_ms", fmt_ms), ("p99", "p99_ms", fmt_ms)):
            table.add_row(name, fmt(left.get(key)), fmt(right.get(key)))
        console.print(table)
        console.print(Text(f"verdict: {data.get('verdict')}",
                           style="bold red" if data.get("significant") else "green"))

    @app.command()
    def dashboard(ctx: typer.Context,
                  api: Optional[str] = typer.Option(None, "--api", help=API_HELP, show_default=False)) -> None:
        """Print the dashboard's URL (meshd's admin port, local only), with the admin token in its fragment."""
        c = client(ctx, api)
        call(c, "/v1/stat?window=10")  # meshd is up and the token is accepted
        url = f"{c.base_url}/dashboard"
        if getattr(c, "token", None):
            from urllib.parse import quote

            url += "#token=" + quote(c.token, safe="")
        typer.echo(url)

    @app.command()
    def events(ctx: typer.Context,
               api: Optional[str] = typer.Option(None, "--api", help=API_HELP, show_default=False),
               since: Optional[str] = typer.Option(None, "--since",
                                                   help="a duration back from now (10m, 1h) or epoch seconds"),
               limit: int = typer.Option(100, "--limit", help="at most this many (the newest)"),
               as_json: bool = typer.Option(False, "--json", help="print the raw JSON of GET /v1/events")) -> None:
        """Mesh events: error spikes, latency jumps, ejections, NACKs, adaptive policy changes."""
        from urllib.parse import urlencode

        query = {"limit": str(limit)}
        if since:
            query["since"] = since
        data = fetch(ctx, api, "/v1/events?" + urlencode(query), as_json)
        if data is None:
            return
        from .cli import _console

        console = _console()
        found = data.get("events") or []
        if not found:
            console.print("no events" + (f" since {since}" if since else ""))
            return
        console.print(events_table(found))

    @app.command()
    def trace(ctx: typer.Context,
              trace_id: str = typer.Argument(..., metavar="TRACE_ID", help="32 hex digits (from `meshctl traces`,"
                                             " an access log line, or a traceparent header)"),
              api: Optional[str] = typer.Option(None, "--api", help=API_HELP, show_default=False),
              as_json: bool = typer.Option(False, "--json", help="print the raw JSON of GET /v1/traces/ID")) -> None:
        """One request's spans as a tree, with timings, from meshd's trace store."""
        tid = trace_id.strip().lower()
        if tid.startswith("00-") and tid.count("-") == 3:
            tid = tid.split("-")[1]  # a whole traceparent value
        if len(tid) != 32 or any(ch not in "0123456789abcdef" for ch in tid):
            raise typer.BadParameter(f"{trace_id!r} is not a trace id (32 hex digits)", param_hint="TRACE_ID")
        data = fetch(ctx, api, f"/v1/traces/{tid}", as_json)
        if data is None:
            return
        from .cli import _console

        _console().print(trace_tree(data))

    @app.command()
    def traces(ctx: typer.Context,
               api: Optional[str] = typer.Option(None, "--api", help=API_HELP, show_default=False),
               service: Optional[str] = typer.Option(None, "--service", help="only traces touching this service"),
               errors: bool = typer.Option(False, "--errors", help="only traces with a failed span"),
               limit: int = typer.Option(20, "--limit", help="at most this many (newest first)"),
               as_json: bool = typer.Option(False, "--json", help="print the raw JSON of GET /v1/traces")) -> None:
        """Recent traces in meshd's store, newest first."""
        from urllib.parse import urlencode

        query = {"limit": str(limit)}
        if service:
            query["service"] = service
        if errors:
            query["errors"] = "1"
        data = fetch(ctx, api, "/v1/traces?" + urlencode(query), as_json)
        if data is None:
            return
        from rich.table import Table

        from .cli import _console

        console = _console()
        found = data.get("traces") or []
        if not found:
            console.print("no traces stored yet (sampling is set by `meshctl tracing --sampling`)")
            return
        table = Table(title=f"traces ({len(found)} of {data.get('stored', 0)} stored)", title_justify="left")
        for col, justify in (("time", "left"), ("trace id", "left"), ("root", "left"), ("spans", "right"),
                             ("duration", "right"), ("errors", "right")):
            table.add_column(col, justify=justify, overflow="fold")
        for t in found:
            table.add_row(_fmt_time(t.get("start")), t.get("trace_id"), t.get("root"), str(t.get("spans")),
                          fmt_ms(t.get("duration_ms")), str(t.get("errors")),
                          style="red" if t.get("errors") else None)
        console.print(table)

    @app.command()
    def tracing(ctx: typer.Context,
                api: Optional[str] = typer.Option(None, "--api", help=API_HELP, show_default=False),
                sampling: Optional[str] = typer.Option(None, "--sampling",
                                                       help="percent of new traces sampled, 0-100 (default 1)"),
                endpoint: Optional[str] = typer.Option(None, "--endpoint",
                                                       help="external OTLP/HTTP collector URL (Jaeger, Tempo);"
                                                            " \"\" turns it off"),
                access_log: Optional[str] = typer.Option(None, "--access-log",
                                                         help="off | errors | sampled (sampled traces and errors) | full")) -> None:
        """Show or change the mesh's tracing and access-log settings (pushed to every node)."""
        c = client(ctx, api)
        change: dict = {}
        if sampling is not None:
            change["sampling"] = sampling
        if endpoint is not None:
            change["otlp_endpoint"] = endpoint or None
        if access_log is not None:
            change["access_log"] = access_log
        if change:
            from .traffic import _call

            data = _call(c, "PUT", "/v1/telemetry/settings", change)
        else:
            data = call(c, "/v1/telemetry/settings")
        st = data.get("settings") or {}
        typer.echo(f"sampling: {st.get('sampling'):g}%")
        typer.echo(f"otlp endpoint: {st.get('otlp_endpoint') or 'none (meshd store only)'}")
        typer.echo(f"access log: {st.get('access_log')}")
        if "version" in data:
            from .traffic import report_push

            report_push(c, data["version"], wait=True)
