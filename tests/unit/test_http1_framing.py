"""sidecar.datapath.http1's head readers as byte scripts: the bytes of a head, and what the data path
makes of them (or None: httptools parses that head instead)."""

from __future__ import annotations

import pytest

from sidecar.datapath.http1 import H_CL, H_CONNECTION, H_HOST, read_request_head, read_response_head
from sidecar.datapath.speedups import head_end, name_table
from sidecar.proxy import INBOUND_REQUEST_HEADERS, RESPONSE_HEADERS

REQ_TABLE = name_table(INBOUND_REQUEST_HEADERS)
RESP_TABLE = name_table(RESPONSE_HEADERS)


def request(script: bytes):
    end = head_end(script, 0, len(script))
    return read_request_head(script, 0, end, INBOUND_REQUEST_HEADERS, REQ_TABLE)


def response(script: bytes, head_request: bool = False):
    end = head_end(script, 0, len(script))
    return read_response_head(script, end, RESPONSE_HEADERS, RESP_TABLE, head_request)


@pytest.mark.parametrize("script, expect", [
    # (method, target, HTTP/1.0?, fields, Content-Length or -1, keep-alive?)
    (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", (b"GET", b"/", False, [b"Host", b"a", H_HOST], -1, True)),
    (b"GET /x?y HTTP/1.1\r\n\r\n", (b"GET", b"/x?y", False, [], -1, True)),
    (b"POST /p HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
     (b"POST", b"/p", False, [b"Content-Length", b"3", H_CL], 3, True)),
    (b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
     (b"GET", b"/", False, [b"Connection", b"close", H_CONNECTION], -1, False)),
    (b"GET / HTTP/1.0\r\n\r\n", (b"GET", b"/", True, [], -1, False)),
    (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
     (b"GET", b"/", True, [b"Connection", b"keep-alive", H_CONNECTION], -1, True)),
    # httptools' to parse:
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", None),
    (b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n", None),
    (b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n", None),
    (b"CONNECT a:443 HTTP/1.1\r\n\r\n", None),
    (b"GET http://a/ HTTP/1.1\r\n\r\n", None),       # absolute-form target
    (b"GET / HTTP/2.0\r\n\r\n", None),
    (b"GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n", None),  # obs-fold
    (b"GET / HTTP/1.1\r\nX : a\r\n\r\n", None),       # space before the colon
])
def test_request_heads(script, expect):
    assert request(script) == expect


@pytest.mark.parametrize("script, head_request, expect", [
    # (status, fields, body length, keep-alive?)
    (b"HTTP/1.1 200 OK\r\nServer: x\r\nContent-Length: 2\r\n\r\nok", False,
     (200, [b"Server: x\r\n", None, None, b"Content-Length", b"2", H_CL], 2, True)),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n", True, (200, [b"Content-Length", b"2", H_CL], 0, True)),
    (b"HTTP/1.1 204 No Content\r\n\r\n", False, (204, [], 0, True)),
    (b"HTTP/1.1 304 Not Modified\r\n\r\n", False, (304, [], 0, True)),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", False, (200, [b"Content-Length", b"0", H_CL], 0, False)),
    # httptools' to parse:
    (b"HTTP/1.1 200 OK\r\n\r\n", False, None),                          # read until close
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", False, None),
    (b"HTTP/1.1 100 Continue\r\n\r\n", False, None),
    (b"HTTP/1.1 200 OK\r\nConnection: x-a\r\nContent-Length: 0\r\n\r\n", False, None),  # names a header
])
def test_response_heads(script, head_request, expect):
    assert response(script, head_request) == expect
