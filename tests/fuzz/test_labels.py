"""Fuzz target: label strings -> typed config (meshcore.labels, meshcore.policy, meshcore.routing_rules'
validators of meshctl's words). Labels come from any container on the host. The documented errors
are LabelError (decode_container), LabelDecodeError (decode_traffic_policy) and ValueError (the
routing rules' validators); anything else is a finding, and so is a non-finite number in what decodes.

Input bytes: one `key=value` label per line (UTF-8, invalid bytes replaced)."""

from __future__ import annotations

import dataclasses
import json
import math

from hypothesis import strategies as st

from meshcore import labels as lb
from meshcore import policy, policy_wire, routing_rules as rr
from tests.fuzz.engine import Target, corpus_test, fuzz_test


def parse(data: bytes) -> dict[str, str]:
    out = {}
    for line in data.decode("utf-8", "replace").split("\n"):
        key, _, value = line.partition("=")
        out[key] = value
    return out


def finite(value) -> None:
    """Every number in a decoded value (dataclasses, tuples, frozensets) is finite."""
    if isinstance(value, float):
        assert math.isfinite(value), value
    elif dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            finite(getattr(value, f.name))
    elif isinstance(value, (tuple, list, frozenset)):
        for item in value:
            finite(item)


def check(data: bytes) -> None:
    labels = parse(data)
    spec = lb.decode_container(lb.ContainerInfo(id="c1", name="/app", labels=labels, exposed_ports=(8080,)))
    assert isinstance(spec, (lb.MeshSpec, lb.LabelError)), spec
    finite(spec)
    try:
        decoded = policy.decode_traffic_policy(policy.policy_labels(labels))
    except lb.LabelDecodeError:
        pass
    else:
        finite(decoded)
        # every policy meshd decodes passes the nodes' check of the snapshot unchanged
        wire = json.loads(json.dumps(policy_wire.encode_policy_wire(decoded)))
        assert policy_wire.decode_policy_wire(wire) == decoded
    values = list(labels.values())[:4]
    for call in (lambda: rr.parse_split_args(values),
                 lambda: rr.validate_split("svc", rr.parse_split_args(values), None),
                 lambda: rr.validate_fault(abort=values[0], delay=values[-1]),
                 lambda: rr.validate_mirror("svc", values[0], None, values[-1]),
                 lambda: rr.validate_route("svc", values[0], None, values, values[-1])):
        try:
            finite(call())
        except ValueError:
            pass


KEYS = tuple(sorted(lb.KNOWN_LABELS | policy.POLICY_LABEL_NAMES)) + (
    "mesh.enable", "mesh.lb.typo", "mesh.other", "com.docker.compose.service", "com.docker.compose.project")
VALUES = ("true", "8080", "0", "65535", "65536", "15001", "-1", "+80", "8_080", "١٢", "08080", "9" * 25, "1" * 5000,
          "v1", "http", "tcp", "/api", "/", "//", "api.example.com", "*.example.com", "jwt", "none", "off",
          "250ms", "1.5m", "0s", "9" * 400 + "s", "1e400s", "nan", "inf", "20%", "100.5%", "9" * 400 + "%",
          "100/s", "9" * 400 + "/s", "0/s", "ring-hash", "x-user", "v1=90", "v2=10%", "50:503", "10:1s",
          "10:" + "9" * 400 + "h", "a b", " ", "", "\t", "\x00", "catalog,orders", "*", "random")
label = st.tuples(st.one_of(st.sampled_from(KEYS), st.text(max_size=12)),
                  st.one_of(st.sampled_from(VALUES), st.text(max_size=10))).map(lambda kv: f"{kv[0]}={kv[1]}")
label_set = st.lists(label, max_size=8).map(
    lambda ls: "\n".join(["mesh.enable=true", *ls]).encode("utf-8", "surrogatepass"))

TARGET = Target("labels", check, st.one_of(label_set, st.binary(max_size=40)),
                tuple(k.encode() + b"=" for k in KEYS[:20]) + (b"9" * 30, b"ms", b"%", b"/s"))
test_fuzz_labels = fuzz_test(TARGET, examples=900)
test_corpus_labels = corpus_test(TARGET)
