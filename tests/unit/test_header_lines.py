"""sidecar.datapath.http1.HeaderLines, the header type over the data path's flat field list: a table
of heads (as the parser leaves them) and what each question answers."""

from __future__ import annotations

import pytest

from sidecar.datapath.http1 import HeaderLines, drop_named


def lines(*fields: tuple) -> list:
    out: list = []
    for name, value in fields:
        out += HeaderLines.field(name, value)
    return out


HEAD = lines((b"Accept", b"*/*"), (b"X-Jwt-Claim-Sub", b"mallory"), (b"authorization", b"Bearer t"),
             (b"Keep-Alive", b"5"), (b"accept", b"text/plain"))


@pytest.mark.parametrize("question, answer", [
    (lambda f: len(f), 5),
    (lambda f: list(f)[0], (b"Accept", b"*/*")),
    (lambda f: f.get(b"accept"), b"*/*"),                 # the first, by lowercase name
    (lambda f: f.get(b"authorization"), b"Bearer t"),
    (lambda f: f.get(b"host"), None),
    (lambda f: f.any_name(lambda n: n.startswith(b"x-jwt-claim-")), True),
    (lambda f: f.any_name(b"te".__eq__), False),
    (lambda f: f.without(b"accept".__eq__),
     lines((b"X-Jwt-Claim-Sub", b"mallory"), (b"authorization", b"Bearer t"), (b"Keep-Alive", b"5"))),
    (lambda f: f.without(lambda n: True), []),
])
def test_header_lines(question, answer) -> None:
    fields = HeaderLines(HEAD)
    assert question(fields) == answer
    assert fields.lines is HEAD and len(HEAD) == 20    # read and copied, never edited


@pytest.mark.parametrize("names, kept", [
    ({b"keep-alive"}, [b"Accept", b"X-Jwt-Claim-Sub", b"authorization", b"accept"]),
    ({b"accept", b"authorization"}, [b"X-Jwt-Claim-Sub", b"Keep-Alive"]),
    (set(), [b"Accept", b"X-Jwt-Claim-Sub", b"authorization", b"Keep-Alive", b"accept"]),
])
def test_drop_named_drops_the_fields_a_connection_header_listed(names, kept) -> None:
    assert [name for name, _ in HeaderLines(drop_named(HEAD, names))] == kept
