"""The control plane's rules on Swarm, kept in raft: a swarm config per change (docs/SWARM.md).

meshd keeps its state in SQLite (meshd.store) in a volume of one host. On Swarm the control plane
may come back on another manager with an empty volume, so what an operator set (traffic rules,
authorization policy, tracing settings) is also written, after each change, to a swarm config `mesh_state_<seq>`: the swarm's raft store replicates it to every manager.
A control plane that starts seeds its store from the newest one. The CA comes from swarm secrets
(compose/swarm.yml); bootstrap tokens and certificate records are not kept (see meshd.swarm_control).
"""

from __future__ import annotations

import base64
import json
from typing import Any

import docker.errors

from .rules_api import STORE_KEY as RULES_KEY
from .security_api import STORE_KEY as POLICY_KEY
from .store import Store
from .traces import STORE_KEY as TELEMETRY_KEY

STATE_LABEL = "mesh.swarm.state"     # its value: the sequence number of the config
CONFIG_PREFIX = "mesh_state_"
KEEP = 2                             # configs kept: the newest, and one before it
# Not the snapshot version: it moves with every endpoint change (a raft write each), and sidecars
# tell a new control plane theirs in their hello (meshd.app: versions only go up).
REPLICATED_KEYS = (RULES_KEY, POLICY_KEY, TELEMETRY_KEY)


def state_document(store: Store) -> dict[str, Any]:
    """The replicated part of a store: the keys of REPLICATED_KEYS that are set."""
    out = {}
    for key in REPLICATED_KEYS:
        value = store.get(key)
        if value is not None:
            out[key] = value
    return out


def config_sequence(config: dict[str, Any]) -> int:
    """A state config's sequence number from its label; -1 when it has none."""
    raw = ((config.get("Spec") or {}).get("Labels") or {}).get(STATE_LABEL, "")
    return int(raw) if raw.isdigit() else -1


def newest_first(configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The state configs, the newest first (pure)."""
    return sorted((c for c in configs if config_sequence(c) >= 0), key=config_sequence, reverse=True)


def decode_state(config: dict[str, Any]) -> dict[str, Any]:
    """The document a state config holds (its Data is base64 JSON); {} when unreadable."""
    try:
        doc = json.loads(base64.b64decode((config.get("Spec") or {}).get("Data") or ""))
    except ValueError:
        return {}
    return {k: v for k, v in doc.items() if k in REPLICATED_KEYS} if isinstance(doc, dict) else {}


class SwarmState:
    """Reads and writes the state configs through a manager's engine (blocking calls)."""

    def __init__(self, api: docker.APIClient):
        self.api = api
        self.saved: dict[str, Any] | None = None

    def _listed(self) -> list[dict[str, Any]]:
        return newest_first(self.api.configs(filters={"label": STATE_LABEL}))

    def load(self) -> dict[str, Any]:
        """The newest state document in the swarm ({} when there is none)."""
        for config in self._listed():
            doc = decode_state(self.api.inspect_config(config["ID"]))
            if doc:
                self.saved = doc
                return doc
        self.saved = {}
        return {}

    def seed(self, store: Store) -> int:
        """Put the newest document's keys into `store`; the number of keys written."""
        doc = self.load()
        for key, value in doc.items():
            store.put(key, value)
        return len(doc)

    def save(self, doc: dict[str, Any]) -> bool:
        """Write `doc` as the next state config (unless it is the last one saved) and drop the
        older ones but one; True when a config was written."""
        if doc == self.saved:
            return False
        listed = self._listed()
        seq = (config_sequence(listed[0]) + 1) if listed else 1
        data = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        self.api.create_config(f"{CONFIG_PREFIX}{seq}", data, labels={STATE_LABEL: str(seq)})
        self.saved = doc
        for old in listed[KEEP - 1:]:
            try:
                self.api.remove_config(old["ID"])
            except docker.errors.APIError:
                pass    # another manager's race, or in use: the next save tries again
        return True
