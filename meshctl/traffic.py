"""meshctl split / route / fault / mirror: live traffic rules, validated by meshd and pushed to
every sidecar; each change waits for the sidecars' ACKs and says how long they took."""

from __future__ import annotations

from typing import Any, List, Optional

import typer

from .context import ReadCommand, command_group, session

commands = command_group()


def describe_rules(rules: dict[str, Any]) -> list[str]:
    """Readable lines for one service's rules (wire form)."""
    lines = []
    for i, r in enumerate(rules.get("routes") or [], 1):
        match = [f"{k}={v}" for k, v in r.get("match_headers") or []]
        if r.get("path_prefix"):
            match.append(f"path {r['path_prefix']}*")
        lines.append(f"  route {i}: {' and '.join(match) or 'every request'} -> {r['to_version']}")
    split = rules.get("split")
    if split:
        lines.append("  split: " + " ".join(f"{v}={w}" for v, w in split["weights"]))
    else:
        lines.append("  split: none (any version)")
    fault = rules.get("fault")
    if fault:
        parts = []
        if fault.get("abort_percent"):
            parts.append(f"abort {fault['abort_percent']:g}% with {fault['abort_status']}")
        if fault.get("delay_percent"):
            parts.append(f"delay {fault['delay_percent']:g}% by {fault['delay_s']:g}s")
        lines.append("  fault: " + ", ".join(parts))
    mirror = rules.get("mirror")
    if mirror:
        lines.append(f"  mirror: {mirror['percent']:g}% to {mirror['to_version']}")
    return lines


def _change(ctx: typer.Context, service: str, kind: str, body: dict, wait: bool) -> None:
    """POST one rule change; print the service's rules now (or, -o json, meshd's answer) and the ACKs."""
    mesh = session(ctx)
    answer = mesh.call("POST", f"/v1/rules/{service}/{kind}", body)
    version = answer["version"]
    if mesh.json:
        mesh.print_json(answer)
    else:
        typer.echo(f"{service}: rules now (snapshot version {version}):")
        for line in describe_rules(answer["rules"]):
            typer.echo(line)
    mesh.report_push(version, wait)


WAIT = typer.Option(True, "--wait/--no-wait", help="wait for every connected sidecar to ACK the change")


@commands.command(cls=ReadCommand)
def split(ctx: typer.Context, service: str = typer.Argument(..., help="mesh service"),
          weights: List[str] = typer.Argument(None, help="VERSION=WEIGHT ..., summing to 100"),
          clear: bool = typer.Option(False, "--clear", help="remove the split (any version again)"),
          wait: bool = WAIT) -> None:
    """Split a service's traffic between versions, e.g. `meshctl split catalog v1=90 v2=10`."""
    from meshcore.routing_rules import parse_split_args

    if clear:
        return _change(ctx, service, "split-clear", {}, wait)
    if not weights:
        typer.echo("error: give weights like v1=90 v2=10, or --clear", err=True)
        raise typer.Exit(2)
    try:
        pairs = parse_split_args(weights)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    _change(ctx, service, "split", {"weights": dict(pairs)}, wait)


@commands.command(cls=ReadCommand)
def route(ctx: typer.Context, service: str = typer.Argument(..., help="mesh service"),
          to: Optional[str] = typer.Option(None, "--to", help="version that matching requests go to"),
          header: List[str] = typer.Option([], "--header", help="NAME=VALUE a request must carry (repeatable)"),
          path_prefix: Optional[str] = typer.Option(None, "--path-prefix", help="path prefix to match"),
          clear: bool = typer.Option(False, "--clear", help="remove every route rule of the service"),
          wait: bool = WAIT) -> None:
    """Add an ordered route rule (first match wins, the split applies after), show or clear them."""
    if clear:
        return _change(ctx, service, "route-clear", {}, wait)
    if to is None:
        if header or path_prefix:
            typer.echo("error: --header/--path-prefix need --to VERSION", err=True)
            raise typer.Exit(2)
        mesh = session(ctx)
        answer = mesh.get(f"/v1/rules/{service}")
        if mesh.json:
            mesh.print_json(answer)
            return
        typer.echo(f"{service}:")
        for line in describe_rules(answer["rules"]):
            typer.echo(line)
        return
    headers = {}
    for item in header:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            typer.echo(f"error: --header {item!r}: expected NAME=VALUE", err=True)
            raise typer.Exit(2)
        headers[name.strip()] = value
    _change(ctx, service, "route", {"to": to, "headers": headers, "path_prefix": path_prefix}, wait)


@commands.command(cls=ReadCommand)
def fault(ctx: typer.Context, service: str = typer.Argument(..., help="mesh service"),
          abort: Optional[str] = typer.Option(None, "--abort", help="PERCENT[:STATUS], e.g. 50:503"),
          delay: Optional[str] = typer.Option(None, "--delay", help="PERCENT:DURATION, e.g. 10:1s"),
          clear: bool = typer.Option(False, "--clear", help="remove fault injection"),
          wait: bool = WAIT) -> None:
    """Inject faults into calls to a service (applied by every caller's sidecar)."""
    if clear:
        return _change(ctx, service, "fault-clear", {}, wait)
    if abort is not None and ":" not in abort:
        abort = f"{abort}:503"
    _change(ctx, service, "fault", {"abort": abort, "delay": delay}, wait)


@commands.command(cls=ReadCommand)
def mirror(ctx: typer.Context, service: str = typer.Argument(..., help="mesh service"),
           to: Optional[str] = typer.Option(None, "--to", help="version that gets the copies"),
           percent: float = typer.Option(100.0, "--percent", help="share of requests copied"),
           clear: bool = typer.Option(False, "--clear", help="stop mirroring"),
           wait: bool = WAIT) -> None:
    """Copy a share of a service's traffic to a version (responses discarded)."""
    if clear:
        return _change(ctx, service, "mirror-clear", {}, wait)
    if to is None:
        typer.echo("error: give --to VERSION, or --clear", err=True)
        raise typer.Exit(2)
    _change(ctx, service, "mirror", {"to": to, "percent": percent}, wait)
