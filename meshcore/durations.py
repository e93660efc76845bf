"""The mesh's one duration grammar: a decimal number and a unit, `ms`, `s`, `m`, `h` or `d`.

Labels (`mesh.timeout=1d`, `mesh.fault.delay=50ms`), environment variables (`MESH_CERT_TTL=24h`) and
query parameters (`window=5m`) all read durations here. Units are case-insensitive and follow the
number directly (`250ms`, `1.5m`, `2D`); whitespace around the whole value is ignored. A bare number
means seconds only where the caller says so (environment variables and query parameters that took
seconds before units existed); a label needs its unit. Pure, standard library only.
"""

from __future__ import annotations

import math
import re

UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)?")
_EXAMPLES = "like 250ms, 2s, 1.5m, 1h, 1d"


def parse_duration(raw: str, *, bare_seconds: bool = False) -> float:
    """Seconds (>= 0) from `<number><unit>`; a bare number is seconds only when `bare_seconds`.
    Raises ValueError saying what is wrong (negative, unit missing, not a duration)."""
    text = (raw or "").strip().lower()
    m = _DURATION.fullmatch(text)
    if m is None:
        if text.startswith("-") and _DURATION.fullmatch(text[1:]):
            raise ValueError(f"{raw!r} is negative")
        raise ValueError(f"{raw!r} is not a duration ({_EXAMPLES})")
    number, unit = m.groups()
    if unit is None:
        if not bare_seconds:
            raise ValueError(f"{raw!r} needs a unit (ms, s, m, h or d)")
        unit = "s"
    seconds = float(number) * UNIT_SECONDS[unit]
    if not math.isfinite(seconds):   # float() makes hundreds of digits infinite
        raise ValueError(f"{raw[:20]!r}... is too long to be a duration")
    return seconds
