"""The request-smuggling table (pure): rows of raw client bytes with the readings a correct HTTP/1.1
recipient may give them (RFC 9112), a strict parser for what the app received, and the verdict.

A row's `readings` are the request sequences the client's bytes may correctly mean; an empty tuple
means only a refusal is correct. `markers` are the ambiguous bytes themselves: all of them found in
what the app received means the proxy passed the construct through unchanged. Every attack row
hides `GET /smuggled` where only a reading that disagrees with RFC 9112 finds a request.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

HOST = "payments"
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: payments\r\n\r\n"
TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
MAX_CHUNK_SIZE_DIGITS = 16      # 64 bits; more is an overflow attempt

REFUSED, NORMALISED, PASSED, DESYNC = "refused", "normalised", "passed-through-unchanged", "DESYNC"


@dataclass(frozen=True)
class Meant:
    """One request as the client meant it: method, path (origin-form), body."""

    method: str
    path: str
    body: bytes = b""


@dataclass(frozen=True)
class Row:
    name: str
    raw: bytes
    readings: tuple[tuple[Meant, ...], ...]
    meaning: str
    markers: tuple[bytes, ...] = ()


@dataclass
class Seen:
    """A request the app parsed strictly: its key for comparison and its raw bytes."""

    method: str
    target: str
    version: str
    headers: list[tuple[bytes, bytes]]
    body: bytes

    @property
    def path(self) -> str:
        m = re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://[^/]*(/.*)?$", self.target)   # absolute-form (RFC 9112 3.2.2)
        return (m.group(1) or "/") if m else self.target

    def header(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n.lower() == name]


class Refused(ValueError):
    """The app's strict parser refused the bytes (the reason is the message)."""


def _head_lines(head: bytes) -> list[bytes]:
    """The lines of a head that ends in CRLF CRLF; a bare CR or LF refuses it (RFC 9112 2.2)."""
    lines = head[:-4].split(b"\r\n")
    for line in lines:
        if b"\r" in line or b"\n" in line:
            raise Refused("bare CR or LF in the head")
    return lines


def _field(line: bytes) -> tuple[bytes, bytes]:
    """name, value of a field line (RFC 9110 5.1, RFC 9112 5): token name, colon, OWS, no CTLs."""
    if line[:1] in (b" ", b"\t"):
        raise Refused("obs-fold")
    name, colon, value = line.partition(b":")
    if not colon or not name or any(c not in TOKEN for c in name):
        raise Refused(f"field name {name[:40]!r}")
    value = value.strip(b" \t")
    if any((c < 32 and c != 9) or c == 127 for c in value):
        raise Refused(f"control byte in the value of {name.decode()}")
    return name, value


def _chunked(buf: bytes, pos: int) -> tuple[bytes, int, list[tuple[bytes, bytes]]] | None:
    """(body, end, trailers) of a chunked body from buf[pos:], None while incomplete (RFC 9112 7.1)."""
    body = bytearray()
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            if b"\n" in buf[pos:] or b"\r" in buf[pos:]:
                raise Refused("bare CR or LF in a chunk line")
            return None
        line = buf[pos:eol]
        size_text, _, ext = line.partition(b";")
        if (not size_text or len(size_text) > MAX_CHUNK_SIZE_DIGITS
                or not re.fullmatch(rb"[0-9a-fA-F]+", size_text)):
            raise Refused(f"chunk size {size_text[:40]!r}")
        if any(c < 32 and c != 9 for c in ext) or b"\n" in ext:
            raise Refused("control byte in a chunk extension")
        size = int(size_text, 16)
        pos = eol + 2
        if size == 0:
            end = buf.find(b"\r\n\r\n", pos - 2)
            if end < 0:
                return None
            trailers = [_field(ln) for ln in _head_lines(buf[pos - 2:end + 4])[1:]] if end > pos - 2 else []
            return bytes(body), end + 4, trailers
        if len(buf) < pos + size + 2:
            return None
        if buf[pos + size:pos + size + 2] != b"\r\n":
            raise Refused("chunk data not followed by CRLF")
        body += buf[pos:pos + size]
        pos += size + 2


def parse_request(buf: bytes) -> tuple[Seen, int] | None:
    """The first request of buf and where it ends, None while incomplete; Refused where a strict
    origin server refuses it (RFC 9112: framing ambiguity, bad syntax)."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > 65536:
            raise Refused("head too large")
        # a head ended by bare LFs never completes here: refuse it once it has clearly ended
        if b"\n\n" in buf or b"\r\r" in buf:
            raise Refused("bare CR or LF in the head")
        return None
    lines = _head_lines(buf[:end + 4])
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[0] or any(c not in TOKEN for c in parts[0]) \
            or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0") or not parts[1] \
            or any(c <= 32 or c >= 127 for c in parts[1]):
        raise Refused(f"request line {lines[0][:60]!r}")
    headers = [_field(ln) for ln in lines[1:]]
    seen = Seen(parts[0].decode(), parts[1].decode(), parts[2].decode()[5:], headers, b"")
    hosts = seen.header(b"host")
    if len(hosts) > 1 or (seen.version == "1.1" and not hosts):
        raise Refused("no Host, or more than one")   # RFC 9112 3.2
    te = [t.strip().lower() for v in seen.header(b"transfer-encoding") for t in v.split(b",")]
    cl = [c.strip() for v in seen.header(b"content-length") for c in v.split(b",")]
    pos = end + 4
    if te:
        if cl:
            raise Refused("Content-Length with Transfer-Encoding")   # RFC 9112 6.1: a server MAY refuse
        if te != [b"chunked"]:
            raise Refused(f"transfer coding {b','.join(te)!r}")
        got = _chunked(buf, pos)
        if got is None:
            return None
        seen.body, pos, trailers = got
        seen.headers += [(b"trailer:" + n, v) for n, v in trailers]
        return seen, pos
    if cl:
        if len(set(cl)) != 1 or not re.fullmatch(rb"[0-9]+", cl[0]):
            raise Refused(f"Content-Length {cl!r}")   # RFC 9110 8.6
        n = int(cl[0])
        if len(buf) < pos + n:
            return None
        seen.body = buf[pos:pos + n]
        pos += n
    return seen, pos


@dataclass
class Outcome:
    """What one row did through one proxy pair."""

    seen: list[Seen] = field(default_factory=list)      # requests the app parsed, in order
    app_refused: list[str] = field(default_factory=list)  # the app's strict parser's refusals
    app_bytes: bytes = b""                               # everything the app received
    statuses: list[int] = field(default_factory=list)    # status codes the client got
    bodies: list[bytes] = field(default_factory=list)    # the app's answers the client got
    closed: bool = False                                 # the proxy closed the client's connection


def _key(m: Meant | Seen) -> tuple[str, str, bytes]:
    return (m.method, m.path, m.body)


def _prefix_of(seen: list[tuple], reading: tuple[Meant, ...]) -> bool:
    return len(seen) <= len(reading) and all(a == _key(b) for a, b in zip(seen, reading))


def answer_body(seen: Seen) -> bytes:
    """What the app answers a request with: the request it saw (the client checks it was its own)."""
    return b"seen %s %s %d" % (seen.method.encode(), seen.path.encode(), len(seen.body))


def verdict(row: Row, out: Outcome) -> tuple[str, str]:
    """(verdict, detail) of one row's outcome; DESYNC when the app saw a request, or answered one
    to the client, that no correct reading of the client's bytes gives."""
    seen = [_key(s) for s in out.seen]
    meant_answers = {answer_body(Seen(m.method, m.path, "1.1", [], m.body)) for r in row.readings for m in r}
    if out.app_refused:
        # the app refused part of what it got, so it saw no whole reading: every request it did
        # see must still be one that a correct reading holds
        meant = {_key(m) for r in row.readings for m in r}
        fits = [r for r in row.readings if all(k in meant for k in seen)] if row.readings else []
    else:
        fits = [r for r in row.readings if _prefix_of(seen, r)]
    if (seen and not fits) or any(b not in meant_answers for b in out.bodies):
        shown = ", ".join(f"{m} {p} ({len(b)} B body)" for m, p, b in seen) or "nothing"
        return DESYNC, f"app saw {shown}"
    status = ",".join(str(s) for s in out.statuses) or "no response"
    close = "closed" if out.closed else "kept open"
    app_note = f"; app refused: {out.app_refused[0]}" if out.app_refused else ""
    lower = out.app_bytes.lower()
    if out.app_refused or (row.markers and out.app_bytes and all(m.lower() in lower for m in row.markers)):
        return PASSED, f"{status}, {close}{app_note}"
    if seen and not any(s >= 400 for s in out.statuses):
        whole = any(len(seen) == len(r) for r in fits)
        return NORMALISED, f"{status}, {close}" + ("" if whole else f"; app saw the first {len(seen)} only")
    return REFUSED, f"{status}, {close}" + (f"; app saw the first {len(seen)}" if seen else "")


# ---- the rows ----------------------------------------------------------------------------------

def _req(method: str, path: str, headers: list[bytes], body: bytes = b"", version: bytes = b"HTTP/1.1") -> bytes:
    return (b"%s %s %s\r\n" % (method.encode(), path.encode(), version)
            + b"".join(h + b"\r\n" for h in [b"Host: payments", *headers]) + b"\r\n" + body)


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data)


def _te_hides_smuggled(name: str, te_lines: list[bytes], meaning: str, markers: tuple[bytes, ...],
                       chunked_is_correct: bool = True) -> Row:
    """A POST whose chunked body holds SMUGGLED, with a Content-Length covering only the size line:
    a recipient that frames by Content-Length finds GET /smuggled as a second request."""
    body = _chunk(SMUGGLED)
    cl = len(b"%x\r\n" % len(SMUGGLED))
    raw = _req("POST", "/", [*te_lines, b"Content-Length: %d" % cl], body)
    readings = ((Meant("POST", "/", SMUGGLED),),) if chunked_is_correct else ()
    return Row(name, raw, readings, meaning, markers)


def _cl_hides_smuggled(name: str, extra: list[bytes], meaning: str, markers: tuple[bytes, ...]) -> Row:
    """A POST whose Content-Length covers `0 CRLF CRLF` + SMUGGLED: a recipient that wrongly frames
    by a Transfer-Encoding hidden in `extra` finds GET /smuggled as a second request."""
    body = b"0\r\n\r\n" + SMUGGLED
    raw = _req("POST", "/", [*extra, b"Content-Length: %d" % len(body)], body)
    return Row(name, raw, ((Meant("POST", "/", body),),), meaning, markers)


GET = Meant("GET", "/")
CL_TE_BODY = b"0\r\n\r\n" + SMUGGLED
HELLO = Meant("POST", "/", b"hello")

ROWS: tuple[Row, ...] = (
    Row("baseline GET", _req("GET", "/", []), ((GET,),), "one GET"),
    Row("CL.TE (both, TE wins)",
        _req("POST", "/", [b"Content-Length: %d" % len(CL_TE_BODY), b"Transfer-Encoding: chunked"], CL_TE_BODY),
        ((Meant("POST", "/"), Meant("GET", "/smuggled")),),
        "TE overrides CL (RFC 9112 6.3): an empty POST, then GET /smuggled in the open",
        (b"Content-Length: %d" % len(CL_TE_BODY), b"Transfer-Encoding: chunked")),
    _te_hides_smuggled("TE.CL (both, CL short)", [b"Transfer-Encoding: chunked"],
                       "a POST whose chunked body is the text of a GET", (b"Content-Length: 4", b"chunked")),
    _te_hides_smuggled("TE.TE `xchunked`", [b"Transfer-Encoding: xchunked"],
                       "unknown coding: refuse (RFC 9112 6.3: 400)", (b"xchunked",), chunked_is_correct=False),
    _te_hides_smuggled("TE.TE `chunked` + `identity` line", [b"Transfer-Encoding: chunked",
                                                             b"Transfer-Encoding: identity"],
                       "final coding not chunked: refuse", (b"identity",), chunked_is_correct=False),
    _te_hides_smuggled("TE.TE `identity, chunked`", [b"Transfer-Encoding: identity, chunked"],
                       "chunked last (identity is unknown: refuse or read chunked)", (b"identity",)),
    _te_hides_smuggled("TE.TE upper case `CHUNKED`", [b"Transfer-Encoding: CHUNKED"],
                       "codings are case-insensitive: chunked", (b"CHUNKED",)),
    _te_hides_smuggled("TE.TE tab before value", [b"Transfer-Encoding:\tchunked"],
                       "HTAB is OWS: chunked", (b"Transfer-Encoding:\tchunked",)),
    _te_hides_smuggled("TE.TE vertical tab before value", [b"Transfer-Encoding:\x0bchunked"],
                       "VT is not OWS: refuse", (b"\x0bchunked",), chunked_is_correct=False),
    _te_hides_smuggled("TE.TE quoted `\"chunked\"`", [b'Transfer-Encoding: "chunked"'],
                       "not a coding: refuse", (b'"chunked"',), chunked_is_correct=False),
    _te_hides_smuggled("TE.TE space before colon", [b"Transfer-Encoding : chunked"],
                       "refuse, or drop the space (RFC 9112 5.1): chunked", (b"Transfer-Encoding :",)),
    _te_hides_smuggled("TE.TE obs-fold value", [b"Transfer-Encoding:", b" chunked"],
                       "refuse, or fold to SP (RFC 9112 5.2): chunked", (b"Transfer-Encoding:\r\n chunked",)),
    _te_hides_smuggled("TE behind bare LF", [b"X-A: a\nTransfer-Encoding: chunked"],
                       "a bare LF may end the line (RFC 9112 2.2): chunked, or refuse", (b"a\nTransfer",)),
    _cl_hides_smuggled("TE behind bare CR", [b"X-A: a\rTransfer-Encoding: chunked"],
                       "bare CR: refuse or read as SP (RFC 9112 2.2): CL frames", (b"a\rTransfer",)),
    Row("duplicate Content-Length, differing", _req("POST", "/", [b"Content-Length: 5", b"Content-Length: 6"],
                                                    b"hello" + SMUGGLED),
        (), "invalid length: refuse (RFC 9110 8.6)", (b"Content-Length: 6",)),
    Row("duplicate Content-Length, equal", _req("POST", "/", [b"Content-Length: 5", b"Content-Length: 5"], b"hello"),
        ((HELLO,),), "the same length twice: 5 (or refuse)", (b"Content-Length: 5\r\nContent-Length: 5",)),
    Row("Content-Length list `5, 5`", _req("POST", "/", [b"Content-Length: 5, 5"], b"hello"),
        ((HELLO,),), "a list of equal lengths: 5 (or refuse)", (b"5, 5",)),
    Row("signed Content-Length `+5`", _req("POST", "/", [b"Content-Length: +5"], b"hello" + SMUGGLED),
        (), "not 1*DIGIT: refuse", (b"+5",)),
    Row("negative Content-Length `-1`", _req("POST", "/", [b"Content-Length: -1"], SMUGGLED),
        (), "not 1*DIGIT: refuse", (b"-1",)),
    Row("Content-Length with leading zeros", _req("POST", "/", [b"Content-Length: 0005"], b"hello"),
        ((HELLO,),), "0005 is 5", (b"0005",)),
    Row("obs-fold in a plain header", _req("GET", "/", [b"X-A: a", b" b"]),
        ((GET,),), "refuse, or fold to SP", (b"a\r\n b",)),
    Row("bare LF line ends", b"GET / HTTP/1.1\nHost: payments\n\n",
        ((GET,),), "a recipient MAY take LF as the line end (RFC 9112 2.2)", (b"HTTP/1.1\n",)),
    Row("NUL in a header value", _req("GET", "/", [b"X-A: a\x00b"]), ((GET,),), "refuse (or drop the field)",
        (b"\x00",)),
    Row("NUL in a header name", _req("GET", "/", [b"X\x00A: b"]), ((GET,),), "refuse", (b"\x00",)),
    Row("control byte 0x01 in a value", _req("GET", "/", [b"X-A: a\x01b"]), ((GET,),), "refuse", (b"\x01",)),
    Row("space before colon (plain header)", _req("GET", "/", [b"X-A : b"]), ((GET,),),
        "refuse, or drop the space", (b"X-A :",)),
    Row("chunk size overflowing 64 bits",
        _req("POST", "/", [b"Transfer-Encoding: chunked"],
             b"1%016x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED)),
        (), "an unrepresentable size: refuse", (b"10000000000",)),
    Row("chunk size with 0x prefix", _req("POST", "/", [b"Transfer-Encoding: chunked"], b"0x5\r\nhello\r\n0\r\n\r\n"),
        (), "not HEXDIG: refuse", (b"0x5",)),
    Row("chunk size with trailing space", _req("POST", "/", [b"Transfer-Encoding: chunked"],
                                              b"5 \r\nhello\r\n0\r\n\r\n"),
        ((HELLO,),), "no BWS there: refuse, or 5", (b"5 \r\n",)),
    Row("chunk extension", _req("POST", "/", [b"Transfer-Encoding: chunked"], b"5;name=value\r\nhello\r\n0\r\n\r\n"),
        ((HELLO,),), "an extension is ignored: hello", (b";name=value",)),
    Row("chunk extension with bare LF",
        _req("POST", "/", [b"Transfer-Encoding: chunked"], b"5;a\nb\r\nhello\r\n0\r\n\r\n" + SMUGGLED),
        ((HELLO, Meant("GET", "/smuggled")),), "refuse (bare LF), or hello then GET /smuggled", (b";a\nb",)),
    Row("trailers", _req("POST", "/", [b"Transfer-Encoding: chunked"], b"5\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n"),
        ((HELLO,),), "hello with a trailer field", (b"X-Trailer: 1",)),
    Row("Content-Length in the trailers",
        _req("POST", "/", [b"Transfer-Encoding: chunked"], b"5\r\nhello\r\n0\r\nContent-Length: 60\r\n\r\n" + SMUGGLED),
        ((HELLO, Meant("GET", "/smuggled")),), "a trailer never frames: hello, then GET /smuggled in the open",
        (b"Content-Length: 60",)),
    Row("Expect: 100-continue, body sent at once",
        _req("POST", "/", [b"Expect: 100-continue", b"Content-Length: %d" % len(SMUGGLED)], SMUGGLED),
        ((Meant("POST", "/", SMUGGLED),),), "one POST whose body is the text of a GET", ()),
    Row("Expect: 100-continue on a GET, pipelined",
        _req("GET", "/", [b"Expect: 100-continue"]) + SMUGGLED,
        ((GET, Meant("GET", "/smuggled")),), "two GETs (no body to wait for)", ()),
    Row("unknown expectation",
        _req("POST", "/", [b"Expect: 100-continuex", b"Content-Length: %d" % len(SMUGGLED)], SMUGGLED),
        ((Meant("POST", "/", SMUGGLED),),), "417, or the POST with its body", (b"100-continuex",)),
    Row("pipelined after a bad Content-Length", _req("POST", "/", [b"Content-Length: 1x"], b"") + SMUGGLED,
        (), "refuse and close: the second request's start is unknowable", (b"1x",)),
    Row("pipelined after a NUL header", _req("GET", "/first", [b"X-A: \x00"]) + SMUGGLED,
        ((Meant("GET", "/first"), Meant("GET", "/smuggled")),), "refuse and close, or both", (b"\x00",)),
    Row("HTTP/1.0 keep-alive, pipelined",
        _req("GET", "/a", [b"Connection: keep-alive"], version=b"HTTP/1.0") + _req("GET", "/b", [], version=b"HTTP/1.0"),
        ((Meant("GET", "/a"), Meant("GET", "/b")),), "two requests, the second ends the connection", ()),
    Row("absolute-form with conflicting Host",
        b"GET http://payments/abs HTTP/1.1\r\nHost: evil.example\r\n\r\n",
        ((Meant("GET", "/abs"),),), "the target's authority wins (RFC 9112 3.2.2): payments /abs",
        (b"evil.example",)),
)
