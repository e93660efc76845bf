"""meshctl analyze: check a compose file's mesh labels with the pure core, without running anything."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .compose import ComposeError, containers_from_compose, project_name, read_compose_file
from .context import command_group

commands = command_group()


def analyze_containers(containers, trust_domain: str):
    """Decode and cross-check compose containers with the pure core; (workloads, config, errors)."""
    from meshcore.snapshot import build_config, build_workloads

    workloads = build_workloads(containers)
    config, errors = build_config(workloads, [], trust_domain)
    return workloads, config, errors


@commands.command()
def analyze(
    file: Path = typer.Argument(..., help="a compose file (YAML); nothing is run"),
    project: Optional[str] = typer.Option(
        None, "--project", "-p", help="compose project name (default: top-level name: or the file's directory)"),
    trust_domain: str = typer.Option("mesh.local", "--trust-domain", help="SPIFFE trust domain"),
    egress: str = typer.Option("allow-any", "--egress", envvar="MESH_EGRESS",
                               help="meshd's egress mode (MESH_EGRESS): allow-any or registry-only"),
) -> None:
    """Check the mesh labels of every `mesh.enable` service of a compose file, without running anything."""
    from meshcore.egress import EgressError, decode_egress_mode, egress_findings
    from meshcore.labels import LABEL_PREFIX, is_mesh_enabled

    try:
        egress_mode = decode_egress_mode(egress)
    except EgressError as exc:
        typer.echo(f"error: --egress: {exc}", err=True)
        raise typer.Exit(2)

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
    typer.echo(f"  egress: {egress_mode}")
    for name, svc in config.services.items():
        if svc.egress:
            typer.echo(f"    {name} may call {', '.join(svc.egress)}")
    for finding in egress_findings(egress_mode, {n: s.egress for n, s in config.services.items()}):
        typer.echo(f"note: {finding}")
