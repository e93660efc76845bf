"""Fuzz target: control messages (meshcore.protocol.decode_message), the first thing meshd reads from
anyone who connects to the control port and what nodes read from meshd. ProtocolError is the one
documented failure (meshd and the sidecar drop the connection on it); anything else is a finding,
and a message that decodes must encode back to an equal one."""

from __future__ import annotations

import json

from hypothesis import strategies as st

from meshcore import protocol
from tests.fuzz.engine import Target, corpus_test, fuzz_test


def check(data: bytes) -> None:
    try:
        msg = protocol.decode_message(data)
    except protocol.ProtocolError:
        return
    assert protocol.decode_message(protocol.encode_message(msg)) == msg


PEM_CSR = "-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n-----END CERTIFICATE REQUEST-----\n"
PEM_CERT = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
scalar = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=8),
                   st.sampled_from(("hello", "sidecar", "gateway", "workload", PEM_CSR, PEM_CERT, "x" * 300)))
json_value = st.recursive(
    scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8)
KEYS = ("type", "kind", "node", "container", "last_version", "token", "csr", "version", "snapshot", "reason",
        "cert_chain", "bundle", "not_after", "renew_at", "purpose")
TYPES = ("hello", "snapshot", "ack", "nack", "certs", "csr", "renew", "bundle", "bundle_ack", "other")
message = st.builds(lambda kind, body: {"type": kind, **body}, st.sampled_from(TYPES),
                    st.dictionaries(st.sampled_from(KEYS[1:]), json_value, max_size=7))
encoded = st.one_of(message.map(lambda m: json.dumps(m).encode()),
                    st.sampled_from((10, 999, 1001, 5000)).map(lambda n: b"[" * n),   # past the recursion limit (1000)
                    st.sampled_from((10, 999, 1001, 5000)).map(lambda n: b"{\"a\":" * n),
                    st.binary(max_size=30))

TARGET = Target("control", check, encoded, (b'"type":', b'"hello"', b'"version":', b"[", b"{", b"NaN", b"1e999"))
test_fuzz_control = fuzz_test(TARGET, examples=500)
test_corpus_control = corpus_test(TARGET)
