"""meshctl certs / policy: workload certificates, rotations, and authorization policies."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any, Optional

import typer

from .context import ApiCommand, ApiGroup, Grid, ReadCommand, ReadGroup, session

ROTATION_TIMEOUT_S = 180.0


def _when(ts: Any) -> str:
    if not isinstance(ts, (int, float)):
        return "-"
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _in(ts: Any, now: float) -> str:
    if not isinstance(ts, (int, float)):
        return ""
    d = ts - now
    sign = "in " if d >= 0 else ""
    d = abs(d)
    text = f"{d:.0f}s" if d < 120 else (f"{d / 60:.0f}m" if d < 7200 else f"{d / 3600:.1f}h")
    return f" ({sign}{text}{' ago' if ts < now else ''})"


certs = typer.Typer(help="Workload certificates (SPIFFE identities) issued by meshd; rotations.", cls=ReadGroup,
                    no_args_is_help=False, invoke_without_command=True, add_completion=False)
policy = typer.Typer(help="Authorization policies, decided by each destination's inbound sidecar on the caller's "
                          "verified identity.", cls=ApiGroup, no_args_is_help=True, add_completion=False)


@certs.callback()
def list_certs(ctx: typer.Context) -> None:
    """List each identity: node, SPIFFE ID, serial, issuer, not_after, renew_at."""
    if ctx.invoked_subcommand is not None:
        return
    mesh = session(ctx)
    data = mesh.read("/v1/certs")
    if data is None:
        return
    now = time.time()
    typer.echo(f"trust domain {data.get('trust_domain')}  leaf TTL {data.get('cert_ttl_s')}s  "
               f"signing CA {data.get('signing')}  bundle v{data.get('bundle_version')}"
               + ("  (user-supplied CA)" if data.get("user_supplied_ca") else ""))
    for root in data.get("roots") or []:
        typer.echo(f"  root {root.get('name')}  serial {root.get('serial')}  not_after {_when(root.get('not_after'))}")
    identities = data.get("identities") or []
    grid = Grid(f"identities ({len(identities)})",
                ("node", "SPIFFE ID", "serial", "issuer", "not_after", "renew_at", "renewals", "connected"))
    serial_chars = None if mesh.wide else 16
    for ident in identities:
        grid.add_row(str(ident.get("node")), str(ident.get("identity")), str(ident.get("serial"))[:serial_chars],
                     str(ident.get("issuer")), _when(ident.get("not_after")) + _in(ident.get("not_after"), now)
                     + (" EXPIRED" if ident.get("expired") else ""),
                     _when(ident.get("renew_at")) + _in(ident.get("renew_at"), now),
                     str(ident.get("renewals")), "yes" if ident.get("connected") else "no")
    mesh.show(grid)
    rot = data.get("rotation")
    if rot:
        typer.echo(f"last rotation: {rot.get('kind')} {rot.get('state')} (step {rot.get('step')})"
                   + (f": {rot.get('error')}" if rot.get("error") else ""))


@certs.command("rotate", cls=ApiCommand)
def rotate(ctx: typer.Context,
           root: bool = typer.Option(False, "--root", help="rotate the root CA: bundle old+new, re-issue "
                                                           "every leaf, then retire the old root"),
           no_wait: bool = typer.Option(False, "--no-wait", help="start it and return")) -> None:
    """Renew every node's certificate now, or (--root) rotate the root CA without downtime."""
    mesh = session(ctx)
    rot = mesh.call("POST", "/v1/certs/rotate", {"root": root})
    typer.echo(f"{rot['kind']} rotation started")
    if no_wait:
        return
    seen = 0
    deadline = time.monotonic() + ROTATION_TIMEOUT_S
    while True:
        rot = mesh.get("/v1/certs/rotation")
        for entry in rot.get("log", [])[seen:]:
            typer.echo(f"  {entry.get('step')}: {entry.get('detail') or ''}".rstrip(": "))
        seen = len(rot.get("log", []))
        if rot.get("state") != "running":
            break
        if time.monotonic() > deadline:
            typer.echo("still running; see `meshctl certs`", err=True)
            raise typer.Exit(1)
        time.sleep(0.2)
    took = (rot.get("finished_at") or time.time()) - rot.get("started_at", time.time())
    if rot.get("state") == "done":
        typer.echo(f"done in {took:.1f}s: {rot.get('renewed')} node(s) renewed"
                   + (f", root {rot.get('old_root')} -> {rot.get('new_root')}" if rot.get("kind") == "root" else ""))
    else:
        typer.echo(f"FAILED after {took:.1f}s: {rot.get('error')}", err=True)
        raise typer.Exit(1)


def _change(ctx: typer.Context, method: str, path: str, body: dict) -> None:
    """One policy change: wait for the ACKs, then print the policy as it is now."""
    mesh = session(ctx)
    data = mesh.call(method, path, body)
    version = data.get("version")
    if isinstance(version, int):
        acked, connected, waited = mesh.wait_for_acks(version)
        typer.echo(f"snapshot v{version}: {acked}/{connected} nodes ACKed in {waited * 1000:.0f} ms")
    _print_policy(data)


def _print_policy(data: dict) -> None:
    typer.echo(f"default: {data.get('default')}")
    rules = data.get("rules") or []
    if not rules:
        typer.echo("rules: none")
    for i, r in enumerate(rules, 1):
        extra = ""
        if r.get("method"):
            extra += f" method {r['method']}"
        if r.get("path"):
            extra += f" path {r['path']}*"
        typer.echo(f"  {i}. {r['action']:5} {r['source']} -> {r['destination']}{extra}")


def _rule_command(action: str):
    def command(ctx: typer.Context,
                source: str = typer.Argument(..., help="caller service (or `gateway`, or `*`)"),
                destination: str = typer.Argument(..., help="destination service (or `*`)"),
                path: Optional[str] = typer.Option(None, "--path", help="path prefix, e.g. /admin"),
                method: Optional[str] = typer.Option(None, "--method", help="HTTP method, e.g. POST")) -> None:
        _change(ctx, "POST", "/v1/policies/rules", {"action": action, "source": source,
                                                    "destination": destination, "path": path, "method": method})
    command.__doc__ = f"{action.capitalize()} calls from SOURCE to DESTINATION (explicit deny always wins)."
    command.__name__ = f"policy_{action}"
    return command


policy_allow = policy.command("allow", cls=ApiCommand)(_rule_command("allow"))
policy_deny = policy.command("deny", cls=ApiCommand)(_rule_command("deny"))


@policy.command("default", cls=ApiCommand)
def policy_default(ctx: typer.Context, decision: str = typer.Argument(..., help="allow or deny")) -> None:
    """The decision when no rule and no mesh.allow label applies."""
    _change(ctx, "PUT", "/v1/policies/default", {"default": decision})


@policy.command("remove", cls=ApiCommand)
def policy_remove(ctx: typer.Context, source: str = typer.Argument(...), destination: str = typer.Argument(...),
                  path: Optional[str] = typer.Option(None, "--path"),
                  method: Optional[str] = typer.Option(None, "--method"),
                  action: Optional[str] = typer.Option(None, "--action", help="only rules of this action")) -> None:
    """Remove the rules of SOURCE -> DESTINATION (with that path/method)."""
    _change(ctx, "POST", "/v1/policies/remove", {"source": source, "destination": destination, "path": path,
                                                 "method": method, "action": action})


@policy.command("list", cls=ReadCommand)
def policy_list(ctx: typer.Context) -> None:
    """The rules in evaluation order (deny rules first win, then allow rules, mesh.allow, default)."""
    mesh = session(ctx)
    data = mesh.get("/v1/policies")
    services = mesh.get("/v1/services").get("services") or []
    labelled = {s["name"]: s["allow"] for s in services if s.get("allow") is not None}
    if mesh.json:
        mesh.print_json({**data, "mesh_allow": labelled})
        return
    _print_policy(data)
    for name, allow in labelled.items():
        typer.echo(f"  mesh.allow on {name}: {', '.join(allow)}")
