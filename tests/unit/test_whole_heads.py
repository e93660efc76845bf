"""The head splitting of the compiled data path (WHOLE_HEADS): what it takes, what it leaves.

Whatever these functions refuse (None) is parsed by httptools instead, so each refusal below is a
head that must not be taken whole; each accepted one must come out as httptools would read it.
"""

from __future__ import annotations

import pytest

from sidecar.datapath.http1 import (
    H_CL, H_CONNECTION, H_DROP, H_HOST, H_TE, keep_alive, line_end, split_head_fields, split_request_line,
    split_status_line,
)
from sidecar.datapath.speedups import decimal_value, name_table, scan_fields
from sidecar.proxy import INBOUND_REQUEST_HEADERS, RESPONSE_HEADERS

REQ_TABLE = name_table(INBOUND_REQUEST_HEADERS)
RESP_TABLE = name_table(RESPONSE_HEADERS)


def fields_of(lines: bytes, names=INBOUND_REQUEST_HEADERS, table=REQ_TABLE, runs=False):
    head = lines + b"\r\n"   # the blank line
    return scan_fields(head, 0, len(head) - 2, names, table, runs)


@pytest.mark.parametrize("lines, expect", [
    (b"", []),
    (b"Host: a\r\n", [b"Host", b"a", H_HOST]),
    (b"X-A:  v  \t\r\n", [b"X-A", b"v", None]),                   # OWS both sides is not the value
    (b"X-Empty:\r\n", [b"X-Empty", b"", None]),
    (b"X-Obs: caf\xc3\xa9\r\n", [b"X-Obs", b"caf\xc3\xa9", None]),  # obs-text passes
    (b"CONTENT-LENGTH: 5\r\nTransfer-Encoding: chunked\r\n",
     [b"CONTENT-LENGTH", b"5", H_CL, b"Transfer-Encoding", b"chunked", H_TE]),
    (b"Connection: close\r\nKeep-Alive: 5\r\n", [b"Connection", b"close", H_CONNECTION, b"Keep-Alive", b"5", H_DROP]),
])
def test_plain_fields_are_split_with_their_actions(lines, expect):
    assert fields_of(lines) == expect


@pytest.mark.parametrize("lines", [
    b"Host : a\r\n",            # space before the colon (RFC 9112 5.1: must be rejected)
    b" Host: a\r\n",            # obs-fold / leading whitespace
    b"X-A: a\r\n  b\r\n",       # obs-fold continuation
    b"X-A: a\x01b\r\n",         # a control character
    b"X-A: a\x00\r\n",
    b"X-A: a\nX-B: b\r\n",      # a bare LF
    b"X-A: a\rX-B: b\r\n",      # a bare CR
    b": a\r\n",                 # no name
    b"X\x7fA: a\r\n",           # not a token character
    b"X-A a\r\n",               # no colon
])
def test_anything_else_is_left_to_httptools(lines):
    assert fields_of(lines) is None


def test_runs_keep_fields_without_an_action_as_their_raw_lines():
    lines = (b"Server: nginx\r\nDate: x\r\nContent-Length: 11\r\nX-A:  v  \r\nConnection: keep-alive\r\n"
             b"ETag: \"1\"\r\n")
    got = fields_of(lines, RESPONSE_HEADERS, RESP_TABLE, runs=True)
    assert got == [b"Server: nginx\r\nDate: x\r\n", None, None, b"Content-Length", b"11", H_CL,
                   b"X-A:  v  \r\n", None, None, b"Connection", b"keep-alive", H_CONNECTION,
                   b"ETag: \"1\"\r\n", None, None]
    # Joined back, the raw runs and the split fields are the lines as they came (modulo OWS).
    assert fields_of(b"Server: nginx\r\n", RESPONSE_HEADERS, RESP_TABLE, runs=True) == [b"Server: nginx\r\n", None, None]


def test_the_name_table_only_narrows_lookups():
    """A name whose (length, first letter) matches an action name is looked up; it still has to be
    that name to get the action (no false matches), and every action name is found in any case."""
    for name, act in INBOUND_REQUEST_HEADERS.items():
        for spelled in (name, name.upper(), name.title()):
            assert fields_of(spelled + b": v\r\n") == [spelled, b"v", act]
    assert fields_of(b"Hxst: v\r\n") == [b"Hxst", b"v", None]   # same length and letter as host


def test_a_name_gets_the_action_of_the_dict_lookup():
    """scan_fields matches a name against its (length, first letter) slot in C; it must find what
    `names.get(name.lower())` finds, for names that share a slot, differ in one byte or in case."""
    import random
    draw = random.Random(7)
    names = {**INBOUND_REQUEST_HEADERS, b"x-b3-sampled": H_DROP, b"x-b3-samplex": H_HOST}
    table = name_table(names)
    alphabet = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_~!"
    tried = 0
    for name in list(names) * 20:
        spelled = bytearray(draw.choice((name, name.upper(), name.title())))
        if draw.random() < 0.5:   # one byte changed: the same slot, most often another name
            at = draw.randrange(1, len(spelled))
            spelled[at] = draw.choice(alphabet)
        spelled = bytes(spelled)
        assert fields_of(spelled + b": v\r\n", names, table) == [spelled, b"v", names.get(spelled.lower())]
        tried += 1
    assert tried == 20 * len(names)


def test_a_name_table_takes_only_lowercase_names():
    with pytest.raises(ValueError, match="X-Upper"):
        name_table({b"X-Upper": H_DROP})


def test_the_head_must_end_where_the_caller_says():
    with pytest.raises(ValueError, match="final CRLF"):
        scan_fields(b"Host: a\r\n", 0, 5, INBOUND_REQUEST_HEADERS, REQ_TABLE, False)
    with pytest.raises(ValueError):
        line_end(b"GET / HTTP/1.1", 0, 5)


@pytest.mark.parametrize("lines, response, expect", [
    (b"Host: a\r\n", False, ([b"Host", b"a", H_HOST], -1, None)),
    (b"Content-Length: 3\r\nConnection: keep-alive\r\n", False,
     ([b"Content-Length", b"3", H_CL, b"Connection", b"keep-alive", H_CONNECTION], 3, b"keep-alive")),
    (b"Connection: a\r\nConnection: close\r\n", False,
     ([b"Connection", b"a", H_CONNECTION, b"Connection", b"close", H_CONNECTION], -1, b"a,close")),
    (b"Server: x\r\nContent-Length: 0\r\n", True, ([b"Server: x\r\n", None, None, b"Content-Length", b"0", H_CL], 0, None)),
    (b"Transfer-Encoding: chunked\r\n", False, None),
    (b"Transfer-Encoding: chunked\r\n", True, None),
    (b"Content-Length: 1\r\nContent-Length: 1\r\n", False, None),   # a second length
    (b"Content-Length: 1x\r\n", True, None),
    (b"Upgrade: websocket\r\n", False, None),                        # a request's Upgrade
    (b"Connection: keep-alive, X-Hop\r\n", True, None),             # names a header to drop
    (b"Host : a\r\n", False, None),                                 # not plain syntax
])
def test_head_fields_and_their_framing(lines, response, expect):
    head = b"GET / HTTP/1.1\r\n" + lines + b"\r\n"
    eol = line_end(head, 0, len(head) - 4)
    names, table = (RESPONSE_HEADERS, RESP_TABLE) if response else (INBOUND_REQUEST_HEADERS, REQ_TABLE)
    assert split_head_fields(head, eol, len(head) - 4, names, table, response) == expect


@pytest.mark.parametrize("line, expect", [
    (b"GET / HTTP/1.1", (b"GET", b"/", False)),
    (b"POST /a?b=c%20d HTTP/1.0", (b"POST", b"/a?b=c%20d", True)),
    (b"DELETE /x HTTP/1.1", (b"DELETE", b"/x", False)),
    (b"CONNECT a:443 HTTP/1.1", None),          # a tunnel: httptools
    (b"PROPFIND / HTTP/1.1", None),              # an extension method: httptools
    (b"get / HTTP/1.1", None),                   # methods are case-sensitive
    (b"GET http://a/ HTTP/1.1", None),           # absolute-form: httptools (explicit proxy)
    (b"OPTIONS * HTTP/1.1", None),
    (b"GET  / HTTP/1.1", None),                  # two spaces
    (b"GET / HTTP/2.0", None),
    (b"GET / HTTP/1.1 ", None),
    (b"GET /a\x01 HTTP/1.1", None),
    (b"GET", None),
])
def test_request_lines(line, expect):
    data = line + b"\r\n\r\n"
    assert split_request_line(data, 0, line_end(data, 0, len(line))) == expect


@pytest.mark.parametrize("line, expect", [
    (b"HTTP/1.1 200 OK", (200, False)),
    (b"HTTP/1.0 404 Not Found", (404, True)),
    (b"HTTP/1.1 204 ", (204, False)),
    (b"HTTP/1.1 100 Continue", None),            # interim: httptools
    (b"HTTP/1.1 101 Switching Protocols", None),
    (b"HTTP/1.1 2x0 OK", None),
    (b"HTTP/1.1 200", None),
    (b"HTTP/2 200 OK", None),
    (b"HTTP/1.1 200 O\x01K", None),
])
def test_status_lines(line, expect):
    data = line + b"\r\n\r\n"
    assert split_status_line(data, 0, len(line)) == expect


@pytest.mark.parametrize("value, expect", [
    (b"0", 0), (b"11", 11), (b"007", 7), (b"", -1), (b"-1", -1), (b"1 ", -1), (b"+1", -1), (b"1e3", -1),
    (b"9" * 19, -1),   # beyond what we take whole: httptools decides
])
def test_content_length_values(value, expect):
    assert decimal_value(value) == expect


@pytest.mark.parametrize("http10, connection, expect", [
    (False, None, True), (True, None, False),
    (False, b"close", False), (False, b"Close", False), (True, b"keep-alive", True), (True, b"Keep-Alive", True),
    (False, b"keep-alive", True), (True, b"close", False),
    (False, b"Keep-Alive, close", False), (True, b"x-a, keep-alive", True), (True, b"x-a", False),
    (False, b"upgrade", True),
])
def test_keep_alive_as_rfc_9112_9_3(http10, connection, expect):
    assert keep_alive(http10, connection) is expect
