"""meshctl status / services: is meshd up, its nodes and their ACKs, label errors, sidecars; the mesh
services with their identities, versions and endpoints (GET /v1/status, /v1/services)."""

from __future__ import annotations

from typing import Any

import typer

from .context import Grid, Meshctl, ReadCommand, command_group, session, text

commands = command_group()


def format_uptime(seconds: Any) -> str:
    """`3725.2` -> `1h 2m 5s`."""
    try:
        total = int(float(seconds))
    except (TypeError, ValueError):
        return "?"
    days, rest = divmod(max(total, 0), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{days}d"] if days else []
    if days or hours:
        parts.append(f"{hours}h")
    if days or hours or minutes:
        parts.append(f"{minutes}m")
    parts.append(f"{secs}s")
    return " ".join(parts)


@commands.command(cls=ReadCommand)
def status(ctx: typer.Context) -> None:
    """Is meshd up; its snapshot version; nodes and their ACK/NACK; label errors; sidecars."""
    mesh = session(ctx)
    data = mesh.read("/v1/status")
    if data is not None:
        _show_status(mesh, data)


def _show_status(mesh: Meshctl, data: dict) -> None:
    from rich.text import Text

    meshd = data.get("meshd") or {}
    current = meshd.get("snapshot_version")
    header = Text()
    header.append("meshd UP", style="bold green")
    header.append(f" at {mesh.api_client().base_url}  version {text(meshd.get('version'))}"
                  f"  snapshot version {text(current)}  uptime {format_uptime(meshd.get('uptime_s'))}")
    mesh.show(header)

    nodes = data.get("nodes") or []
    if nodes:
        grid = Grid(f"nodes ({len(nodes)})", ("node", "kind", "service", "connected", "acked", "nack reason"))
        behind_count = 0
        for node in nodes:
            acked = node.get("acked_version")
            connected = bool(node.get("connected"))
            behind = isinstance(current, int) and (not isinstance(acked, int) or acked < current)
            behind_count += behind
            acked_cell = Text(text(acked))
            if behind:
                acked_cell.append(f" (behind {current})", style="bold yellow")
            nack = ""
            if node.get("nack_reason"):
                nack = f"v{text(node.get('nacked_version'))}: {node['nack_reason']}"
            grid.add_row(
                Text(text(node.get("node"))), Text(text(node.get("kind"))), Text(text(node.get("service"))),
                Text("yes", style="green") if connected else Text("no", style="bold red"),
                acked_cell, Text(nack, style="red"),
                style="yellow" if behind or not connected else None,
            )
        mesh.show(grid)
        if behind_count:
            mesh.show(Text(f"{behind_count} node(s) behind snapshot version {current}", style="yellow"))
    else:
        mesh.show("nodes: none connected")

    mtls = data.get("mtls") or {}
    if mtls:
        permissive = sorted(s for s, m in mtls.items() if m == "permissive")
        line = Text("mTLS: ")
        if permissive:
            line.append(f"PERMISSIVE for {', '.join(permissive)}", style="bold yellow")
            line.append(f"; STRICT for the other {len(mtls) - len(permissive)} service(s)")
        else:
            line.append(f"STRICT for all {len(mtls)} service(s)", style="green")
        mesh.show(line)

    label_errors = data.get("label_errors") or []
    if label_errors:
        grid = Grid(f"label errors ({len(label_errors)})", ("container", "label", "message"), title_style="bold red")
        for err in label_errors:
            grid.add_row(Text(text(err.get("container"))), Text(text(err.get("label")), style="red"),
                         Text(text(err.get("message"))))
        mesh.show(grid)
    else:
        mesh.show("label errors: none")

    _show_swarm(mesh, (data.get("swarm") or {}).get("nodes") or [])

    sidecars = data.get("sidecars") or []
    if sidecars:
        grid = Grid(f"sidecars ({len(sidecars)})", ("app", "sidecar", "state", "connected", "control error"))
        for sc in sidecars:
            state = text(sc.get("state"))
            connected = sc.get("connected")
            grid.add_row(Text(text(sc.get("app"))), Text(text(sc.get("sidecar"))),
                         Text(state, style="green" if state == "running" else "yellow"),
                         Text("yes", style="green") if connected else Text("no", style="bold red"),
                         Text(text(sc.get("control_error") or ""), style="red"))
        mesh.show(grid)
    else:
        mesh.show("sidecars: none")

    problems = data.get("problems") or []
    if problems:
        grid = Grid(f"problems ({len(problems)})", ("kind", "subject", "since", "attempts", "last error"),
                    title_style="bold red")
        for p in problems:
            grid.add_row(Text(text(p.get("kind")), style="red"), Text(text(p.get("subject"))),
                         Text(_clock(p.get("since"))), Text(text(p.get("attempts"))), Text(text(p.get("message"))))
        mesh.show(grid)
    else:
        mesh.show("problems: none")


def _show_swarm(mesh: Meshctl, nodes: list[dict]) -> None:
    """On Docker Swarm (docs/SWARM.md): per node its role, agent, gateway and sidecars."""
    from rich.text import Text

    if not nodes:
        return
    yes, no = Text("yes", style="green"), Text("no", style="bold red")
    grid = Grid(f"swarm nodes ({len(nodes)})", ("node", "role", "state", "agent", "gateway", "sidecars connected"))
    for node in nodes:
        sidecars = node.get("sidecars") or []
        up = sum(1 for sc in sidecars if sc.get("connected"))
        grid.add_row(Text(text(node.get("hostname")) + (" (leader)" if node.get("leader") else "")),
                     Text(text(node.get("role"))),
                     Text(text(node.get("state")), style="green" if node.get("state") == "ready" else "bold red"),
                     yes if node.get("agent") else no, yes if node.get("gateway_connected") else no,
                     Text(f"{up}/{len(sidecars)}", style="green" if up == len(sidecars) else "yellow"))
    mesh.show(grid)
    for node in nodes:
        for sc in node.get("sidecars") or []:
            if not sc.get("connected"):
                mesh.show(Text(f"{text(node.get('hostname'))}: sidecar of {text(sc.get('task'))} not connected",
                               style="yellow"))


def _clock(ts: Any) -> str:
    """Epoch seconds as local HH:MM:SS ('?' when not a number)."""
    import time

    try:
        return time.strftime("%H:%M:%S", time.localtime(float(ts)))
    except (TypeError, ValueError, OverflowError):
        return "?"


def _versions(svc: dict) -> str:
    versions = svc.get("versions") or {}
    return ", ".join(f"{v}: {n} instance{'s' if n != 1 else ''}" for v, n in versions.items()) or "none"


def _endpoint(ep: dict, instance_chars: int | None, gap: str = "  ") -> str:
    """`address:port  version  instance` (the instance id cut to `instance_chars`; None: whole)."""
    instance = str(ep.get("instance") or "")[:instance_chars]
    return gap.join((f"{text(ep.get('address'))}:{text(ep.get('port'))}", text(ep.get("version")), instance)).rstrip()


def _allow(svc: dict) -> str:
    allow = svc.get("allow")
    return ", ".join(allow) if allow is not None else "(no mesh.allow label)"


@commands.command(cls=ReadCommand)
def services(ctx: typer.Context) -> None:
    """The mesh services: protocol, port, identity, versions and endpoints."""
    mesh = session(ctx)
    data = mesh.read("/v1/services")
    if data is not None:
        _show_services(mesh, data.get("services") or [])


def _show_services(mesh: Meshctl, svcs: list[dict]) -> None:
    if not svcs:
        mesh.show("no mesh services")
        return
    if mesh.is_terminal():
        for svc in svcs:
            mesh.show(_service_card(svc, None if mesh.wide else 12))
        return
    # For scripts: one service per line, its endpoints in one cell (instance ids with -o wide).
    grid = Grid("", ("name", "namespace", "protocol", "port", "identity", "mtls", "allow", "versions", "endpoints"))
    for svc in svcs:
        endpoints = [_endpoint(ep, None if mesh.wide else 0, " ") for ep in svc.get("endpoints") or []]
        grid.add_row(text(svc.get("name")), text(svc.get("namespace")), text(svc.get("protocol")),
                     text(svc.get("port")), text(svc.get("identity")), svc.get("mtls") or "strict", _allow(svc),
                     _versions(svc), ", ".join(endpoints))
    mesh.show(grid)


def _service_card(svc: dict, instance_chars: int | None) -> Grid:
    """On a terminal: a two-column card per service."""
    from rich.text import Text

    mtls = svc.get("mtls") or "strict"
    endpoints = [_endpoint(ep, instance_chars) for ep in svc.get("endpoints") or []]
    fields = (("protocol", Text(text(svc.get("protocol")))), ("port", Text(text(svc.get("port")))),
              ("identity", Text(text(svc.get("identity")))),
              ("mtls", Text(mtls.upper(), style="yellow" if mtls == "permissive" else "green")),
              ("allow", Text(_allow(svc))), ("versions", Text(_versions(svc))),
              ("endpoints", Text("\n".join(endpoints)) if endpoints
               else Text("none (no instance announced)", style="yellow")))
    grid = Grid(f"{text(svc.get('name'))} (namespace {text(svc.get('namespace'))})", ("field", "value"),
                title_style="bold", show_header=False)
    for name, value in fields:
        grid.add_row(Text(name, style="dim"), value)
    return grid
