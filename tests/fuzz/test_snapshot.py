"""Fuzz target: snapshots (meshcore.snapshot.decode_snapshot), what a sidecar or gateway applies from
meshd: services, endpoints, gateway routes, traffic policy labels, routing rules, authorization and
telemetry settings. SnapshotError (a ValueError) is the documented failure, ValueError tolerated;
anything else is a finding, and a decoded snapshot must encode back to an equal one.

Input bytes: the snapshot's JSON (inputs that are not JSON are skipped: control decodes those)."""

from __future__ import annotations

import json

from hypothesis import strategies as st

from meshcore.snapshot import decode_snapshot, encode_snapshot
from tests.fuzz.engine import CORPUS, Target, corpus_test, fuzz_test
from tests.fuzz.test_control import json_value


def check(data: bytes) -> None:
    try:
        wire = json.loads(data)
    except (ValueError, RecursionError):
        return
    try:
        snap = decode_snapshot(wire)
    except ValueError:
        return
    assert decode_snapshot(json.loads(json.dumps(encode_snapshot(snap)))) == snap


VALID = json.loads((CORPUS / "snapshot" / "valid.json").read_text())


@st.composite
def edited(draw) -> bytes:
    """The valid snapshot with 1-3 of its values (at any depth) replaced or deleted."""
    wire = json.loads(json.dumps(VALID))
    for _ in range(draw(st.integers(1, 3))):
        node = wire
        while True:
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            if not keys:
                break
            key = draw(st.sampled_from(keys))
            child = node[key]
            if isinstance(child, (dict, list)) and child and draw(st.booleans()):
                node = child
                continue
            if isinstance(node, dict) and draw(st.integers(0, 4)) == 0:
                del node[key]
            else:
                node[key] = draw(json_value)
            break
    return json.dumps(wire).encode()


TARGET = Target("snapshot", check, edited(),
                (b'"services":', b'"policy":', b'"rules":', b"null", b"[]", b"{}", b"1e999"))
test_fuzz_snapshot = fuzz_test(TARGET, examples=800)
test_corpus_snapshot = corpus_test(TARGET)
