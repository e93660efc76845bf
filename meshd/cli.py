"""`meshd run`: start the control plane on this host."""

from __future__ import annotations

import argparse

from meshproc.runtime import configure_logging, run_forever


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `meshd` console script."""
    parser = argparse.ArgumentParser(prog="meshd", description="The meshd control plane.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="watch Docker, manage sidecars and the gateway, push config")
    sub.add_parser("swarm-control", help="the control plane on a Docker Swarm manager (docs/SWARM.md)")
    sub.add_parser("swarm-agent", help="the per-node agent on Docker Swarm: one sidecar per local meshed task")
    args = parser.parse_args(argv)
    if args.command == "run":
        from meshcore.telemetry_settings import SettingsError

        from .app import Meshd, Settings
        configure_logging("meshd")
        try:
            settings = Settings.from_env()
        except (SettingsError, ValueError) as exc:
            parser.exit(2, f"meshd: bad setting: {exc}\n")
        run_forever(lambda: Meshd(settings).run())
    elif args.command in ("swarm-control", "swarm-agent"):
        from .swarm_cli import run_swarm
        run_swarm(args.command, parser)


if __name__ == "__main__":
    main()
