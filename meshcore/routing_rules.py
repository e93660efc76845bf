"""Live traffic rules set with `meshctl` (stored in meshd, pushed in snapshots); pure, stdlib only.

Per destination service: ordered header/path routes to a version, a weighted split across versions,
fault injection and mirroring. `validate_*` build the typed rules from user input (ValueError with a
message meant for the CLI); `choose_version` decides per request; `encode_rules` / `decode_rules` are the
JSON wire form (decode re-validates everything except that versions exist, since instances come and go).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

from .durations import parse_duration
from .resilience import pick_weighted

_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")   # as meshcore.labels
_TOKEN_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")          # RFC 9110 field name


@dataclass(frozen=True)
class Split:
    service: str
    weights: tuple[tuple[str, int], ...]   # (version, weight), weights sum to 100


@dataclass(frozen=True)
class RouteRule:
    match_headers: tuple[tuple[str, str], ...]   # (lower-case name, exact value); all must match
    path_prefix: str | None
    to_version: str


@dataclass(frozen=True)
class Fault:
    abort_percent: float = 0.0
    abort_status: int | None = None
    delay_percent: float = 0.0
    delay_s: float = 0.0


@dataclass(frozen=True)
class Mirror:
    to_version: str
    percent: float = 100.0


@dataclass(frozen=True)
class ServiceRules:
    service: str
    routes: tuple[RouteRule, ...] = ()
    split: Split | None = None
    fault: Fault | None = None
    mirror: Mirror | None = None


# ---- validation (user input) -------------------------------------------------------------------

def _check_version(version: Any, known_versions: Iterable[str] | None, service: str, what: str) -> str:
    if not isinstance(version, str) or not _VERSION_RE.match(version):
        raise ValueError(f"{what}: {version!r} is not a version name")
    if known_versions is not None:
        known = sorted(known_versions)
        if version not in known:
            raise ValueError(f"{what}: {service} has no version {version!r} (known: {', '.join(known) or 'none'})")
    return version


def _percent(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what}: {value!r} is not a number")
    if not 0 <= value <= 100:
        raise ValueError(f"{what}: {value} is outside 0..100")
    return float(value)


def _parse_percent(text: str, what: str) -> float:
    body = text.strip().removesuffix("%").strip()
    if not re.fullmatch(r"[0-9]+(\.[0-9]+)?", body):
        raise ValueError(f"{what}: {text!r} is not a percentage 0..100")
    return _percent(float(body), what)


def validate_split(service: str, weights: Iterable[tuple[str, int]] | Mapping[str, int],
                   known_versions: Iterable[str] | None) -> Split:
    """A Split from (version, weight) pairs: int weights 0..100 summing to 100, known versions, no
    duplicates. known_versions None skips the existence check (decoding from the wire)."""
    pairs = list(weights.items()) if isinstance(weights, Mapping) else list(weights)
    if not pairs:
        raise ValueError(f"split of {service}: no versions given")
    known = None if known_versions is None else list(known_versions)
    seen: set[str] = set()
    out = []
    for version, weight in pairs:
        _check_version(version, known, service, f"split of {service}")
        if version in seen:
            raise ValueError(f"split of {service}: version {version!r} appears twice")
        seen.add(version)
        if isinstance(weight, bool) or not isinstance(weight, int):
            raise ValueError(f"split of {service}: weight of {version} must be a whole number, got {weight!r}")
        if not 0 <= weight <= 100:
            raise ValueError(f"split of {service}: weight of {version} is {weight}, outside 0..100")
        out.append((version, weight))
    total = sum(w for _, w in out)
    if total != 100:
        shown = " + ".join(str(w) for _, w in out)
        raise ValueError(f"split of {service}: weights must sum to 100, got {shown} = {total}")
    return Split(service=service, weights=tuple(out))


def parse_split_args(args: Sequence[str]) -> list[tuple[str, int]]:
    """["v1=90", "v2=10"] (a trailing % is allowed) -> [("v1", 90), ("v2", 10)]; ValueError otherwise."""
    out = []
    for arg in args:
        version, sep, weight = arg.partition("=")
        weight = weight.strip().removesuffix("%").strip()
        if not sep or not version.strip() or not re.fullmatch(r"[0-9]+", weight):
            raise ValueError(f"{arg!r} is not version=weight (like v1=90)")
        out.append((version.strip(), int(weight)))
    return out


def _header_pairs(match_headers: Iterable[tuple[str, str] | str]) -> tuple[tuple[str, str], ...]:
    out = []
    for item in match_headers:
        if isinstance(item, str):
            name, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"header match {item!r} is not name=value (like x-canary=1)")
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            name, value = item
        else:
            raise ValueError(f"header match {item!r} is not a (name, value) pair")
        if not isinstance(name, str) or not isinstance(value, str):
            raise ValueError(f"header match {item!r}: name and value must be strings")
        name = name.strip().lower()
        if not _TOKEN_RE.match(name):
            raise ValueError(f"header match {item!r}: {name!r} is not a header name")
        if any(n == name for n, _ in out):
            raise ValueError(f"header match: {name!r} appears twice")
        out.append((name, value.strip()))
    return tuple(out)


def validate_route(service: str, to_version: str, known_versions: Iterable[str] | None,
                   match_headers: Iterable[tuple[str, str] | str] = (),
                   path_prefix: str | None = None) -> RouteRule:
    """A RouteRule: requests matching every header (exact value, name case-insensitive) and the path
    prefix go to `to_version`. Headers as ("name", "value") pairs or "name=value" strings. A rule with
    no condition sends everything to the version."""
    version = _check_version(to_version, known_versions, service, f"route of {service}")
    headers = _header_pairs(match_headers)
    if path_prefix is not None:
        if not isinstance(path_prefix, str) or not path_prefix.startswith("/") or any(c.isspace() for c in path_prefix):
            raise ValueError(f"route of {service}: path prefix {path_prefix!r} must start with '/' and have no spaces")
    return RouteRule(match_headers=headers, path_prefix=path_prefix, to_version=version)


def validate_fault(abort: str | None = None, delay: str | None = None) -> Fault:
    """A Fault from `percent:status` (abort, e.g. "50:503") and/or `percent:duration` (delay, "10:1s")."""
    if abort is None and delay is None:
        raise ValueError("fault: give an abort (like 50:503) and/or a delay (like 10:1s)")
    abort_percent, abort_status, delay_percent, delay_s = 0.0, None, 0.0, 0.0
    if abort is not None:
        pct, sep, status = abort.partition(":")
        if not sep:
            raise ValueError(f"fault abort: {abort!r} is not percent:status (like 50:503)")
        abort_percent = _parse_percent(pct, "fault abort percent")
        if not re.fullmatch(r"[0-9]{3}", status.strip()):
            raise ValueError(f"fault abort: {status!r} is not an HTTP status")
        abort_status = int(status.strip())
        if not 400 <= abort_status <= 599:
            raise ValueError(f"fault abort: status {abort_status} is not an error status (400..599)")
    if delay is not None:
        pct, sep, duration = delay.partition(":")
        if not sep:
            raise ValueError(f"fault delay: {delay!r} is not percent:duration (like 10:1s)")
        delay_percent = _parse_percent(pct, "fault delay percent")
        try:
            delay_s = parse_duration(duration)
        except ValueError as exc:
            raise ValueError(f"fault delay: {exc}") from None
        if delay_s <= 0:
            raise ValueError(f"fault delay: {duration!r} must be more than zero")
    return Fault(abort_percent=abort_percent, abort_status=abort_status, delay_percent=delay_percent,
                 delay_s=delay_s)


def validate_mirror(service: str, to_version: str, known_versions: Iterable[str] | None,
                    percent: float | str = 100.0) -> Mirror:
    """A Mirror: copy `percent` of requests to `to_version` (fire and forget, responses dropped)."""
    version = _check_version(to_version, known_versions, service, f"mirror of {service}")
    value = _parse_percent(percent, "mirror percent") if isinstance(percent, str) else _percent(percent, "mirror percent")
    return Mirror(to_version=version, percent=value)


# ---- per-request decision ----------------------------------------------------------------------

def choose_version(rules: ServiceRules | None, headers_lookup: Callable[[str], str | None], path: str,
                   rand: float) -> str | None:
    """The version this request should go to; None = no preference (any endpoint).

    Route rules in order, first match wins; then the split by weight (`rand` in [0, 1)).
    `headers_lookup` is called with lower-case header names and must look up case-insensitively (the
    shell keeps request header names lower-cased). Values compare exactly. The returned version may
    have no endpoints right now; the caller decides (503 UH, like Istio with an empty subset).
    """
    if rules is None:
        return None
    for route in rules.routes:
        prefix = route.path_prefix
        if prefix is not None and not path.startswith(prefix):
            continue
        for name, value in route.match_headers:
            if headers_lookup(name) != value:
                break
        else:
            return route.to_version
    split = rules.split
    if split is not None:
        return pick_weighted(split.weights, rand)
    return None


def choose_mirror(rules: ServiceRules | None, rand: float) -> str | None:
    """The version to mirror this request to, or None."""
    if rules is None or rules.mirror is None:
        return None
    mirror = rules.mirror
    return mirror.to_version if rand * 100.0 < mirror.percent else None


# ---- wire form ---------------------------------------------------------------------------------

def encode_rules(rules: ServiceRules) -> dict[str, Any]:
    """The JSON-ready form of one service's rules."""
    return {
        "service": rules.service,
        "routes": [{"match_headers": [[n, v] for n, v in r.match_headers], "path_prefix": r.path_prefix,
                    "to_version": r.to_version} for r in rules.routes],
        "split": None if rules.split is None else {"weights": [[v, w] for v, w in rules.split.weights]},
        "fault": None if rules.fault is None else {
            "abort_percent": rules.fault.abort_percent, "abort_status": rules.fault.abort_status,
            "delay_percent": rules.fault.delay_percent, "delay_s": rules.fault.delay_s},
        "mirror": None if rules.mirror is None else {"to_version": rules.mirror.to_version,
                                                     "percent": rules.mirror.percent},
    }


def _get(obj: Any, key: str, where: str, kinds: type | tuple, optional: bool = False) -> Any:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected an object")
    if key not in obj:
        if optional:
            return None
        raise ValueError(f"{where}.{key}: missing")
    value = obj[key]
    if value is None and optional:
        return None
    if not isinstance(value, kinds) or isinstance(value, bool):  # JSON true is not a number
        raise ValueError(f"{where}.{key}: expected {getattr(kinds, '__name__', kinds)}, got {type(value).__name__}")
    return value


def _rewrap(where: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def decode_rules(data: Any) -> ServiceRules:
    """ServiceRules from the wire form; raises ValueError naming the field (e.g. `rules.split.weights`)."""
    where = "rules"
    service = _get(data, "service", where, str)
    routes = []
    for i, raw in enumerate(_get(data, "routes", where, list, optional=True) or []):
        w = f"{where}.routes[{i}]"
        headers = _get(raw, "match_headers", w, list, optional=True) or []
        for j, pair in enumerate(headers):
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                raise ValueError(f"{w}.match_headers[{j}]: expected [name, value] strings")
        path_prefix = _get(raw, "path_prefix", w, str, optional=True)
        to_version = _get(raw, "to_version", w, str)
        routes.append(_rewrap(w, lambda: validate_route(service, to_version, None,
                                                        [tuple(p) for p in headers], path_prefix)))
    split = None
    raw_split = _get(data, "split", where, dict, optional=True)
    if raw_split is not None:
        w = f"{where}.split.weights"
        raw_weights = _get(raw_split, "weights", f"{where}.split", list)
        pairs = []
        for j, pair in enumerate(raw_weights):
            if not (isinstance(pair, list) and len(pair) == 2):
                raise ValueError(f"{w}[{j}]: expected [version, weight]")
            pairs.append((pair[0], pair[1]))
        split = _rewrap(w, lambda: validate_split(service, pairs, None))
    fault = None
    raw_fault = _get(data, "fault", where, dict, optional=True)
    if raw_fault is not None:
        w = f"{where}.fault"
        abort_percent = _rewrap(f"{w}.abort_percent", lambda: _percent(
            _get(raw_fault, "abort_percent", w, (int, float)), "abort_percent"))
        status = _get(raw_fault, "abort_status", w, int, optional=True)
        if status is not None and not 400 <= status <= 599:
            raise ValueError(f"{w}.abort_status: {status} is not an error status (400..599)")
        delay_percent = _rewrap(f"{w}.delay_percent", lambda: _percent(
            _get(raw_fault, "delay_percent", w, (int, float)), "delay_percent"))
        delay_s = _get(raw_fault, "delay_s", w, (int, float))
        if not math.isfinite(delay_s) or delay_s < 0:
            raise ValueError(f"{w}.delay_s: {delay_s!r} must be a duration in seconds >= 0")
        fault = Fault(abort_percent=abort_percent, abort_status=status, delay_percent=delay_percent,
                      delay_s=float(delay_s))
    mirror = None
    raw_mirror = _get(data, "mirror", where, dict, optional=True)
    if raw_mirror is not None:
        w = f"{where}.mirror"
        to_version = _get(raw_mirror, "to_version", w, str)
        percent = _get(raw_mirror, "percent", w, (int, float))
        mirror = _rewrap(w, lambda: validate_mirror(service, to_version, None, percent))
    return ServiceRules(service=service, routes=tuple(routes), split=split, fault=fault, mirror=mirror)
