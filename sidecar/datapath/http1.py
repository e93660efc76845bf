"""HTTP/1 heads (RFC 9112): the start lines, the header fields with their actions, the framing.

A head that arrives whole and in plain syntax is split here in one pass (split_request_line,
split_status_line, split_head_fields); None from any of them hands the head to httptools instead.
Compiled with Cython from this file (setup.py, http1.pxd) like speedups; the data path calls these
as C functions, and its Python build runs this source.
"""

from __future__ import annotations

from http import HTTPStatus

from .speedups import VCHAR, decimal_value, scan_fields

_CR, _LF, _SP, _SLASH = 13, 10, 32, 47   # C ints once compiled (http1.pxd)

STATUS_LINES = {s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus}

# ---- header actions (looked up by lowercase name while parsing) ---------------------------------
H_DROP = 1            # hop-by-hop, or set by the proxy itself
H_CONNECTION = 2      # dropped; the headers it names are dropped too
H_TE = 3              # transfer-encoding: dropped, re-added when the proxy chunks
H_CL = 4              # content-length: kept, marks a body
H_HOST = 5            # host: kept (re-emitted from Exchange.host)
H_EXPECT = 6          # kept; notes 100-continue
H_SOURCE = 7          # x-mesh-source: kept and noted (inbound metrics)
H_SOURCE_VERSION = 8
H_XFF = 9             # x-forwarded-for: noted and dropped (the gateway re-adds it with the client)
H_FLAGS = 10          # response x-mesh-flags: kept and noted (a peer inbound's UF/UH is retriable)
H_TRACEPARENT = 11    # W3C traceparent: noted and dropped; re-emitted with this hop's span id
H_B3 = 12             # B3 (b3, x-b3-*): noted and dropped; re-emitted in kind (meshcore.tracing)
H_TRACESTATE = 13     # W3C tracestate: noted and dropped; re-emitted only when the trace continues
H_UPGRADE = 14        # upgrade: dropped (httptools parses a request that has it, see split_head_fields)
H_GRPC_STATUS = 15    # response grpc-status: kept and noted (metrics, retries on gRPC status)
H_GRPC_TIMEOUT = 16   # request grpc-timeout: noted and re-emitted, capped by the mesh's timeout
# Compiled, the actions are C ints (http1.pxd), compared in C; by name, for importers (the proxy's
# tables, the gateway's, tests), they are here:
HEADER_ACTIONS = dict(H_DROP=H_DROP, H_CONNECTION=H_CONNECTION, H_TE=H_TE, H_CL=H_CL, H_HOST=H_HOST,
                      H_EXPECT=H_EXPECT, H_SOURCE=H_SOURCE, H_SOURCE_VERSION=H_SOURCE_VERSION, H_XFF=H_XFF,
                      H_FLAGS=H_FLAGS, H_TRACEPARENT=H_TRACEPARENT, H_B3=H_B3, H_TRACESTATE=H_TRACESTATE,
                      H_UPGRADE=H_UPGRADE, H_GRPC_STATUS=H_GRPC_STATUS,
                      H_GRPC_TIMEOUT=H_GRPC_TIMEOUT)
globals().update(HEADER_ACTIONS)

HOP_BY_HOP = {
    b"connection": H_CONNECTION, b"keep-alive": H_DROP, b"proxy-connection": H_DROP, b"te": H_DROP,
    b"transfer-encoding": H_TE, b"upgrade": H_UPGRADE, b"proxy-authorization": H_DROP,
    b"proxy-authenticate": H_DROP,
}

# The methods taken whole: CONNECT (a tunnel) and extension methods go to httptools.
_WHOLE_METHODS = frozenset((b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE"))


def split_request_line(data: bytes, pos: int, eol: int) -> tuple | None:
    """(method, origin-form target, HTTP/1.0?) of the request line data[pos:eol] (data[eol] a CR),
    or None when it is not `method SP origin-form SP HTTP/1.x` with a method of _WHOLE_METHODS."""
    if pos < 0 or eol >= len(data) or data[eol] != _CR:
        raise ValueError("split_request_line: data[eol] is not the line's CR")
    p = data
    if eol + 1 >= len(data) or p[eol + 1] != _LF:
        return None   # a bare CR ends no line (RFC 9112 2.2): httptools refuses the message
    sp = pos
    c = p[sp]
    while 65 <= c <= 90:   # the methods taken whole are upper-case letters (the scan stops at the CR)
        sp += 1
        c = p[sp]
    if c != _SP:
        return None
    method = p[pos:sp]
    if method not in _WHOLE_METHODS:
        return None
    i = t = sp + 1
    if i >= eol or p[i] != _SLASH:
        return None
    c = p[i]
    while 33 <= c <= 126:   # RFC 9112 3.2: no whitespace or control characters in a target
        i += 1
        c = p[i]
    if c != _SP or eol - i != 9:
        return None
    version = p[i + 1:eol]
    if version == b"HTTP/1.1":
        return method, p[t:i], False
    if version == b"HTTP/1.0":
        return method, p[t:i], True
    return None


def line_end(data: bytes, pos: int, end: int) -> int:
    """The index of the first CR of data[pos:end + 1] (data[end] a CR)."""
    if pos < 0 or end >= len(data) or data[end] != _CR:
        raise ValueError("line_end: data[end] is not a CR")
    p = data
    while p[pos] != _CR:
        pos += 1
    return pos


def split_status_line(data: bytes, pos: int, eol: int) -> tuple | None:
    """(status, HTTP/1.0?) of the status line data[pos:eol], or None when it is not
    `HTTP/1.x SP 3DIGIT SP reason` with a final (>= 200) status."""
    if pos < 0 or eol + 1 >= len(data) or eol - pos < 13:
        return None
    p = data
    if p[eol + 1] != _LF:
        return None   # a bare CR ends no line (RFC 9112 2.2): httptools refuses the message
    if p[pos + 12] != _SP:
        return None
    version = p[pos:pos + 9]
    if version == b"HTTP/1.1 ":
        http10 = False
    elif version == b"HTTP/1.0 ":
        http10 = True
    else:
        return None
    status = 0
    for i in range(pos + 9, pos + 12):
        c = p[i]
        if c < 48 or c > 57:
            return None
        status = status * 10 + (c - 48)
    if status < 200:
        return None   # interim answers (and 101) are httptools'
    tables = VCHAR
    vchar = tables
    for i in range(pos + 13, eol):
        if not vchar[p[i]]:
            return None
    return status, http10


def split_head_fields(data: bytes, eol: int, end: int, names: dict, table: tuple,
                      response: bool) -> tuple | None:
    """(fields, Content-Length or -1, the Connection value or None) of the head data[:end + 4] whose
    start line ends at `eol`: its fields as scan_fields splits them (a response's action-free lines
    as raw runs). None when the head is httptools' to parse: not plain syntax, Transfer-Encoding, a
    bad or second Content-Length, a request's Upgrade, a response's Connection naming headers to drop
    (its lines are raw runs)."""
    fields = scan_fields(data, eol + 2, end + 2, names, table, response) if eol < end else []
    if fields is None:
        return None
    size = -1
    connection = None
    for k in range(0, len(fields), 3):
        act = fields[k + 2]
        if act is None:
            continue
        a = act
        if a == H_TE:
            return None
        if a == H_CL:
            if size >= 0:
                return None
            size = decimal_value(fields[k + 1])
            if size < 0:
                return None
        elif a == H_CONNECTION:
            value = fields[k + 1]
            if response and connection_tokens(value, None) is not None:
                return None
            connection = value if connection is None else connection + b"," + value
        elif a == H_UPGRADE and not response:
            return None
    return fields, size, connection


def read_request_head(data: bytes, pos: int, end: int, names: dict, table: tuple) -> tuple | None:
    """(method, origin-form target, HTTP/1.0?, fields, Content-Length or -1, keep-alive?) of the
    request whose head is data[pos:end + 4] (end: head_end's answer), its fields as split_head_fields
    splits them; None when the head is httptools' to parse."""
    eol = line_end(data, pos, end)
    line = split_request_line(data, pos, eol)
    if line is None:
        return None
    head = split_head_fields(data, eol, end, names, table, False)
    if head is None:
        return None
    method, target, http10 = line
    fields, size, connection = head
    return method, target, http10, fields, size, keep_alive(http10, connection)


def read_response_head(data: bytes, end: int, names: dict, table: tuple, head_request: bool) -> tuple | None:
    """(status, fields, body length, keep-alive?) of the final response whose head is
    data[:end + 4], its action-free lines as raw runs; None when the head is httptools' to parse,
    a body read until the connection closes included (RFC 9112 6.3: no Content-Length on a response
    that may have a body)."""
    eol = line_end(data, 0, end)
    line = split_status_line(data, 0, eol)
    if line is None:
        return None
    head = split_head_fields(data, eol, end, names, table, True)
    if head is None:
        return None
    status, http10 = line
    fields, size, connection = head
    if head_request or status == 204 or status == 304:
        size = 0   # RFC 9112 6.3: no body, whatever Content-Length says
    elif size < 0:
        return None
    return status, fields, size, keep_alive(http10, connection)


def keep_alive(http10: bool, connection: bytes | None) -> bool:
    """Whether the connection persists after this message (RFC 9112 9.3), as llhttp decides it."""
    if connection is None:
        return not http10
    if connection in _PLAIN_CONNECTION:   # the common case: one token
        return connection[0] | 0x20 == 107   # "k"eep-alive
    tokens = [token.strip() for token in connection.lower().split(b",")]
    if b"close" in tokens:
        return False
    return not http10 or b"keep-alive" in tokens


def status_line(code: int) -> bytes:
    lines = STATUS_LINES
    line = lines.get(code)
    return line if line is not None else b"HTTP/1.1 %d Unknown\r\n" % code


_PLAIN_CONNECTION = frozenset((b"keep-alive", b"Keep-Alive", b"close", b"Close"))  # name no header


def connection_tokens(value: bytes, into: set | None) -> set | None:
    if value in _PLAIN_CONNECTION:
        return into  # the common case (every keep-alive response of nginx, say): nothing to split
    for token in value.split(b","):
        token = token.strip().lower()
        if token and token not in (b"close", b"keep-alive", b"upgrade"):
            if into is None:
                into = set()
            into.add(token)
    return into


class HeaderLines:
    """The header fields of a parsed head as the data path keeps them (Exchange.lines, _Upstream.lines):
    one flat list of wire pieces, four per field (name, b": ", value, CRLF), joined into the head as
    they are. This names the fields of such a list; it reads and copies, never edits in place."""

    __slots__ = ("lines",)

    def __init__(self, lines: list):
        self.lines = lines

    @staticmethod
    def field(name: bytes, value: bytes) -> tuple:
        """The pieces of one field, to append (`lines += HeaderLines.field(...)`)."""
        return (name, b": ", value, b"\r\n")

    def __len__(self) -> int:
        return len(self.lines) // 4

    def __iter__(self):
        """(name, value) of each field, in order, names as they came."""
        lines = self.lines
        for i in range(0, len(lines), 4):
            yield lines[i], lines[i + 2]

    def get(self, name: bytes) -> bytes | None:
        """The value of the first field named `name` (lowercase; names compare case-insensitively)."""
        for field, value in self:
            if field.lower() == name:
                return value
        return None

    def any_name(self, wanted) -> bool:
        """Whether `wanted(lowercase name)` holds for some field."""
        return any(wanted(field.lower()) for field, _ in self)

    def without(self, unwanted) -> list:
        """A new flat list of the fields whose lowercase name `unwanted` refuses."""
        lines = self.lines
        out: list = []
        for i in range(0, len(lines), 4):
            if not unwanted(lines[i].lower()):
                out += lines[i:i + 4]
        return out


def put_fields(parts: list, fields) -> None:
    """Append the wire pieces of header fields, (name, value) pairs, to `parts` (a head being joined):
    `name: value` CRLF each (RFC 9112 5)."""
    for name, value in fields:   # pairs of any kind (h2's fields are a tuple subclass)
        parts.append(name)        # compiled: appended one by one, no tuple of the four pieces
        parts.append(b": ")
        parts.append(value)
        parts.append(b"\r\n")


def drop_named(lines: list, names: set) -> list:
    """`lines` without the fields named in `names` (lowercase): those a Connection header listed."""
    return HeaderLines(lines).without(names.__contains__)
