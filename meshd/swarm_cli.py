"""`meshd swarm-control` and `meshd swarm-agent` (docs/SWARM.md)."""

from __future__ import annotations

import argparse

from meshproc.runtime import configure_logging, run_forever


def run_swarm(command: str, parser: argparse.ArgumentParser) -> None:
    """Run the Swarm control plane or the per-node agent until stopped."""
    from meshcore.telemetry_settings import SettingsError

    from .app import Settings
    if command == "swarm-control":
        from .swarm_control import SwarmMeshd, settings_from_env
        configure_logging("meshd")
        try:
            settings, swarm = Settings.from_env(), settings_from_env()
        except (SettingsError, ValueError) as exc:
            parser.exit(2, f"meshd: bad setting: {exc}\n")
        run_forever(lambda: SwarmMeshd(settings, swarm).run())
    else:
        from .swarm_agent import AgentSettings, SwarmAgent
        configure_logging("meshd-agent")
        run_forever(lambda: SwarmAgent(AgentSettings.from_env()).run())
