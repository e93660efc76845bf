"""HTTP/2 (RFC 9113) for the data path: the protocol-neutral message parts (RequestHead, ResponseHead,
fields), their mapping to and from HTTP/2 header blocks, the connection limits and the errors.
The streams and the shared connection half are in h2conn; the two sides in h2server and h2client.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import h2.errors

Fields = list  # [(lowercase name bytes, value bytes)]: header or trailer fields, no pseudo-headers

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"   # the client connection preface, RFC 9113 3.4
ErrorCodes = h2.errors.ErrorCodes              # RFC 9113 7
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR = ErrorCodes.NO_ERROR, ErrorCodes.PROTOCOL_ERROR, ErrorCodes.INTERNAL_ERROR
CANCEL, REFUSED_STREAM = ErrorCodes.CANCEL, ErrorCodes.REFUSED_STREAM
MAX_STREAM_ID = 2**31 - 1                      # RFC 9113 5.1.1

# Connection-specific fields, which HTTP/2 forbids (RFC 9113 8.2.2); `te` passes only as "trailers".
CONNECTION_SPECIFIC = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                                 b"upgrade"))
_REQUEST_PSEUDO = frozenset((b":method", b":scheme", b":authority", b":path", b":protocol"))


@dataclass(frozen=True, slots=True)
class Limits:
    """An HTTP/2 connection's bounds; the settings ones are advertised to the peer (RFC 9113 6.5.2)."""
    max_concurrent_streams: int = 100     # SETTINGS_MAX_CONCURRENT_STREAMS (server); streams opened per connection (client)
    stream_window: int = 65535            # SETTINGS_INITIAL_WINDOW_SIZE: most unread bytes a peer may send one stream
    # Most unread bytes a peer may send all streams together: room for every stream's window, so streams
    # whose readers stall cannot starve the others of the connection's window (the bound that matters
    # is per stream: stream_window unread, send_buffer unsent).
    connection_window: int = 100 * 65535
    max_header_list_size: int = 65536     # SETTINGS_MAX_HEADER_LIST_SIZE; a larger head ends the connection
    max_frame_size: int = 16384           # SETTINGS_MAX_FRAME_SIZE (the RFC's minimum)
    send_buffer: int = 65536              # bytes a stream's producer may queue before send_data() waits


@dataclass(slots=True)
class RequestHead:
    """A request's head, for any HTTP version: pseudo-header values as bytes, then the regular fields
    (lowercase names; connection-specific ones are dropped on the HTTP/2 side)."""
    method: bytes
    path: bytes
    authority: bytes = b""
    scheme: bytes = b"http"
    fields: Fields = field(default_factory=list)
    protocol: bytes = b""                 # :protocol of an extended CONNECT (RFC 8441), else empty

    def get(self, name: bytes, default: bytes | None = None) -> bytes | None:
        """The first value of field `name` (lowercase), or default."""
        return field_value(self.fields, name, default)


@dataclass(slots=True)
class ResponseHead:
    """A response's head, for any HTTP version: the status and the regular fields (lowercase names)."""
    status: int
    fields: Fields = field(default_factory=list)

    def get(self, name: bytes, default: bytes | None = None) -> bytes | None:
        """The first value of field `name` (lowercase), or default."""
        return field_value(self.fields, name, default)


class H2Error(Exception):
    """An HTTP/2 stream or connection failed."""


class MalformedHead(H2Error):
    """A head breaks RFC 9113 8.3's rules: the stream ends with RST_STREAM(PROTOCOL_ERROR)."""


class StreamReset(H2Error):
    """The stream was reset: by the peer (remote) or here, with an RFC 9113 7 error code."""

    def __init__(self, code: int, remote: bool):
        self.code, self.remote = code, remote
        super().__init__(f"stream reset {'by the peer' if remote else 'locally'}: {code_name(code)}")

    @property
    def retriable(self) -> bool:
        """The peer refused the stream before processing it (RFC 9113 8.7): safe to retry anywhere."""
        return self.remote and self.code == REFUSED_STREAM


class ConnectionGone(H2Error):
    """The stream's connection ended; retriable when the peer cannot have processed the stream (its
    id above a GOAWAY's last-stream-id, RFC 9113 6.8, or the connection never came up)."""

    def __init__(self, reason: str, retriable: bool = False):
        self.reason, self.retriable = reason, retriable
        super().__init__(reason)


def code_name(code: int) -> str:
    try:
        return ErrorCodes(code).name
    except ValueError:
        return f"error {code}"


# ---- pure: heads <-> HTTP/2 header blocks ------------------------------------------------------------

def preface_state(prefix: bytes) -> bool | None:
    """True when `prefix` starts with the HTTP/2 client preface (RFC 9113 3.4), None when it is a
    shorter prefix of it (read more), False when it cannot be HTTP/2 with prior knowledge."""
    n = min(len(prefix), len(PREFACE))
    if prefix[:n] != PREFACE[:n]:
        return False
    return True if n == len(PREFACE) else None


def field_value(fields: Fields, name: bytes, default: bytes | None = None) -> bytes | None:
    """The first value of `name` among fields, or default."""
    for n, v in fields:
        if n == name:
            return v
    return default


def h2_fields(fields: Fields) -> Fields:
    """Fields fit for HTTP/2: connection-specific ones, those a `connection` field names, and `te`
    other than "trailers" dropped (RFC 9113 8.2.2); names lowercased."""
    named = set()
    for n, v in fields:
        if n.lower() == b"connection":
            named.update(t.strip().lower() for t in v.split(b","))
    out = []
    for n, v in fields:
        n = n.lower()
        if n in CONNECTION_SPECIFIC or n in named or n.startswith(b":"):
            continue
        if n == b"te" and v.strip().lower() != b"trailers":
            continue
        out.append((n, v))
    return out


def request_headers(head: RequestHead) -> list:
    """The header block of a request head: pseudo-headers first (RFC 9113 8.3.1), then the fields
    fit for HTTP/2; `host` is carried as :authority when the head has one."""
    if head.method == b"CONNECT" and not head.protocol:
        block = [(b":method", b"CONNECT"), (b":authority", head.authority)]
    else:
        block = [(b":method", head.method), (b":scheme", head.scheme), (b":path", head.path)]
        if head.authority:
            block.append((b":authority", head.authority))
        if head.protocol:
            block.append((b":protocol", head.protocol))
    fields = h2_fields(head.fields)
    if head.authority:
        fields = [f for f in fields if f[0] != b"host"]
    block.extend(fields)
    return block


def response_headers(head: ResponseHead) -> list:
    """The header block of a response head: :status first (RFC 9113 8.3.2), then the fields."""
    return [(b":status", b"%d" % head.status)] + h2_fields(head.fields)


def trailer_fields(fields: Fields) -> Fields:
    """Trailers fit for HTTP/2: no pseudo-headers (RFC 9113 8.1), no connection-specific fields."""
    return h2_fields(fields)


def parse_request_head(block) -> RequestHead:
    """The RequestHead of a received header block; MalformedHead when its pseudo-headers break
    RFC 9113 8.3.1 (unknown, repeated, after a regular field, or missing)."""
    pseudo: dict[bytes, bytes] = {}
    fields: Fields = []
    for n, v in block:
        if n[:1] == b":":
            if fields:
                raise MalformedHead("pseudo-header after a regular field")
            if n not in _REQUEST_PSEUDO:
                raise MalformedHead(f"unknown request pseudo-header {n!r}")
            if n in pseudo:
                raise MalformedHead(f"repeated pseudo-header {n!r}")
            pseudo[n] = v
        else:
            fields.append((n, v))
    method = pseudo.get(b":method")
    if not method:
        raise MalformedHead("no :method")
    authority = pseudo.get(b":authority") or field_value(fields, b"host", b"")
    protocol = pseudo.get(b":protocol", b"")
    if method == b"CONNECT" and not protocol:
        if b":scheme" in pseudo or b":path" in pseudo or not authority:
            raise MalformedHead("CONNECT takes :authority only")
        return RequestHead(method=method, path=b"", authority=authority, scheme=b"", fields=fields)
    if protocol and method != b"CONNECT":
        raise MalformedHead(":protocol on a method other than CONNECT")
    scheme, path = pseudo.get(b":scheme"), pseudo.get(b":path")
    if not scheme or not path:
        raise MalformedHead("no :scheme or :path")
    return RequestHead(method=method, path=path, authority=authority, scheme=scheme, fields=fields,
                       protocol=protocol)


def parse_response_head(block) -> ResponseHead:
    """The ResponseHead of a received header block; MalformedHead unless it has exactly one
    three-digit :status and no other pseudo-header, all before the fields (RFC 9113 8.3.2)."""
    status = None
    fields: Fields = []
    for n, v in block:
        if n[:1] == b":":
            if n != b":status" or status is not None or fields:
                raise MalformedHead(f"bad response pseudo-header {n!r}")
            if len(v) != 3 or not v.isdigit():
                raise MalformedHead(f"bad :status {v!r}")
            status = int(v)
        else:
            fields.append((n, v))
    if status is None:
        raise MalformedHead("no :status")
    return ResponseHead(status=status, fields=fields)
