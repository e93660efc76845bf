"""The data path's byte helpers: where a head ends, its header fields, slices, joins, hex, decimals;
and its clock.

Cython compiles this file as it is (setup.py; its types in speedups.pxd), and the data path's other
compiled modules call these functions as C functions (`cimport`). Where it is not compiled, or with
MESHD_PURE_PYTHON=1 (sidecar/__init__.py), the same source runs as Python, with the same results:
the pure twin is this file, chosen at import. Byte loops that would be slow as bytecode fall back to
bytes methods there (COMPILED).
"""

from __future__ import annotations

import time
from typing import Any

from ..telemetry import DURATION_BOUNDS

try:
    import cython
    COMPILED = cython.compiled
except ImportError:  # Cython absent: this is the Python source
    COMPILED = False

# RFC 9110 5.6.2 tchar (a field name); RFC 9110 5.5 field-vchar, obs-text, SP and HTAB (a value).
TCHAR = bytes(1 if (c < 128 and chr(c).isalnum()) or chr(c) in "!#$%&'*+-.^_`|~" else 0 for c in range(256))
VCHAR = bytes(1 if c == 9 or 32 <= c <= 126 or c >= 128 else 0 for c in range(256))
_CR, _LF, _SP, _HTAB, _COLON, _SLASH = 13, 10, 32, 9, 58, 47


def name_table(names: dict) -> tuple:
    """`names` (lowercase field names -> actions) by (length, first letter) slot: for each of the 2048
    slots, the (name, action, ...) pairs of the names in it, or None. scan_fields compares a field
    name only with the names of its slot."""
    slots: list = [None] * 2048
    for name, act in names.items():
        if name != name.lower() or not name:
            raise ValueError(f"name_table: {name!r} is not a lowercase field name")
        if len(name) < 64:
            k = (len(name) << 5) | ((name[0] | 0x20) & 31)
            slots[k] = (slots[k] or ()) + (name, act)
    return tuple(slots)


def scan_fields(data: bytes, i: int, end: int, names: dict, table: tuple, runs: bool) -> list | None:
    """The header fields of data[i:end] (CRLF-ended lines, data[end:end + 2] the blank line's CRLF)
    as [name, value, action, ...] (values without OWS; action: names' value for the lowercase name,
    else None; `table` is name_table(names)). With `runs`,
    consecutive fields without an action come as one [lines, None, None] of their raw bytes. None
    unless every line is `token ":" OWS value OWS` (obs-fold, space before the colon, a control
    character, a bare CR or LF: httptools decides those)."""
    if i < 0 or end + 2 > len(data) or data[end] != _CR or data[end + 1] != _LF or len(table) != 2048:
        raise ValueError("scan_fields: data[end:end + 2] is not the head's final CRLF")
    # Compiled, p, tchar, vchar and t are C pointers: each scan below stops at the CR that ends its
    # line, and data[end] is a CR, so no read goes past the head.
    tables = TCHAR
    tchar = tables
    tables2 = VCHAR
    vchar = tables2
    p = data
    out: list = []
    run = -1   # start of the current run of raw lines
    while i < end:
        s = i
        while tchar[p[i]]:
            i += 1
        n = i - s
        if n == 0 or p[i] != _COLON:
            return None
        act = None
        if n < 64:
            slot = table[(n << 5) | ((p[s] | 0x20) & 31)]
            if slot is not None:
                if COMPILED:
                    # The slot's names have this length: compared here, ASCII case folded as by
                    # bytes.lower(), with no bytes made, lowered and hashed for a dict lookup.
                    k = 0
                    while k < len(slot):
                        q = slot[k]
                        j = 0
                        while j < n:
                            c = p[s + j]
                            if 65 <= c <= 90:
                                c += 32
                            if c != q[j]:
                                break
                            j += 1
                        if j == n:
                            act = slot[k + 1]
                            break
                        k += 2
                else:
                    act = names.get(p[s:i].lower())
        ns = s
        i += 1
        c = p[i]
        while c == _SP or c == _HTAB:
            i += 1
            c = p[i]
        s = i
        while vchar[p[i]]:
            i += 1
        if p[i] != _CR or p[i + 1] != _LF:
            return None
        if act is None and runs:
            if run < 0:
                run = ns
        else:
            if run >= 0:
                out.append(p[run:ns])
                out.append(None)
                out.append(None)
                run = -1
            e = i
            c = p[e - 1]
            while e > s and (c == _SP or c == _HTAB):
                e -= 1
                c = p[e - 1]
            out.append(p[ns:ns + n])
            out.append(p[s:e])
            out.append(act)
        i += 2
    if run >= 0:
        out.append(p[run:end])
        out.append(None)
        out.append(None)
    return out


def head_end(data: bytes, start: int, stop: int) -> int:
    """data.find(b"\r\n\r\n", start, stop) for 0 <= start: where the blank line that ends a head
    starts, or -1. Compiled, libc's memchr from CR to CR (one per header line): no method lookup and
    no boxed bounds per call."""
    if start < 0:
        raise ValueError("head_end: start < 0")
    if not COMPILED:
        return data.find(b"\r\n\r\n", start, stop)
    n = len(data)
    if stop > n:
        stop = n
    p = data
    i = start
    last = stop - 4   # the last index where the four bytes fit
    while i <= last:
        hit = cython.cast("const char *", memchr(p + i, 13, last + 1 - i))  # noqa: F821 - a CR
        if hit == cython.NULL:
            return -1
        i = hit - p
        if p[i + 1] == 10 and p[i + 2] == 13 and p[i + 3] == 10:
            return i
        i += 1
    return -1


def cut(data: bytes, start: int, stop: int) -> bytes:
    """data[start:stop], for 0 <= start <= stop <= len(data): compiled, copied from a C pointer
    (PyBytes_FromStringAndSize) instead of through a slice object (PySequence_GetSlice)."""
    p = data
    return p[start:stop]


def decimal_value(value: bytes) -> int:
    """A Content-Length value (RFC 9110 8.6: 1*DIGIT), or -1."""
    n = len(value)
    if n == 0 or n > 18:   # 18 digits fit a C long long
        return -1
    p = value
    size = 0
    for i in range(n):
        c = p[i]
        if c < 48 or c > 57:
            return -1
        size = size * 10 + (c - 48)
    return size


def join(parts: list | tuple, size: int = -1) -> bytes:
    """b"".join(parts) of a list or tuple of bytes (`size`: their total length, when the caller
    has it). Compiled, the lengths are summed and the parts copied in C: bytes.join takes a buffer of
    each part first, which is most of its cost for the many short parts of a head."""
    if type(parts) is not list and type(parts) is not tuple:   # compiled: two pointer compares
        raise TypeError("join: the parts are not a list or a tuple")
    if not COMPILED:
        out = b"".join(parts)
        if size >= 0 and len(out) != size:
            raise ValueError("join: the parts are not size bytes long")
        return out
    # The parts are read as borrowed pointers of the sequence's array: no reference counting or
    # iterator per part (a head has four parts per header field). No Python code runs between the
    # two passes to change the sequence (allocating bytes starts no garbage collection).
    n = PySequence_Fast_GET_SIZE(parts)  # noqa: F821 - C API, compiled only
    items = PySequence_Fast_ITEMS(parts)  # noqa: F821
    total = 0
    for i in range(n):
        if not bytes_exact(items[i]):  # noqa: F821
            raise TypeError("join: a part is not bytes")   # as b"".join refuses it
        total += bytes_size(items[i])  # noqa: F821
    if size >= 0 and total != size:
        raise ValueError("join: the parts are not size bytes long")
    out = PyBytes_FromStringAndSize(cython.NULL, total)  # noqa: F821
    w = PyBytes_AS_STRING(out)  # noqa: F821
    at = 0
    for i in range(n):
        m = bytes_size(items[i])  # noqa: F821
        memcpy(w + at, bytes_data(items[i]), m)  # noqa: F821
        at += m
    return out


_HEX_DIGITS = b"0123456789abcdef"   # W3C Trace Context 3.2.2: ids are lowercase hex


def put_hex64(w: Any, v: int) -> None:
    """Compiled only: the 16 lowercase hex digits of the 64-bit `v` at w[0:16] (w a char pointer)."""
    digits = _HEX_DIGITS
    d = digits
    for k in range(15, -1, -1):
        w[k] = d[v & 15]
        v >>= 4



def bucket_of(ms: float) -> int:
    """bisect_left(DURATION_BOUNDS, ms): the duration bucket of `ms`, by a loop over the bounds (most
    requests stop at the first few; compiled, a C loop with no call)."""
    bounds = DURATION_BOUNDS
    n = len(bounds)
    for i in range(n):
        bound = bounds[i]
        if not bound < ms:   # as bisect_left compares (a NaN falls in the first bucket there too)
            return i
    return n


def monotonic() -> float:
    """time.monotonic(). Compiled, CLOCK_MONOTONIC (the clock time.monotonic reads on Linux) read into
    a C double: no call into the interpreter and no float object, several times per request."""
    if not COMPILED:
        return time.monotonic()
    ts = cython.declare("timespec")  # noqa: F821 - a C struct, compiled only
    clock_gettime(CLOCK_MONOTONIC, cython.address(ts))  # noqa: F821 - libc, compiled only
    ns = cython.declare(cython.longlong, ts.tv_sec * 1000000000 + ts.tv_nsec)
    return cython.cast(cython.double, ns) / 1e9   # as CPython turns its nanoseconds into seconds
