"""Mesh telemetry math: Prometheus text in, rates / success / percentiles / anomalies / verdicts out.

Pure and standard library only: nothing here does I/O, sleeps or reads a clock; every function that
needs the time takes `now` (seconds, any monotonic origin). meshd's scraper (meshd/telemetry.py)
feeds it; the tests drive it with a fake clock.

Pipeline
--------
1. `parse_scrape(text)` reads the Istio metrics of one node's `/metrics` (Prometheus text format
   0.0.4; label order, escaping, exponents, `+Inf`, timestamps and unrelated metrics are all fine)
   into a `Scrape`: counters summed per `FlowKey` = (reporter, source_workload, destination_service,
   destination_version, response_code). Labels we do not key on (source_version, destination_workload,
   request_protocol, response_flags) are summed away.
2. `scrape_delta(prev, cur)` is what happened between two scrapes of the same node. A counter that went
   down is a restart (Prometheus' reset rule: the new value is the increase). A series that appeared
   since `prev` counts whole. The first scrape of a node (prev None) is a baseline only.
3. `Window` keeps deltas in time slots (`resolution_s`) for `horizon_s`, bounded in slots and keys;
   `window.select(now, span_s)` merges the slots of the last `span_s` seconds.
4. `dedupe_reporters` keeps one view per flow (source, service, version): every mesh hop is reported
   twice (by the caller's outbound sidecar or the gateway as reporter="source", by the callee's inbound
   sidecar as reporter="destination"). The caller's view wins when present (it also sees connect
   failures, ejections and circuit-breaker 503s that never reach the callee, like Kiali's graph);
   requests from outside the mesh have only the destination view.
5. `by_service_version`, `by_service`, `by_edge` group flows; `summarize` gives `Stats`: requests,
   rps, success rate (non-5xx, Istio's definition: response_code !~ "5.."), p50/p90/p99 by
   `histogram_quantile` (Prometheus' algorithm, linear interpolation inside buckets).

Anomalies and decisions (pure state machines: state in, (state, output) out)
----------------------------------------------------------------------------
- `detect_error_spike`: error rate >= threshold (20%) on at least `min_requests` requests; it clears
  after the rate stays below `threshold * clear_ratio` (half) for `recovery_s` (hysteresis).
- `detect_latency_jump`: p99 > k (3) x baseline, where the baseline is a slow moving average of p99
  learnt only while healthy (floored at `floor_ms` so sub-millisecond noise does not alert); clears
  when p99 < clear_k (2) x baseline for `recovery_s`.
- `decide_adaptive_policy`: the control loop. When a destination service's error rate (all versions,
  worse of its callers' and its own view) reaches MESH_TIGHTEN_ERROR_RATE (default 0.4) on at least
  `min_requests` requests, and the lower bound of its 95% Wilson score interval does too (a service
  failing 30% is not tightened because its first 20 requests happened to fail 40%: the tight policy
  ejects a lone instance after two errors in a row, an outage where retries had kept checkouts
  going), meshd tightens its outlier detection (TIGHT_OVERRIDES); when the rate then stays below the
  threshold for `recovery_s` (default 60 s) it relaxes back to the service's own labels.
  TIGHT_OVERRIDES (only ever tighter than the service's labels, see `merge_policy_overrides`):
    mesh.outlier.consecutive-5xx       5  -> 2    eject a failing endpoint after 2 errors in a row
    mesh.outlier.base-ejection         30s -> 10s  but for a shorter time: with the eager threshold a
                                                   healthy endpoint that was unlucky comes back soon
    mesh.outlier.max-ejection-percent  10% -> 50%  let up to half of the endpoints be ejected (a bad
                                                   canary version is often that half)
  A mechanism the service's labels turned off (consecutive-5xx=off) stays off. Circuit-breaker limits
  are not touched: meshd cannot know a service's capacity.
- `compare_versions`: two versions' Stats side by side and one verdict line.
"""

from __future__ import annotations

import math
import re
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable, NamedTuple

from .protocol import NODE_START_TIME_METRIC

REQUESTS_TOTAL = "istio_requests_total"
DURATION = "istio_request_duration_milliseconds"
# Outlier ejections counted by the data plane, if it exposes them (any of these names; absent is fine).
# Labels used: destination_service (or cluster_name), destination_version when present.
EJECTION_METRICS = ("mesh_outlier_ejections_total", "mesh_sidecar_outlier_ejections_total",
                    "envoy_cluster_outlier_detection_ejections_enforced_total")
# The node process's start (wall clock, s): a node born after meshd began counted nothing from before
# meshd, so its first scrape is counted whole instead of being a baseline.
START_TIME = NODE_START_TIME_METRIC
_WANTED_PREFIXES = (REQUESTS_TOTAL, DURATION, START_TIME) + EJECTION_METRICS
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

    def empty(self) -> bool:
        return not self.requests and not self.hists and not self.ejections


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
            if key2 in out.ejections or len(out.ejections) < max_keys:
                out.ejections[key2] = out.ejections.get(key2, 0.0) + value
    return out


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
    for key, value in cur.ejections.items():
        before = prev.ejections.get(key, 0.0)
        d = value - before if value >= before else value
        if d > 0:
            out.ejections[key] = d
    return out


# ---- quantiles --------------------------------------------------------------------------------

def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' histogram_quantile over cumulative `buckets` {upper bound: count}; None if empty.

    Linear interpolation inside the bucket holding the rank (the first bucket starts at 0); a rank
    in the +Inf bucket gives the highest finite bound. Non-monotonic counts (scrapes that raced) are
    made monotonic first, as Prometheus does.
    """
    if not buckets or INF not in buckets:
        return None
    if q < 0:
        return -INF
    if q > 1:
        return INF
    bounds = sorted(buckets)
    counts = []
    top = 0.0
    for b in bounds:
        top = max(top, buckets[b])
        counts.append(top)
    total = counts[-1]
    if total <= 0 or len(bounds) < 2:
        return None
    rank = q * total
    b = len(bounds) - 1
    for i in range(len(bounds) - 1):
        if counts[i] >= rank:
            b = i
            break
    if b == len(bounds) - 1:
        return bounds[-2]
    if b == 0 and bounds[0] <= 0:
        return bounds[0]
    start, end, count = 0.0, bounds[b], counts[b]
    if b > 0:
        start = bounds[b - 1]
        count -= counts[b - 1]
        rank -= counts[b - 1]
    if count <= 0:
        return end
    return start + (end - start) * (rank / count)


# ---- windows ----------------------------------------------------------------------------------

@dataclass
class Acc:
    """Accumulated increase of one flow over some slots."""

    requests: float = 0.0
    errors: float = 0.0
    hist: Hist = field(default_factory=Hist)

    def add(self, other: "Acc") -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.hist.add(other.hist)


def is_error(code: str) -> bool:
    """A 5xx response (Istio's success rate counts everything else as a success)."""
    return len(code) == 3 and code[0] == "5"


def _accs_of(delta: Scrape) -> dict[FlowKey, Acc]:
    out: dict[FlowKey, Acc] = {}
    for key, n in delta.requests.items():
        acc = out.setdefault(key, Acc())
        acc.requests += n
        if is_error(key.code):
            acc.errors += n
    for key, hist in delta.hists.items():
        out.setdefault(key, Acc()).hist.add(hist)
    return out


class Window:
    """Deltas of every node in time slots; bounded by `horizon_s / resolution_s` slots and `max_keys`."""

    def __init__(self, horizon_s: float = 300.0, resolution_s: float = 2.0, max_keys: int = 5000):
        self.horizon_s = horizon_s
        self.resolution_s = resolution_s
        self.max_keys = max_keys
        self.slots: deque[tuple[float, dict[FlowKey, Acc], dict[tuple[str, str], float]]] = deque()  # (end, ...)
        self.covered_from: float | None = None  # the start of the oldest interval still in the window

    def add(self, now: float, delta: Scrape, since: float | None = None) -> None:
        """Merge the increase seen at `now` (over the interval starting at `since`)."""
        self.evict(now)
        # A slot is named by its end: an increase seen at `now` happened in the slot ending at or after it.
        end = math.ceil(now / self.resolution_s) * self.resolution_s
        if not self.slots or self.slots[-1][0] != end:
            self.slots.append((end, {}, {}))
        _, accs, ejections = self.slots[-1]
        for key, acc in _accs_of(delta).items():
            mine = accs.get(key)
            if mine is None:
                if len(accs) >= self.max_keys:
                    continue
                mine = accs[key] = Acc()
            mine.add(acc)
        for key, n in delta.ejections.items():
            ejections[key] = ejections.get(key, 0.0) + n
        begin = since if since is not None else now
        if self.covered_from is None or begin < self.covered_from:
            self.covered_from = begin

    def evict(self, now: float) -> None:
        """Drop slots older than the horizon."""
        while self.slots and self.slots[0][0] <= now - self.horizon_s:
            self.slots.popleft()
        if self.covered_from is not None and self.covered_from < now - self.horizon_s:
            self.covered_from = now - self.horizon_s

    def span(self, now: float, span_s: float) -> float:
        """The seconds a rate over the last `span_s` divides by (less just after start)."""
        span_s = min(span_s, self.horizon_s)
        if self.covered_from is None:
            return span_s
        return max(self.resolution_s, min(span_s, now - self.covered_from))

    def select(self, now: float, span_s: float) -> dict[FlowKey, Acc]:
        """Every flow's increase over the last `span_s` seconds (fresh objects)."""
        cutoff = now - min(span_s, self.horizon_s)
        out: dict[FlowKey, Acc] = {}
        for end, accs, _ in self.slots:
            if end <= cutoff:
                continue
            for key, acc in accs.items():
                mine = out.get(key)
                if mine is None:
                    mine = out[key] = Acc()
                mine.add(acc)
        return out

    def ejections(self, now: float, span_s: float) -> dict[tuple[str, str], float]:
        """Outlier ejections over the last `span_s` seconds by (service, version)."""
        cutoff = now - min(span_s, self.horizon_s)
        out: dict[tuple[str, str], float] = {}
        for end, _, ej in self.slots:
            if end <= cutoff:
                continue
            for key, n in ej.items():
                out[key] = out.get(key, 0.0) + n
        return out


def dedupe_reporters(flows: dict[FlowKey, Acc]) -> dict[FlowKey, Acc]:
    """One view per (source, service, version): the caller's (reporter="source") when present."""
    has_source = {(k.source, k.service, k.version) for k in flows if k.reporter == "source"}
    return {k: a for k, a in flows.items()
            if k.reporter == "source" or (k.source, k.service, k.version) not in has_source}


def group(flows: dict[FlowKey, Acc], key: Callable[[FlowKey], tuple]) -> dict[tuple, Acc]:
    """Flows merged by `key(flow)`."""
    out: dict[tuple, Acc] = {}
    for k, acc in flows.items():
        g = key(k)
        mine = out.get(g)
        if mine is None:
            mine = out[g] = Acc()
        mine.add(acc)
    return out


def dedupe_worst(flows: dict[FlowKey, Acc]) -> dict[FlowKey, Acc]:
    """One view per (source, service, version) for health: the reporter with the higher error ratio.

    Retries hide a failing service from its callers (their view counts the final answer) while its
    own inbound sidecars see every failed try; connect failures and ejections are seen only by the
    callers. Alarms and the control loop look at whichever view is worse.
    """
    totals: dict[tuple, list[float]] = {}
    for k, a in flows.items():
        t = totals.setdefault((k.source, k.service, k.version, k.reporter), [0.0, 0.0])
        t[0] += a.requests
        t[1] += a.errors
    chosen: dict[tuple, str] = {}
    for (src, svc, ver, rep), (req, err) in totals.items():
        triple = (src, svc, ver)
        ratio = err / req if req else 0.0
        best = chosen.get(triple)
        if best is None:
            chosen[triple] = rep
            continue
        breq, berr = totals[(src, svc, ver, best)]
        bratio = berr / breq if breq else 0.0
        if ratio > bratio or (ratio == bratio and rep == "source"):
            chosen[triple] = rep
    return {k: a for k, a in flows.items() if chosen.get((k.source, k.service, k.version)) == k.reporter}


def health_by_service_version(flows: dict[FlowKey, Acc]) -> dict[tuple, Acc]:
    """(service, version) -> Acc from the worse view of each flow (for alarms)."""
    return group(dedupe_worst(flows), lambda k: (k.service, k.version))


def health_by_service(flows: dict[FlowKey, Acc]) -> dict[tuple, Acc]:
    """(service,) -> Acc from the worse view of each flow (for the control loop)."""
    return group(dedupe_worst(flows), lambda k: (k.service,))


def by_service_version(flows: dict[FlowKey, Acc]) -> dict[tuple, Acc]:
    """(service, version) -> Acc, one view per request."""
    return group(dedupe_reporters(flows), lambda k: (k.service, k.version))


def by_service(flows: dict[FlowKey, Acc]) -> dict[tuple, Acc]:
    """(service,) -> Acc over all versions, one view per request."""
    return group(dedupe_reporters(flows), lambda k: (k.service,))


def by_edge(flows: dict[FlowKey, Acc]) -> dict[tuple, Acc]:
    """(source workload, destination service) -> Acc, one view per request."""
    return group(dedupe_reporters(flows), lambda k: (k.source, k.service))


@dataclass(frozen=True)
class Stats:
    """RED figures of one group over one window."""

    requests: float = 0.0
    errors: float = 0.0
    span_s: float = 0.0
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None
    mean_ms: float | None = None

    @property
    def rps(self) -> float:
        return self.requests / self.span_s if self.span_s > 0 else 0.0

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests > 0 else None

    @property
    def success_rate(self) -> float | None:
        return 1.0 - self.errors / self.requests if self.requests > 0 else None

    def to_dict(self) -> dict:
        """JSON form (rounded)."""
        def r(x, nd=3):
            return None if x is None else round(x, nd)
        return {"requests": int(round(self.requests)), "errors": int(round(self.errors)),
                "rps": r(self.rps), "success_rate": r(self.success_rate, 4), "error_rate": r(self.error_rate, 4),
                "p50_ms": r(self.p50), "p90_ms": r(self.p90), "p99_ms": r(self.p99), "mean_ms": r(self.mean_ms),
                "window_s": r(self.span_s, 1)}


def summarize(acc: Acc | None, span_s: float) -> Stats:
    """Stats of an accumulated increase over `span_s` seconds."""
    if acc is None:
        return Stats(span_s=span_s)
    b = acc.hist.buckets
    mean = acc.hist.sum / acc.hist.count if acc.hist.count > 0 else None
    return Stats(requests=acc.requests, errors=acc.errors, span_s=span_s,
                 p50=histogram_quantile(0.5, b), p90=histogram_quantile(0.9, b), p99=histogram_quantile(0.99, b),
                 mean_ms=mean)


# ---- anomaly detection ------------------------------------------------------------------------

@dataclass(frozen=True)
class SpikeConfig:
    threshold: float = 0.2        # error rate that raises the alarm
    min_requests: int = 20        # fewer requests in the window decide nothing
    clear_ratio: float = 0.5      # cleared below threshold * clear_ratio ...
    recovery_s: float = 10.0      # ... held this long


@dataclass(frozen=True)
class AlarmState:
    """One alarm's state (error spike or latency jump)."""

    active: bool = False
    since: float | None = None        # when it went active
    clear_since: float | None = None  # when the value first went back under the clear level
    baseline: float | None = None     # latency only: learnt healthy p99 (ms)
    samples: int = 0                  # latency only: healthy observations in the baseline


@dataclass(frozen=True)
class Alarm:
    """An alarm edge: raised or cleared, with a message for people."""

    kind: str          # "error_rate_spike" | "error_rate_recovered" | "latency_jump" | "latency_recovered"
    message: str
    value: float | None = None


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.1f}%"


def fmt_ms(x: float | None) -> str:
    """`180 ms`, `2.5 ms`, `-`."""
    if x is None:
        return "-"
    return f"{x:.0f} ms" if x >= 10 else f"{x:.1f} ms"


def _hold(state: AlarmState, ok: bool, now: float, recovery_s: float) -> tuple[AlarmState, bool]:
    """Hysteresis: (new state, recovered?) for an active alarm whose value is `ok` or not."""
    if not ok:
        return replace(state, clear_since=None), False
    since = state.clear_since if state.clear_since is not None else now
    if now - since >= recovery_s:
        return replace(state, active=False, since=None, clear_since=None), True
    return replace(state, clear_since=since), False


def detect_error_spike(state: AlarmState, stats: Stats, now: float, what: str,
                       cfg: SpikeConfig = SpikeConfig()) -> tuple[AlarmState, Alarm | None]:
    """Error-rate spike with hysteresis; `what` names the subject in messages (e.g. "catalog v2")."""
    enough = stats.requests >= cfg.min_requests
    rate = stats.error_rate or 0.0
    if not state.active:
        if enough and rate >= cfg.threshold:
            return (replace(state, active=True, since=now, clear_since=None),
                    Alarm("error_rate_spike", f"{what}: error rate {_pct(rate)} >= {_pct(cfg.threshold)} "
                          f"({int(stats.errors)} of {int(stats.requests)} requests in {stats.span_s:.0f} s)", rate))
        return state, None
    ok = not enough or rate < cfg.threshold * cfg.clear_ratio
    new, recovered = _hold(state, ok, now, cfg.recovery_s)
    if recovered:
        return new, Alarm("error_rate_recovered", f"{what}: error rate back to {_pct(rate if enough else None)}"
                          f" (below {_pct(cfg.threshold * cfg.clear_ratio)} for {cfg.recovery_s:.0f} s)", rate)
    return new, None


@dataclass(frozen=True)
class LatencyConfig:
    k: float = 3.0               # p99 above k x baseline raises the alarm
    clear_k: float = 2.0         # cleared below clear_k x baseline ...
    recovery_s: float = 10.0     # ... held this long
    min_requests: int = 20
    warmup: int = 5              # healthy observations before the baseline counts
    alpha: float = 0.1           # moving-average weight of each healthy observation
    floor_ms: float = 5.0        # baseline never below this (sub-ms p99s jitter by multiples)


def detect_latency_jump(state: AlarmState, stats: Stats, now: float, what: str,
                        cfg: LatencyConfig = LatencyConfig()) -> tuple[AlarmState, Alarm | None]:
    """p99 jump over a learnt baseline, with hysteresis; the baseline learns only while healthy."""
    p99 = stats.p99
    if stats.requests < cfg.min_requests or p99 is None:
        if state.active:
            new, recovered = _hold(state, True, now, cfg.recovery_s)
            if recovered:
                return new, Alarm("latency_recovered", f"{what}: too little traffic to judge latency; cleared")
            return new, None
        return state, None
    base = max(state.baseline, cfg.floor_ms) if state.baseline is not None else None
    if not state.active:
        if base is not None and state.samples >= cfg.warmup and p99 > cfg.k * base:
            return (replace(state, active=True, since=now, clear_since=None),
                    Alarm("latency_jump", f"{what}: p99 {fmt_ms(p99)} is over {cfg.k:g}x its baseline "
                          f"{fmt_ms(base)} (+{(p99 / base - 1) * 100:.0f}%)", p99))
        learnt = p99 if state.baseline is None else state.baseline + cfg.alpha * (p99 - state.baseline)
        return replace(state, baseline=learnt, samples=state.samples + 1), None
    new, recovered = _hold(state, p99 < cfg.clear_k * (base or cfg.floor_ms), now, cfg.recovery_s)
    if recovered:
        return new, Alarm("latency_recovered", f"{what}: p99 back to {fmt_ms(p99)} (baseline {fmt_ms(base)})", p99)
    return new, None


# ---- the adaptive policy control loop ---------------------------------------------------------

TIGHT_OVERRIDES: dict[str, str] = {
    "mesh.outlier.consecutive-5xx": "2",
    "mesh.outlier.base-ejection": "10s",
    "mesh.outlier.max-ejection-percent": "50%",
}


@dataclass(frozen=True)
class AdaptiveConfig:
    threshold: float = 0.4        # MESH_TIGHTEN_ERROR_RATE
    min_requests: int = 20
    recovery_s: float = 60.0      # MESH_TIGHTEN_RECOVERY_S: below the threshold this long -> relax
    z: float = 1.96               # tighten when the 95% Wilson interval's lower bound >= threshold


def wilson_lower_bound(errors: float, requests: float, z: float) -> float:
    """The lower end of the Wilson score interval of an error rate errors/requests (0 for none):
    the rate the window shows at the least, with the confidence `z` stands for (1.96: 95%)."""
    if requests <= 0:
        return 0.0
    p = min(max(errors / requests, 0.0), 1.0)
    z2n = z * z / requests
    centre = p + z2n / 2
    spread = z * math.sqrt(p * (1 - p) / requests + z2n / (4 * requests))
    return max(0.0, (centre - spread) / (1 + z2n))


@dataclass(frozen=True)
class AdaptiveState:
    mode: str = "normal"              # "normal" | "tight"
    changed_at: float | None = None
    below_since: float | None = None  # tight only: when the rate went below the threshold


@dataclass(frozen=True)
class AdaptiveAction:
    kind: str                                 # "tighten" | "relax"
    overrides: dict[str, str] | None          # the labels to lay over the service's (None: none)


def decide_adaptive_policy(state: AdaptiveState, window: Stats, now: float,
                           cfg: AdaptiveConfig = AdaptiveConfig()) -> tuple[AdaptiveState, AdaptiveAction | None, str]:
    """One step of the control loop for one destination service: (state, action or None, reason).

    | mode   | window                                   | -> mode | action  |
    | normal | >= min_requests and rate >= threshold    | tight   | tighten |
    | normal | otherwise                                | normal  | -       |
    | tight  | rate >= threshold (enough requests)      | tight   | -  (recovery clock reset) |
    | tight  | below (or too few requests) < recovery_s | tight   | -  (recovery clock runs)  |
    | tight  | below for >= recovery_s                  | normal  | relax   |
    """
    enough = window.requests >= cfg.min_requests
    rate = window.error_rate or 0.0
    figures = (f"error rate {_pct(window.error_rate)} over {window.span_s:.0f} s "
               f"({int(window.errors)}/{int(window.requests)} requests)")
    bad = enough and rate >= cfg.threshold
    if state.mode != "tight":
        if not enough:
            return state, None, f"too few requests to judge ({int(window.requests)} < {cfg.min_requests})"
        if not bad:
            return state, None, f"{figures} below {_pct(cfg.threshold)}"
        # Only this step, which can eject, needs the bound; in tight mode the plain rate keeps it tight.
        low = wilson_lower_bound(window.errors, window.requests, cfg.z)
        if low < cfg.threshold:
            return state, None, (f"{figures} >= {_pct(cfg.threshold)}, but too few requests to be sure: "
                                 f"at least {_pct(low)} (95% Wilson bound)")
        return (AdaptiveState(mode="tight", changed_at=now),
                AdaptiveAction("tighten", dict(TIGHT_OVERRIDES)),
                f"{figures} >= {_pct(cfg.threshold)} (at least {_pct(low)}, 95% Wilson bound): "
                f"tightening outlier detection ({', '.join(f'{k}={v}' for k, v in TIGHT_OVERRIDES.items())})")
    if bad:
        return replace(state, below_since=None), None, f"{figures} still >= {_pct(cfg.threshold)}: staying tight"
    since = state.below_since if state.below_since is not None else now
    if now - since >= cfg.recovery_s:
        return (AdaptiveState(mode="normal", changed_at=now), AdaptiveAction("relax", None),
                f"{figures} below {_pct(cfg.threshold)} for {now - since:.0f} s: relaxing to the service's labels")
    return (replace(state, below_since=since), None,
            f"{figures} below {_pct(cfg.threshold)} for {now - since:.0f} s; relax after {cfg.recovery_s:.0f} s")


def merge_policy_overrides(labels: dict[str, str], overrides: dict[str, str] | None) -> dict[str, str]:
    """A service's policy labels with adaptive overrides laid over them, never loosening them.

    consecutive-5xx and base-ejection take the smaller, max-ejection-percent the larger; a mechanism
    the labels turned off stays off; labels that do not decode are returned unchanged.
    """
    from .labels import LabelDecodeError
    from .policy import decode_traffic_policy, parse_duration

    if not overrides:
        return dict(labels)
    try:
        mine = decode_traffic_policy(labels).outlier
    except (LabelDecodeError, ValueError):
        return dict(labels)
    out = dict(labels)
    for key, value in overrides.items():
        try:
            if key == "mesh.outlier.consecutive-5xx":
                if mine.consecutive_5xx is None or int(value) >= mine.consecutive_5xx:
                    continue
            elif key == "mesh.outlier.base-ejection":
                if parse_duration(value) >= mine.base_ejection:
                    continue
            elif key == "mesh.outlier.max-ejection-percent":
                if float(value.rstrip("%")) <= mine.max_ejection_percent:
                    continue
        except ValueError:
            continue
        out[key] = value
    try:
        decode_traffic_policy(out)
    except (LabelDecodeError, ValueError):
        return dict(labels)
    return out


# ---- canary comparison ------------------------------------------------------------------------

@dataclass(frozen=True)
class Verdict:
    text: str
    significant: bool
    findings: tuple[str, ...] = ()


def _z_two_proportions(e1: float, n1: float, e2: float, n2: float) -> float:
    p = (e1 + e2) / (n1 + n2)
    se = math.sqrt(p * (1 - p) * (1 / n1 + 1 / n2))
    if se == 0:
        return 0.0
    return (e2 / n2 - e1 / n1) / se


def _change(new: float, old: float) -> str:
    if old <= 0:
        return "new"
    return f"{(new / old - 1) * 100:+.0f}%"


def compare_versions(a: Stats, b: Stats, name_a: str = "a", name_b: str = "b", min_requests: int = 20,
                     latency_ratio: float = 1.5, latency_floor_ms: float = 5.0,
                     min_error_diff: float = 0.01, z: float = 2.0) -> Verdict:
    """`b` (the candidate) against `a` (the baseline): a verdict line and whether it is significant.

    Errors: success rates differ by at least `min_error_diff` and a two-proportion z-test passes `z`.
    Latency: p99 (then p50) differs by `latency_ratio` and by at least `latency_floor_ms`.
    Fewer than `min_requests` on either side: "not enough traffic".
    """
    short = [(n, s) for n, s in ((name_a, a), (name_b, b)) if s.requests < min_requests]
    if short:
        parts = ", ".join(f"{n} has {int(s.requests)}" for n, s in short)
        return Verdict(f"not enough traffic to compare: {parts} requests in {max(a.span_s, b.span_s):.0f} s "
                       f"(need {min_requests} each)", False)
    findings: list[str] = []
    ea, eb = a.error_rate or 0.0, b.error_rate or 0.0
    if abs(eb - ea) >= min_error_diff and abs(_z_two_proportions(a.errors, a.requests, b.errors, b.requests)) >= z:
        worse, better = (name_b, name_a) if eb > ea else (name_a, name_b)
        hi, lo = max(ea, eb), min(ea, eb)
        findings.append(f"{worse} fails more: success {_pct(1 - hi)} vs {_pct(1 - lo)} ({better})")
    for label, qa, qb in (("p99", a.p99, b.p99), ("p50", a.p50, b.p50)):
        if qa is None or qb is None:
            continue
        hi, lo = max(qa, qb), min(qa, qb)
        if hi - lo >= latency_floor_ms and (lo <= 0 or hi / lo >= latency_ratio):
            if qb > qa:
                findings.append(f"{name_b} is slower: {label} {fmt_ms(qb)} vs {fmt_ms(qa)} ({_change(qb, qa)})")
            else:
                findings.append(f"{name_b} is faster: {label} {fmt_ms(qb)} vs {fmt_ms(qa)} ({_change(qb, qa)})")
            break  # p50 only when p99 shows nothing
    if not findings:
        return Verdict(f"no significant difference between {name_a} and {name_b} "
                       f"(success {_pct(a.success_rate)} vs {_pct(b.success_rate)}, "
                       f"p99 {fmt_ms(a.p99)} vs {fmt_ms(b.p99)})", False)
    return Verdict("; ".join(findings), True, tuple(findings))

