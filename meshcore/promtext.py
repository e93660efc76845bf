"""Prometheus text in, per-flow counter increases out: the Istio metrics of one node's `/metrics`.

Pure and standard library only: nothing here does I/O. meshd's scraper (meshd/metrics_hub.py) feeds it
each node's scrape; meshcore.flowstats keeps the deltas in windows.

1. `parse_scrape(text)` reads the Istio metrics of one node's `/metrics` (Prometheus text format
   0.0.4; label order, escaping, exponents, `+Inf`, timestamps and unrelated metrics are all fine)
   into a `Scrape`: counters summed per `FlowKey` = (reporter, source_workload, destination_service,
   destination_version, response_code). Labels we do not key on (source_version, destination_workload,
   request_protocol, response_flags) are summed away.
2. `scrape_delta(prev, cur)` is what happened between two scrapes of the same node. A counter that went
   down is a restart (Prometheus' reset rule: the new value is the increase). A series that appeared
   since `prev` counts whole. The first scrape of a node (prev None) is a baseline only.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import NamedTuple

from .protocol import NODE_START_TIME_METRIC

REQUESTS_TOTAL = "istio_requests_total"
DURATION = "istio_request_duration_milliseconds"
# Outlier ejections counted by the data plane, if it exposes them (any of these names; absent is fine).
# Labels used: destination_service (or cluster_name), destination_version when present.
EJECTION_METRICS = ("mesh_outlier_ejections_total", "mesh_sidecar_outlier_ejections_total",
                    "envoy_cluster_outlier_detection_ejections_enforced_total")
# Calls a sidecar's registry-only egress control blocked (sidecar.egress), by source_workload and
# destination (host:port): meshd raises `egress_blocked` events when they grow.
EGRESS_BLOCKED_METRIC = "mesh_sidecar_egress_blocked_total"
# The node process's start (wall clock, s): a node born after meshd began counted nothing from before
# meshd, so its first scrape is counted whole instead of being a baseline.
START_TIME = NODE_START_TIME_METRIC
_WANTED_PREFIXES = (REQUESTS_TOTAL, DURATION, START_TIME, EGRESS_BLOCKED_METRIC) + EJECTION_METRICS
UNKNOWN = "unknown"
INF = math.inf

MAX_LINE = 64 * 1024          # a longer exposition line is skipped
MAX_KEYS = 20_000             # distinct FlowKeys kept per scrape / per window slot


class FlowKey(NamedTuple):
    """What one request series is keyed by here."""

    reporter: str
    source: str
    service: str
    version: str
    code: str


# ---- parsing ----------------------------------------------------------------------------------

class ParseError(ValueError):
    """One exposition line that does not parse (parse_scrape skips such lines)."""


_PAIR = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"([^"\\]*(?:\\.[^"\\]*)*)"')
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*$")
_ESCAPE = re.compile(r"\\(.)")
_ESCAPES = {"\\": "\\", '"': '"', "n": "\n"}


def _unescape(value: str) -> str:
    return _ESCAPE.sub(lambda m: _ESCAPES.get(m.group(1), "\\" + m.group(1)), value) if "\\" in value else value


def parse_sample_line(line: str) -> tuple[str, dict[str, str], float]:
    """`name{a="1",b="x\\"y"} 3.5 [ts]` -> (name, labels, value); raises ParseError.

    The label set ends at the line's last `}` (neither value nor timestamp can hold one); pairs are
    read by one regular expression in any order, values unescaped (\\\\, \\", \\n).
    """
    brace = line.find("{")
    if brace < 0:
        parts = line.split()
        name, rest, labels = (parts[0] if parts else ""), parts[1:], {}
    else:
        close = line.rfind("}")
        if close < brace:
            raise ParseError("unterminated label set")
        name = line[:brace].rstrip()
        labels = {k: _unescape(v) for k, v in _PAIR.findall(line, brace + 1, close)}
        rest = line[close + 1:].split()
    if not _NAME.match(name):
        raise ParseError(f"bad metric name {name!r}")
    if not rest:
        raise ParseError("no value")
    try:
        value = float(rest[0])  # float() reads +Inf, -Inf, NaN, 1e3
    except ValueError:
        raise ParseError(f"bad value {rest[0]!r}") from None
    return name, labels, value


def _le(raw: str) -> float:
    return float(raw)  # "+Inf" -> inf; "0.5", "1.0", "1e3" all fine


@dataclass
class Hist:
    """A histogram (or its increase): cumulative counts by upper bound, sum and count."""

    buckets: dict[float, float] = field(default_factory=dict)
    sum: float = 0.0
    count: float = 0.0

    def add(self, other: "Hist") -> None:
        for le, c in other.buckets.items():
            self.buckets[le] = self.buckets.get(le, 0.0) + c
        self.sum += other.sum
        self.count += other.count


@dataclass
class Scrape:
    """The Istio request metrics of one node (absolute counters), or the increase between two."""

    requests: dict[FlowKey, float] = field(default_factory=dict)
    hists: dict[FlowKey, Hist] = field(default_factory=dict)
    ejections: dict[tuple[str, str], float] = field(default_factory=dict)  # (service, version) -> n
    started: float | None = None   # the node's START_TIME, when it exposes one
    egress_blocked: dict[tuple[str, str], float] = field(default_factory=dict)  # (source, destination) -> n

    def empty(self) -> bool:
        return not self.requests and not self.hists and not self.ejections and not self.egress_blocked


def _flow(labels: dict[str, str]) -> FlowKey:
    g = labels.get
    return FlowKey(g("reporter") or UNKNOWN, g("source_workload") or UNKNOWN, g("destination_service") or UNKNOWN,
                   g("destination_version") or UNKNOWN, g("response_code") or "0")


def parse_scrape(text: str, max_keys: int = MAX_KEYS) -> Scrape:
    """The metrics we need from a Prometheus text exposition; bad or foreign lines are skipped."""
    out = Scrape()
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] == "#" or len(line) > MAX_LINE or not line.startswith(_WANTED_PREFIXES):
            continue
        try:
            name, labels, value = parse_sample_line(line)
        except ParseError:
            continue
        if math.isnan(value):
            continue
        if name == START_TIME:
            out.started = value
        elif name == REQUESTS_TOTAL:
            key = _flow(labels)
            if key in out.requests or len(out.requests) < max_keys:
                out.requests[key] = out.requests.get(key, 0.0) + value
        elif name.startswith(DURATION):
            suffix = name[len(DURATION):]
            if suffix not in ("_bucket", "_sum", "_count"):
                continue
            key = _flow(labels)
            hist = out.hists.get(key)
            if hist is None:
                if len(out.hists) >= max_keys:
                    continue
                hist = out.hists[key] = Hist()
            if suffix == "_bucket":
                try:
                    le = _le(labels.get("le", ""))
                except ValueError:
                    continue
                hist.buckets[le] = hist.buckets.get(le, 0.0) + value
            elif suffix == "_sum":
                hist.sum += value
            else:
                hist.count += value
        elif name in EJECTION_METRICS:
            svc = labels.get("destination_service") or _cluster_service(labels.get("cluster_name", ""))
            key2 = (svc or UNKNOWN, labels.get("destination_version") or "")
            _add_capped(out.ejections, key2, value, max_keys)
        elif name == EGRESS_BLOCKED_METRIC:
            key2 = (labels.get("source_workload") or UNKNOWN, labels.get("destination") or UNKNOWN)
            _add_capped(out.egress_blocked, key2, value, max_keys)
    return out


def _add_capped(counts: dict, key, value: float, max_keys: int) -> None:
    if key in counts or len(counts) < max_keys:
        counts[key] = counts.get(key, 0.0) + value


def _cluster_service(cluster: str) -> str:
    # Envoy cluster names look like "outbound|8080|v1|catalog.default.svc.cluster.local".
    parts = cluster.split("|")
    return parts[-1].split(".")[0] if parts and parts[-1] else ""


def scrape_delta(prev: Scrape | None, cur: Scrape, watched_since: float | None = None) -> Scrape:
    """What happened between two scrapes of one node. With no `prev`: everything, if the node
    started at or after `watched_since` (wall clock: all of it happened while meshd watched),
    else nothing (a baseline: counts from before meshd watched are not a burst of now)."""
    out = Scrape()
    if prev is None:
        if watched_since is None or cur.started is None or cur.started < watched_since:
            return out
        prev = Scrape()
    for key, value in cur.requests.items():
        before = prev.requests.get(key, 0.0)
        d = value - before if value >= before else value  # reset: the process restarted
        if d > 0:
            out.requests[key] = d
    for key, hist in cur.hists.items():
        old = prev.hists.get(key)
        if old is not None and hist.count >= old.count and hist.sum >= old.sum:
            if hist.count == old.count:
                continue
            d = Hist(buckets={le: max(0.0, c - old.buckets.get(le, 0.0)) for le, c in hist.buckets.items()},
                     sum=hist.sum - old.sum, count=hist.count - old.count)
        else:  # new series, or a reset
            if hist.count <= 0:
                continue
            d = Hist(buckets=dict(hist.buckets), sum=hist.sum, count=hist.count)
        out.hists[key] = d
    for mine, theirs, into in ((cur.ejections, prev.ejections, out.ejections),
                               (cur.egress_blocked, prev.egress_blocked, out.egress_blocked)):
        for key, value in mine.items():
            before = theirs.get(key, 0.0)
            d = value - before if value >= before else value
            if d > 0:
                into[key] = d
    return out
