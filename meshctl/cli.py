"""meshctl: look at a running mesh through meshd's admin API, or check a compose file's mesh labels.

This module only assembles: the root app and the shared options live in meshctl.context, each command
module holds its commands as top-level functions on its own Typer object, and the root app takes them
here. Heavy modules (rich tables, yaml, urllib, the mesh core) are imported inside the commands so that
`meshctl --help` starts fast.
"""

from __future__ import annotations

from . import analyze, observe, overview, security, traffic
from .context import app

# Order of `meshctl --help`: what is running, what is configured, then the compose check.
for _commands in (overview.commands, traffic.commands, observe.commands, analyze.commands):
    app.registered_commands.extend(_commands.registered_commands)
app.add_typer(security.certs, name="certs")
app.add_typer(security.policy, name="policy")


def main() -> None:
    """Console script entry point `meshctl`."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
