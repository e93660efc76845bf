"""Fuzz target: the gRPC fields the mesh reads from a peer's headers (meshcore.grpc): grpc-timeout,
grpc-status, grpc-message and the HTTP/2 preface sniff. Nothing may raise; a timeout read is what its
text says and formats back to no less; a message read re-encodes to printable ASCII that reads back
the same; the sniff agrees with the preface's bytes."""

from __future__ import annotations

import re

from hypothesis import strategies as st

from meshcore import grpc
from tests.fuzz.engine import Target, corpus_test, fuzz_test

_TIMEOUT_RE = re.compile(rb"[0-9]{1,8}[HMSmun]")


def check(data: bytes) -> None:
    seconds = grpc.parse_grpc_timeout(data)
    if seconds is None:
        assert not _TIMEOUT_RE.fullmatch(data.strip(b" \t")), data
    else:
        assert _TIMEOUT_RE.fullmatch(data.strip(b" \t")) and seconds >= 0, (data, seconds)
        again = grpc.parse_grpc_timeout(grpc.format_grpc_timeout(seconds))
        assert again is not None and again >= seconds * (1 - 1e-12), (data, seconds, again)
    status = grpc.parse_grpc_status(data)
    assert status is None or (status >= 0 and data.strip(b" \t").isdigit()), (data, status)
    text = grpc.percent_decode_message(data)
    encoded = grpc.percent_encode_message(text)
    assert all(0x20 <= b <= 0x7E for b in encoded), encoded
    assert grpc.percent_decode_message(encoded) == text, (data, text, encoded)
    verdict = grpc.sniff_h2_preface(data)
    assert verdict is (True if data.startswith(grpc.H2_PREFACE)
                       else None if grpc.H2_PREFACE.startswith(data) else False), (data, verdict)


timeout = st.builds(lambda digits, unit: digits.encode() + unit, st.text("0123456789", max_size=10),
                    st.sampled_from((b"H", b"M", b"S", b"m", b"u", b"n", b"s", b"")))
message = st.text(max_size=20).map(lambda t: t.encode("utf-8", "surrogatepass"))
percent = st.lists(st.sampled_from((b"%", b"%4", b"%41", b"%zz", b"%C3%A9", b"%c3", b"%FF", b"a", b" ", b"\xff")),
                   max_size=8).map(b"".join)
preface = st.integers(0, len(grpc.H2_PREFACE)).map(lambda n: grpc.H2_PREFACE[:n])

TARGET = Target("grpc", check, st.one_of(timeout, message, percent, preface, st.binary(max_size=30)),
                (b"%", b"H", b"M", b"S", b"m", b"u", b"n", b"99999999", b"PRI * HTTP/2.0"))
test_fuzz_grpc = fuzz_test(TARGET, examples=1500)
test_corpus_grpc = corpus_test(TARGET)
