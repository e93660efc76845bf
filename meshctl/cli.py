"""meshctl: look at a running mesh through meshd's admin API, or check a compose file's mesh labels.

Heavy modules (rich tables, yaml, urllib, the mesh core) are imported inside the commands so that
`meshctl --help` starts fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from .api import API_ENV, DEFAULT_API, DEFAULT_TIMEOUT

app = typer.Typer(
    name="meshctl",
    help="Inspect a meshd service mesh (status, services) and check compose files (analyze).",
    no_args_is_help=True,
    add_completion=False,
)

API_HELP = f"meshd admin API base URL (default {DEFAULT_API}, or ${API_ENV})"


@app.callback()
def _root(
    ctx: typer.Context,
    api: Optional[str] = typer.Option(None, "--api", envvar=API_ENV, help=API_HELP, show_default=False),
    timeout: float = typer.Option(DEFAULT_TIMEOUT, "--timeout", help="seconds to wait for meshd"),
    token_file: Optional[str] = typer.Option(
        None, "--token-file", envvar="MESHD_ADMIN_TOKEN_FILE", show_default=False,
        help="meshd's admin token file (<state dir>/admin.token); or set MESHD_ADMIN_TOKEN"),
) -> None:
    ctx.obj = {"api": api, "timeout": timeout, "token_file": token_file}


# ---- helpers ---------------------------------------------------------------------------------

def _client(ctx: typer.Context, api: Optional[str]):
    from .api import MeshdClient

    obj = ctx.obj or {}
    return MeshdClient(api or obj.get("api"), timeout=obj.get("timeout", DEFAULT_TIMEOUT),
                       token_file=obj.get("token_file"))


def _fetch(client, method: str) -> dict[str, Any]:
    """Call one of the client's getters; on failure print a clear message and exit 1."""
    return _guarded(getattr(client, method))


def api_call(client, method: str, path: str, body: dict | None = None) -> Any:
    """One admin API call; on failure print meshd's own explanation and exit 1."""
    return _guarded(lambda: client.request(method, path, body))


def _guarded(call) -> Any:
    from .api import MeshdApiError, MeshdUnreachable

    try:
        return call()
    except MeshdUnreachable as exc:
        typer.echo(f"meshd is DOWN: not reachable at {exc.url} ({exc.reason}).", err=True)
        typer.echo(f"Is meshd running? Point meshctl at it with --api URL or ${API_ENV}.", err=True)
        raise typer.Exit(1)
    except MeshdApiError as exc:
        typer.echo(f"error: {exc.error or exc}", err=True)
        raise typer.Exit(1)


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2))


def _console():
    from rich.console import Console

    return Console(highlight=False)


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


def _text(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


# ---- status ----------------------------------------------------------------------------------

@app.command()
def status(
    ctx: typer.Context,
    api: Optional[str] = typer.Option(None, "--api", help=API_HELP, show_default=False),
    as_json: bool = typer.Option(False, "--json", help="print the raw JSON of GET /v1/status"),
) -> None:
    """Is meshd up; its snapshot version; nodes and their ACK/NACK; label errors; sidecars."""
    client = _client(ctx, api)
    data = _fetch(client, "status")
    if as_json:
        _print_json(data)
        return
    from rich.table import Table
    from rich.text import Text

    console = _console()
    meshd = data.get("meshd") or {}
    current = meshd.get("snapshot_version")
    header = Text()
    header.append("meshd UP", style="bold green")
    header.append(f" at {client.base_url}  version {_text(meshd.get('version'))}"
                  f"  snapshot version {_text(current)}  uptime {format_uptime(meshd.get('uptime_s'))}")
    console.print(header)

    nodes = data.get("nodes") or []
    if nodes:
        table = Table(title=f"nodes ({len(nodes)})", title_justify="left")
        for col in ("node", "kind", "service", "connected", "acked", "nack reason"):
            table.add_column(col, overflow="fold")
        behind_count = 0
        for node in nodes:
            acked = node.get("acked_version")
            connected = bool(node.get("connected"))
            behind = isinstance(current, int) and (not isinstance(acked, int) or acked < current)
            behind_count += behind
            acked_cell = Text(_text(acked))
            if behind:
                acked_cell.append(f" (behind {current})", style="bold yellow")
            nack = ""
            if node.get("nack_reason"):
                nack = f"v{_text(node.get('nacked_version'))}: {node['nack_reason']}"
            table.add_row(
                Text(_text(node.get("node"))), Text(_text(node.get("kind"))), Text(_text(node.get("service"))),
                Text("yes", style="green") if connected else Text("no", style="bold red"),
                acked_cell, Text(nack, style="red"),
                style="yellow" if behind or not connected else None,
            )
        console.print(table)
        if behind_count:
            console.print(Text(f"{behind_count} node(s) behind snapshot version {current}", style="yellow"))
    else:
        console.print("nodes: none connected")

    mtls = data.get("mtls") or {}
    if mtls:
        permissive = sorted(s for s, m in mtls.items() if m == "permissive")
        line = Text("mTLS: ")
        if permissive:
            line.append(f"PERMISSIVE for {', '.join(permissive)}", style="bold yellow")
            line.append(f"; STRICT for the other {len(mtls) - len(permissive)} service(s)")
        else:
            line.append(f"STRICT for all {len(mtls)} service(s)", style="green")
        console.print(line)

    label_errors = data.get("label_errors") or []
    if label_errors:
        table = Table(title=f"label errors ({len(label_errors)})", title_justify="left", title_style="bold red")
        for col in ("container", "label", "message"):
            table.add_column(col, overflow="fold")
        for err in label_errors:
            table.add_row(Text(_text(err.get("container"))), Text(_text(err.get("label")), style="red"),
                          Text(_text(err.get("message"))))
        console.print(table)
    else:
        console.print("label errors: none")

    sidecars = data.get("sidecars") or []
    if sidecars:
        table = Table(title=f"sidecars ({len(sidecars)})", title_justify="left")
        for col in ("app", "sidecar", "state"):
            table.add_column(col, overflow="fold")
        for sc in sidecars:
            state = _text(sc.get("state"))
            table.add_row(Text(_text(sc.get("app"))), Text(_text(sc.get("sidecar"))),
                          Text(state, style="green" if state == "running" else "yellow"))
        console.print(table)
    else:
        console.print("sidecars: none")


# ---- services --------------------------------------------------------------------------------

@app.command()
def services(
    ctx: typer.Context,
    api: Optional[str] = typer.Option(None, "--api", help=API_HELP, show_default=False),
    as_json: bool = typer.Option(False, "--json", help="print the raw JSON of GET /v1/services"),
) -> None:
    """The mesh services: protocol, port, identity, versions and endpoints."""
    client = _client(ctx, api)
    data = _fetch(client, "services")
    if as_json:
        _print_json(data)
        return
    from rich.table import Table
    from rich.text import Text

    console = _console()
    svcs = data.get("services") or []
    if not svcs:
        console.print("no mesh services")
        return
    for svc in svcs:
        table = Table(title=f"{_text(svc.get('name'))} (namespace {_text(svc.get('namespace'))})",
                      title_justify="left", title_style="bold", show_header=False)
        table.add_column("field", style="dim", no_wrap=True)
        table.add_column("value", overflow="fold")
        versions = svc.get("versions") or {}
        version_text = ", ".join(f"{v}: {n} instance{'s' if n != 1 else ''}" for v, n in versions.items())
        endpoints = svc.get("endpoints") or []
        ep_lines = [f"{_text(ep.get('address'))}:{_text(ep.get('port'))}  {_text(ep.get('version'))}"
                    f"  {str(ep.get('instance') or '')[:12]}".rstrip() for ep in endpoints]
        table.add_row("protocol", Text(_text(svc.get("protocol"))))
        table.add_row("port", Text(_text(svc.get("port"))))
        table.add_row("identity", Text(_text(svc.get("identity"))))
        mtls = svc.get("mtls") or "strict"
        table.add_row("mtls", Text(mtls.upper(), style="yellow" if mtls == "permissive" else "green"))
        allow = svc.get("allow")
        table.add_row("allow", Text(", ".join(allow) if allow is not None else "(no mesh.allow label)"))
        table.add_row("versions", Text(version_text or "none"))
        table.add_row("endpoints", Text("\n".join(ep_lines)) if ep_lines else Text("none (no instance announced)",
                                                                                   style="yellow"))
        console.print(table)


# ---- analyze ---------------------------------------------------------------------------------

def analyze_containers(containers, trust_domain: str):
    """Decode and cross-check compose containers with the pure core; (workloads, config, errors)."""
    from meshcore.snapshot import build_config, build_workloads

    workloads = build_workloads(containers)
    config, errors = build_config(workloads, [], trust_domain)
    return workloads, config, errors


@app.command()
def analyze(
    file: Path = typer.Argument(..., help="a compose file (YAML); nothing is run"),
    project: Optional[str] = typer.Option(None, "--project", "-p",
                                          help="compose project name (default: top-level name: or the file's directory)"),
    trust_domain: str = typer.Option("mesh.local", "--trust-domain", help="SPIFFE trust domain"),
) -> None:
    """Check the mesh labels of every `mesh.enable` service of a compose file, without running anything."""
    from meshcore.labels import LABEL_PREFIX, is_mesh_enabled

    from .compose import ComposeError, containers_from_compose, project_name, read_compose_file

    try:
        doc = read_compose_file(file)
        proj = project_name(file, doc, project)
        containers = containers_from_compose(doc, proj)
    except ComposeError as exc:
        typer.echo(f"error: {file}: {exc}" if str(file) not in str(exc) else f"error: {exc}", err=True)
        raise typer.Exit(2)

    workloads, config, errors = analyze_containers(containers, trust_domain)
    for info in containers:
        stray = sorted(k for k in info.labels if k.startswith(LABEL_PREFIX) and k != "mesh.enable")
        if stray and not is_mesh_enabled(info.labels):
            typer.echo(f"note: service {info.name}: has {', '.join(stray)} but mesh.enable is not true; not meshed")

    if errors:
        typer.echo(f"{file}: {len(errors)} mesh label error{'s' if len(errors) != 1 else ''} (project {proj}):")
        for err in errors:
            typer.echo(f"  service {err.container}: label {err.label}: {err.message}")
            if err.label == "mesh.port" and "required" in err.message:
                typer.echo("    (analyze sees only expose: and ports: of the compose file, not the image's EXPOSE)")
        raise typer.Exit(1)

    meshed = [wl for wl in workloads if wl.spec is not None]
    if not meshed:
        typer.echo(f"OK: {file}: no service has mesh.enable=true (project {proj})")
        return
    versions: dict[str, list[str]] = {}
    for wl in meshed:
        vs = versions.setdefault(wl.spec.service, [])
        if wl.spec.version not in vs:
            vs.append(wl.spec.version)
    typer.echo(f"OK: {file}: {len(meshed)} meshed compose service{'s' if len(meshed) != 1 else ''}, "
               f"{len(config.services)} mesh service{'s' if len(config.services) != 1 else ''} (project {proj})")
    for name, svc in config.services.items():
        alias = f", aliases {', '.join(svc.aliases)}" if svc.aliases else ""
        typer.echo(f"  {name}: {svc.protocol} port {svc.port}, versions {', '.join(sorted(versions.get(name, [])))}"
                   f"{alias}")
    if config.gateway_routes:
        typer.echo(f"  gateway routes ({len(config.gateway_routes)}):")
        for route in config.gateway_routes:
            where = f"{route.host or '*'}{route.path or ''}"
            strip = " (strip prefix)" if route.strip_prefix else ""
            typer.echo(f"    {where} -> {route.service}{strip}")
    else:
        typer.echo("  gateway routes: none")


from . import traffic  # noqa: E402 - the traffic commands register themselves on `app`

traffic.register(app)

from . import security  # noqa: E402 - `certs` and `policy` register themselves on `app`

security.register(app)

from . import observe  # noqa: E402 - stat, top, compare, events, dashboard

observe.register(app)


def main() -> None:
    """Console script entry point `meshctl`."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
