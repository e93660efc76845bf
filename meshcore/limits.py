"""The data path's resource limits against hostile or broken clients: sizes of a request head, time
to send one, idle and stalled connections, connections per listener, the gateway's request bodies.

Defaults follow Envoy where Envoy has one (header bytes and count); elsewhere they are chosen so that
a slowloris or a flood of idle connections ends in seconds to minutes while no sane client is cut.
Every limit is an environment variable, set on meshd (which passes the ones it has to the sidecars
and the gateway it creates) or on a node directly. Pure, standard library only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Mapping

from .durations import parse_duration

KIB = 1024
MIB = 1024 * KIB


@dataclass(frozen=True)
class Limits:
    """The limits one node applies to its downstream connections (0 for a timeout: none)."""

    max_header_bytes: int = 60 * KIB      # header names and values of one request (Envoy max_request_headers_kb)
    max_headers: int = 100                # header fields of one request (Envoy max_headers_count)
    max_request_line: int = 16 * KIB      # the request-target: 414 above it (RFC 9112 3; HAProxy's buffer)
    head_timeout: float = 10.0            # first byte of a request head to its end: 408 (slowloris)
    idle_timeout: float = 300.0           # a connection with no request for this long is closed
    body_timeout: float = 60.0            # no byte of a request body for this long: 408 (a stalled upload)
    max_connections: int = 4096           # open downstream connections per listener; more are reset
    gateway_max_body: int = 16 * MIB      # a request body through the gateway: 413 above it


DEFAULT_LIMITS = Limits()

# Environment variable -> field; sizes take a plain byte count or KiB / MiB, durations a unit (bare: s).
LIMIT_VARIABLES = {
    "MESH_MAX_HEADER_BYTES": "max_header_bytes",
    "MESH_MAX_HEADERS": "max_headers",
    "MESH_MAX_REQUEST_LINE": "max_request_line",
    "MESH_HEAD_TIMEOUT": "head_timeout",
    "MESH_IDLE_TIMEOUT": "idle_timeout",
    "MESH_BODY_TIMEOUT": "body_timeout",
    "MESH_MAX_CONNECTIONS": "max_connections",
    "MESH_GATEWAY_MAX_BODY": "gateway_max_body",
}
_SIZES = {"max_header_bytes", "max_request_line", "gateway_max_body"}
_SIZE = re.compile(r"([0-9]{1,12})\s*(kib|mib|k|m)?", re.I)
_UNITS = {None: 1, "k": KIB, "kib": KIB, "m": MIB, "mib": MIB}
# Floors: a limit below them would refuse ordinary requests (a browser's head is ~1 KiB, ~20 fields).
_MINIMUM = {"max_header_bytes": 1 * KIB, "max_headers": 8, "max_request_line": 256, "max_connections": 1,
            "gateway_max_body": 0}


class LimitError(ValueError):
    """A limit that is not valid; the message names the variable."""


def decode_size(raw: str) -> int:
    """Bytes from `65536`, `64KiB`, `64k`, `16MiB` or `16m` (case-insensitive); ValueError otherwise."""
    m = _SIZE.fullmatch(raw.strip())
    if m is None:
        raise ValueError(f"{raw!r} is not a size (bytes, or a number with KiB or MiB)")
    return int(m.group(1)) * _UNITS[m.group(2).lower() if m.group(2) else None]


def _decode(name: str, raw: str) -> int | float:
    if name.endswith("_timeout"):
        return parse_duration(raw, bare_seconds=True)
    if name in _SIZES:
        value = decode_size(raw)
    elif re.fullmatch(r"[0-9]{1,9}", raw.strip()):
        value = int(raw.strip())
    else:
        raise ValueError(f"{raw!r} is not a whole number")
    if value < _MINIMUM[name]:
        raise ValueError(f"{value} is below the minimum {_MINIMUM[name]}")
    return value


def limits_from_env(environ: Mapping[str, str], base: Limits = DEFAULT_LIMITS) -> Limits:
    """Limits from MESH_* variables (unset or empty: `base`'s); LimitError names a bad variable."""
    values = {}
    for var, name in LIMIT_VARIABLES.items():
        raw = environ.get(var, "")
        if not raw.strip():
            continue
        try:
            values[name] = _decode(name, raw)
        except ValueError as exc:
            raise LimitError(f"{var}: {exc}") from None
    return Limits(**{f.name: values.get(f.name, getattr(base, f.name)) for f in fields(Limits)})


def limits_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The limit variables set in `environ`, to hand on to the nodes meshd creates."""
    return {var: environ[var] for var in LIMIT_VARIABLES if environ.get(var, "").strip()}
