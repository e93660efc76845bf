"""meshd.swarm_state: the replicated part of the store as swarm configs (a fake engine API)."""

from __future__ import annotations

import base64

from meshd.store import Store
from meshd.swarm_state import STATE_LABEL, SwarmState, decode_state, newest_first, state_document


class FakeConfigs:
    """The three config calls of docker.APIClient, in memory, as the engine answers them."""

    def __init__(self):
        self.stored: dict[str, dict] = {}
        self.next_id = 0

    def configs(self, filters=None):
        label = (filters or {}).get("label")
        return [c for c in self.stored.values() if label is None or label in c["Spec"]["Labels"]]

    def create_config(self, name, data, labels=None):
        self.next_id += 1
        cid = f"id{self.next_id}"
        self.stored[cid] = {"ID": cid, "Spec": {"Name": name, "Labels": labels or {},
                                                 "Data": base64.b64encode(data).decode()}}
        return {"ID": cid}

    def inspect_config(self, cid):
        return self.stored[cid]

    def remove_config(self, cid):
        del self.stored[cid]


def api():
    fake = FakeConfigs()
    return fake, fake


def test_rules_written_by_one_control_plane_seed_the_next(tmp_path):
    calls, fake = api()
    first = Store(str(tmp_path / "a.db"))
    first.put("rules", {"catalog": {"split": {"v1": 90, "v2": 10}}})
    first.put("snapshot_version", 12)          # not replicated
    first.put("holds", {"x": 1.0})             # not replicated
    assert SwarmState(calls).save(state_document(first))
    second = Store(str(tmp_path / "b.db"))
    assert SwarmState(calls).seed(second) == 1
    assert second.get("rules") == {"catalog": {"split": {"v1": 90, "v2": 10}}}
    assert second.get("snapshot_version") is None and second.get("holds") is None


def test_an_unchanged_document_is_not_written_again_and_old_configs_go(tmp_path):
    calls, fake = api()
    state = SwarmState(calls)
    for n in range(4):
        assert state.save({"rules": {"s": n}})
        assert not state.save({"rules": {"s": n}})
    names = sorted(c["Spec"]["Name"] for c in fake.stored.values())
    assert names == ["mesh_state_3", "mesh_state_4"]
    assert SwarmState(calls).load() == {"rules": {"s": 3}}


def test_newest_first_and_unreadable_documents():
    configs = [{"Spec": {"Labels": {STATE_LABEL: "2"}}}, {"Spec": {"Labels": {STATE_LABEL: "10"}}},
               {"Spec": {"Labels": {STATE_LABEL: "x"}}}, {"Spec": {"Labels": {}}}]
    assert [c["Spec"]["Labels"][STATE_LABEL] for c in newest_first(configs)] == ["10", "2"]
    assert decode_state({"Spec": {"Data": base64.b64encode(b"not json").decode()}}) == {}
    assert decode_state({"Spec": {"Data": base64.b64encode(b"[1]").decode()}}) == {}
    assert decode_state({"Spec": {"Data": base64.b64encode(b'{"rules": {}, "other": 1}').decode()}}) == {"rules": {}}
