"""The request-smuggling table (table.py) through the meshd sidecar pair and the meshd gateway on
loopback: no row desynchronises them, every row that only a refusal answers correctly is refused.
The HAProxy and Envoy pairs run the same table where their binaries are installed (the verdicts
are theirs: only that the pair ran every row is asserted). The verdict logic is tested on its own."""

from __future__ import annotations

import pytest

from bench import env

from .run import pairs, read_responses, run_table
from .table import (
    DESYNC, NORMALISED, PASSED, REFUSED, ROWS, SMUGGLED, Meant, Outcome, Refused, Row, Seen, answer_body,
    parse_request, verdict,
)

ROW = Row("x", b"", ((Meant("POST", "/", b"hello"),),), "a POST", (b"ambiguous",))


def seen(method: str, path: str, body: bytes = b"") -> Seen:
    return Seen(method, path, "1.1", [(b"host", b"payments")], body)


@pytest.mark.parametrize("outcome, expected", [
    (Outcome(statuses=[400], closed=True), REFUSED),
    (Outcome(seen=[seen("POST", "/", b"hello")], statuses=[200], app_bytes=b"POST"), NORMALISED),
    (Outcome(seen=[seen("POST", "/", b"hello")], statuses=[200], app_bytes=b"X: ambiguous"), PASSED),
    (Outcome(app_refused=["obs-fold"], statuses=[400], app_bytes=b"X"), PASSED),
    (Outcome(seen=[seen("POST", "/", b"hell")], statuses=[200]), DESYNC),                 # cut elsewhere
    (Outcome(seen=[seen("POST", "/", b"hello"), seen("GET", "/smuggled")], statuses=[200, 200]), DESYNC),
    (Outcome(statuses=[200], bodies=[answer_body(seen("GET", "/smuggled"))]), DESYNC),   # answered a hidden one
])
def test_verdict(outcome, expected):
    assert verdict(ROW, outcome)[0] == expected


def test_a_row_that_only_a_refusal_answers_desyncs_on_any_request():
    row = Row("y", b"", (), "refuse", ())
    assert verdict(row, Outcome(statuses=[400], closed=True))[0] == REFUSED
    assert verdict(row, Outcome(seen=[seen("POST", "/", b"hello")], statuses=[200]))[0] == DESYNC


def test_the_strict_app_parser():
    data = b"POST /a HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n5;x=1\r\nhello\r\n0\r\n\r\nGET"
    got, end = parse_request(data)
    assert (got.method, got.path, got.body, data[end:]) == ("POST", "/a", b"hello", b"GET")
    assert parse_request(b"GET http://payments/abs HTTP/1.1\r\nHost: x\r\n\r\n")[0].path == "/abs"
    assert parse_request(b"POST / HTTP/1.1\r\nHost: p\r\nContent-Length: 5\r\n\r\nhel") is None
    for bad in (b"GET / HTTP/1.1\r\nHost: p\r\nX: a\r\n b\r\n\r\n", b"GET / HTTP/1.1\r\nHost: p\r\nX : a\r\n\r\n",
                b"GET / HTTP/1.1\r\nHost: p\r\nX: a\x00\r\n\r\n", b"GET / HTTP/1.1\nHost: p\n\n",
                b"POST / HTTP/1.1\r\nHost: p\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
                b"POST / HTTP/1.1\r\nHost: p\r\nContent-Length: +1\r\n\r\nx",
                b"POST / HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000005\r\nhello\r\n0\r\n\r\n",
                b"GET / HTTP/1.1\r\n\r\n"):
        with pytest.raises(Refused):
            parse_request(bad)


def test_every_attack_row_hides_a_request_from_a_wrong_reading():
    for row in ROWS[1:]:
        assert row.readings == () or all(r for r in row.readings), row.name
    hidden = [r for r in ROWS if SMUGGLED in r.raw]
    assert len(hidden) >= 20


def test_read_responses_skips_interim_ones():
    data = (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 400 Bad\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n2\r\nno\r\n0\r\n\r\n")
    assert read_responses(data) == ([200, 400], [b"ok", b"no"])


def test_meshd_sidecar_pair_and_gateway(tmp_path):
    with pairs(tmp_path, ("meshd", "gateway"), log=lambda *_: None) as (app, ports, _skipped):
        table = run_table(ports, app)
    for row in ROWS:
        for pair in ("meshd", "gateway"):
            v, detail = table[row.name][pair]
            assert v != DESYNC, (row.name, pair, detail)
            if not row.readings:
                assert v == REFUSED and "400" in detail and "closed" in detail, (row.name, pair, detail)
    assert all(table["baseline GET"][p][0] == NORMALISED for p in ("meshd", "gateway"))


@pytest.mark.parametrize("pair", ["haproxy", "envoy"])
def test_reference_pairs_run_the_table(tmp_path, pair):
    if (env.which("haproxy") if pair == "haproxy" else env.envoy_binary()) is None:
        pytest.skip(f"{pair} is not installed (`make bench` installs it)")
    with pairs(tmp_path, (pair,), log=lambda *_: None) as (app, ports, _skipped):
        table = run_table(ports, app)
    assert len(table) == len(ROWS) and table["baseline GET"][pair][0] == NORMALISED
    # what RFC 9110 8.6 makes every recipient refuse
    assert table["signed Content-Length `+5`"][pair][0] == REFUSED
