"""gRPC over HTTP/2 as the mesh sees it: status codes, `grpc-timeout`, trailers-only local replies,
retries on gRPC status and protocol detection. Pure, standard library only; the data path does the I/O.

Sources: gRPC's "gRPC over HTTP2" protocol description (PROTOCOL-HTTP2.md), its status code list
(doc/statuscodes.md) and HTTP-to-gRPC status mapping (doc/http-grpc-status-mapping.md); Istio's
`retryOn` names for gRPC; Envoy's response flags (meshcore.resilience); RFC 9113 for HTTP/2.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Iterable

from .policy import GRPC_RETRY_ON
from .resilience import NR, RL, UC, UF, UH, UO, URX, UT

# RFC 9113 section 3.4: the client connection preface starts with these 24 octets (a SETTINGS frame
# follows); a server that sees them on a cleartext connection speaks HTTP/2 with prior knowledge.
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
GRPC_CONTENT_TYPE = b"application/grpc"
# Flags of local replies that Envoy's list (meshcore.resilience) does not name.
RBAC = "RBAC"    # Envoy: request denied by the RBAC filter (authorization), 403
UAEX = "UAEX"    # Envoy: request denied by an authentication filter (the gateway's JWT check), 401
EB = "EB"        # the mesh's own: a call outside the mesh refused in registry-only egress mode

MAX_TIMEOUT_DIGITS = 8  # PROTOCOL-HTTP2.md: TimeoutValue is a positive integer of at most 8 digits
_NANOS_PER_UNIT = {"H": 3600 * 10**9, "M": 60 * 10**9, "S": 10**9, "m": 10**6, "u": 10**3, "n": 1}
_UNITS_FINEST_FIRST = ("n", "u", "m", "S", "M", "H")
_TIMEOUT_LIMIT = 10**MAX_TIMEOUT_DIGITS
# RFC 9110 section 5.6.3: optional whitespace around a field value is SP and HTAB only (str.strip()
# would also take \x1c-\x1f and, from latin-1, \x85 and \xa0)
_OWS = " \t"


class GrpcStatus(IntEnum):
    """The 17 status codes of gRPC (doc/statuscodes.md), names as in the spec."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


# Istio's retryOn names are the spec's names in lower case with dashes (`deadline-exceeded`).
RETRY_ON_STATUS: dict[str, GrpcStatus] = {name: GrpcStatus[name.upper().replace("-", "_")]
                                          for name in GRPC_RETRY_ON}

# The status of a locally generated reply, by the Envoy response flag that explains it; earlier
# entries win when a reply carries several flags (`DI,UT`: a delay fault, then the timeout).
_FLAG_STATUS: tuple[tuple[str, GrpcStatus], ...] = (
    (RBAC, GrpcStatus.PERMISSION_DENIED),
    (EB, GrpcStatus.PERMISSION_DENIED),        # a policy refusal: retrying it cannot help
    (UAEX, GrpcStatus.UNAUTHENTICATED),
    (RL, GrpcStatus.RESOURCE_EXHAUSTED),
    (UT, GrpcStatus.DEADLINE_EXCEEDED),
    (UH, GrpcStatus.UNAVAILABLE),
    (UF, GrpcStatus.UNAVAILABLE),
    (UO, GrpcStatus.UNAVAILABLE),              # circuit breaker overflow: try again later
    (UC, GrpcStatus.UNAVAILABLE),              # upstream reset before a response
    (URX, GrpcStatus.UNAVAILABLE),
    (NR, GrpcStatus.UNIMPLEMENTED),            # no route: as HTTP 404 maps
)
# doc/http-grpc-status-mapping.md: the status a client gives a non-gRPC HTTP response; every other
# HTTP status is UNKNOWN.
_HTTP_STATUS = {400: GrpcStatus.INTERNAL, 401: GrpcStatus.UNAUTHENTICATED, 403: GrpcStatus.PERMISSION_DENIED,
                404: GrpcStatus.UNIMPLEMENTED, 429: GrpcStatus.UNAVAILABLE, 502: GrpcStatus.UNAVAILABLE,
                503: GrpcStatus.UNAVAILABLE, 504: GrpcStatus.UNAVAILABLE}


# ---- detection ---------------------------------------------------------------------------------

def sniff_h2_preface(data: bytes) -> bool | None:
    """True when `data` starts with the HTTP/2 client preface, False when it cannot, None when it is
    a proper prefix of it (read more before deciding)."""
    if data.startswith(H2_PREFACE):
        return True
    if H2_PREFACE.startswith(data):
        return None
    return False


def is_grpc_content_type(value: bytes | str) -> bool:
    """True for `application/grpc` and `application/grpc+<format>` (PROTOCOL-HTTP2.md), any case."""
    raw = value.encode("latin-1", "replace") if isinstance(value, str) else value
    media = raw.split(b";", 1)[0].strip(b" \t").lower()
    return media == GRPC_CONTENT_TYPE or media.startswith(GRPC_CONTENT_TYPE + b"+")


def is_grpc_request(headers: Iterable[tuple[bytes | str, bytes | str]]) -> bool:
    """True when a request's headers carry a gRPC content-type."""
    value = header_value(headers, "content-type")
    return value is not None and is_grpc_content_type(value)


def header_value(headers: Iterable[tuple[bytes | str, bytes | str]], name: str) -> bytes | str | None:
    """The value of the first field called `name` (lower case) in a header list of bytes or str pairs."""
    for key, value in headers:
        if (key.lower() if isinstance(key, str) else key.lower().decode("latin-1")) == name:
            return value
    return None


# ---- grpc-timeout ------------------------------------------------------------------------------

def parse_grpc_timeout(value: bytes | str | None) -> float | None:
    """Seconds of a `grpc-timeout` value (1 to 8 digits, then one of H M S m u n); None when absent or
    malformed (the mesh then ignores it, as Envoy does)."""
    if value is None:
        return None
    text = (value.decode("latin-1") if isinstance(value, bytes) else value).strip(_OWS)
    digits, unit = text[:-1], text[-1:]
    # isdigit() would take non-ASCII digits and int() underscores or signs: ASCII digits only.
    if unit not in _NANOS_PER_UNIT or not 1 <= len(digits) <= MAX_TIMEOUT_DIGITS \
            or digits.strip("0123456789"):
        return None
    return int(digits) * _NANOS_PER_UNIT[unit] / 1e9


def format_grpc_timeout(seconds: float) -> str:
    """A `grpc-timeout` value for `seconds` (to the nanosecond; negative as 0): the coarsest unit that
    says it exactly in 8 digits, else the finest that fits, rounded up so that the next hop never gets
    less time (at most 99999999 hours)."""
    nanos = max(0, round(seconds * 1e9))
    if nanos == 0:
        return "0n"
    for unit in reversed(_UNITS_FINEST_FIRST):
        count, rest = divmod(nanos, _NANOS_PER_UNIT[unit])
        if not rest and count < _TIMEOUT_LIMIT:
            return f"{count}{unit}"
    for unit in _UNITS_FINEST_FIRST:
        count = -(-nanos // _NANOS_PER_UNIT[unit])
        if count < _TIMEOUT_LIMIT:
            return f"{count}{unit}"
    return f"{_TIMEOUT_LIMIT - 1}H"


def cap_grpc_timeout(mesh_timeout: float | None, header: bytes | str | None) -> tuple[float | None, str | None]:
    """(effective timeout in seconds, `grpc-timeout` value to forward): the smaller of the mesh's
    timeout (None: off) and the header's. A header within the cap passes as received; a malformed one
    is ignored for the deadline and passes unchanged unless the mesh's timeout replaces it; (None, None)
    when neither sets a deadline."""
    asked = parse_grpc_timeout(header)
    received = header.decode("latin-1") if isinstance(header, bytes) else header
    if mesh_timeout is None:
        return asked, received
    if asked is not None and asked <= mesh_timeout:
        return asked, received
    return mesh_timeout, format_grpc_timeout(mesh_timeout)


# ---- status of replies -------------------------------------------------------------------------

def parse_grpc_status(value: bytes | str | None) -> int | None:
    """The code of a `grpc-status` value (ASCII digits), None when absent or malformed."""
    if value is None:
        return None
    text = (value.decode("latin-1") if isinstance(value, bytes) else value).strip(_OWS)
    if not text or len(text) > 10 or text.strip("0123456789"):
        return None
    return int(text)


def status_of_http(http_status: int) -> GrpcStatus:
    """The gRPC status a client gives a non-gRPC HTTP response (doc/http-grpc-status-mapping.md)."""
    return _HTTP_STATUS.get(http_status, GrpcStatus.UNKNOWN)


def local_reply_status(http_status: int, flags: str) -> GrpcStatus:
    """The gRPC status of a reply the mesh generated itself: by its Envoy response flags (a comma
    list, `-` for none) when one explains it, else by its HTTP status."""
    present = set(flags.split(","))
    for flag, status in _FLAG_STATUS:
        if flag in present:
            return status
    return status_of_http(http_status)


def percent_encode_message(message: str) -> bytes:
    """A `grpc-message` value: the UTF-8 of `message`, every byte outside 0x20-0x7E and `%` itself as
    %XX (PROTOCOL-HTTP2.md, Percent-Encoded)."""
    return b"".join(bytes((b,)) if 0x20 <= b <= 0x7E and b != 0x25 else b"%%%02X" % b
                    for b in message.encode("utf-8"))


def percent_decode_message(value: bytes) -> str:
    """The text of a `grpc-message` value; a malformed %-sequence is kept as it is, as the spec asks."""
    out = bytearray()
    i = 0
    while i < len(value):
        b = value[i]
        if b == 0x25 and _is_hex(value[i + 1:i + 3]):
            out.append(int(value[i + 1:i + 3], 16))
            i += 3
            continue
        out.append(b)
        i += 1
    return out.decode("utf-8", errors="replace")


def _is_hex(pair: bytes) -> bool:
    return len(pair) == 2 and not pair.strip(b"0123456789abcdefABCDEF")


def trailers_only_headers(status: int, message: str = "",
                          extra: Iterable[tuple[bytes, bytes]] = ()) -> list[tuple[bytes, bytes]]:
    """The header block of a trailers-only gRPC response (HTTP status 200, the status in the headers,
    no body; PROTOCOL-HTTP2.md); `grpc-message` only when there is a message; `extra` go last."""
    headers = [(b":status", b"200"), (b"content-type", GRPC_CONTENT_TYPE), (b"grpc-status", b"%d" % status)]
    if message:
        headers.append((b"grpc-message", percent_encode_message(message)))
    headers.extend(extra)
    return headers


def local_reply_headers(http_status: int, flags: str, message: str = "",
                        extra: Iterable[tuple[bytes, bytes]] = ()) -> list[tuple[bytes, bytes]]:
    """The trailers-only answer to a gRPC call of a local reply the HTTP path would send as
    `http_status` with `flags` (see local_reply_status)."""
    return trailers_only_headers(local_reply_status(http_status, flags), message, extra)


# ---- retries -----------------------------------------------------------------------------------

def is_retriable_grpc_status(status: int | None, retry_on: Iterable[str]) -> bool:
    """True when a response's gRPC status is one that `retry_on` (a policy's `mesh.retries.on` words)
    names; HTTP words and codes outside Istio's five never count."""
    if status is None or status == GrpcStatus.OK:
        return False
    return any(RETRY_ON_STATUS.get(word) == status for word in retry_on)


def response_grpc_status(headers: Iterable[tuple[bytes | str, bytes | str]]) -> int | None:
    """The `grpc-status` of a response header block (a trailers-only response carries it there, and
    that is where Envoy reads it for retries), None when absent or malformed."""
    return parse_grpc_status(header_value(headers, "grpc-status"))
