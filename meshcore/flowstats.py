"""Per-flow statistics over rolling time windows: requests, success rate, percentiles (RED figures).

Pure and standard library only: nothing here does I/O, sleeps or reads a clock; every function that
needs the time takes `now` (seconds, any monotonic origin). The deltas come from meshcore.promtext.

1. `Window` keeps deltas in time slots (`resolution_s`) for `horizon_s`, bounded in slots and keys;
   `window.select(now, span_s)` merges the slots of the last `span_s` seconds.
2. `dedupe_reporters` keeps one view per flow (source, service, version): every mesh hop is reported
   twice (by the caller's outbound sidecar or the gateway as reporter="source", by the callee's inbound
   sidecar as reporter="destination"). The caller's view wins when present (it also sees connect
   failures, ejections and circuit-breaker 503s that never reach the callee, like Kiali's graph);
   requests from outside the mesh have only the destination view.
3. `by_service_version`, `by_service`, `by_edge` group flows; `summarize` gives `Stats`: requests,
   rps, success rate (non-5xx, Istio's definition: response_code !~ "5.."), p50/p90/p99 by
   `histogram_quantile` (Prometheus' algorithm, linear interpolation inside buckets).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from .promtext import INF, FlowKey, Hist, Scrape


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
    """Deltas of every node in time slots, bounded by the horizon and `max_keys`: slots of
    `resolution_s` for the last `fine_s`, merged into slots of `coarse_s` beyond (older data needs
    less detail, and the window's memory stops growing well before the horizon is full). With the
    defaults a query over the last 60 s or less is exact: coarse slots all end before it begins."""

    def __init__(self, horizon_s: float = 300.0, resolution_s: float = 2.0, max_keys: int = 5000,
                 fine_s: float = 70.0, coarse_s: float = 10.0):
        self.horizon_s = horizon_s
        self.resolution_s = resolution_s
        self.max_keys = max_keys
        self.fine_s = fine_s
        self.coarse_s = max(coarse_s, resolution_s)
        # (end, flows, ejections), oldest first; `coarse` holds everything older than `fine`'s.
        self.coarse: deque[tuple[float, dict[FlowKey, Acc], dict[tuple[str, str], float]]] = deque()
        self.fine: deque[tuple[float, dict[FlowKey, Acc], dict[tuple[str, str], float]]] = deque()
        self.covered_from: float | None = None  # the start of the oldest interval still in the window

    @property
    def slots(self) -> list[tuple[float, dict[FlowKey, Acc], dict[tuple[str, str], float]]]:
        """Every slot, oldest first."""
        return [*self.coarse, *self.fine]

    def _merge_into(self, slots: deque, end: float, accs: dict, ejections: dict) -> None:
        if not slots or slots[-1][0] != end:
            slots.append((end, {}, {}))
        _, mine_accs, mine_ej = slots[-1]
        for key, acc in accs.items():
            mine = mine_accs.get(key)
            if mine is None:
                if len(mine_accs) >= self.max_keys:
                    continue
                mine = mine_accs[key] = Acc()
            mine.add(acc)
        for key, n in ejections.items():
            mine_ej[key] = mine_ej.get(key, 0.0) + n

    def add(self, now: float, delta: Scrape, since: float | None = None) -> None:
        """Merge the increase seen at `now` (over the interval starting at `since`)."""
        self.evict(now)
        # A slot is named by its end: an increase seen at `now` happened in the slot ending at or after it.
        end = math.ceil(now / self.resolution_s) * self.resolution_s
        self._merge_into(self.fine, end, _accs_of(delta), delta.ejections)
        begin = since if since is not None else now
        if self.covered_from is None or begin < self.covered_from:
            self.covered_from = begin

    def evict(self, now: float) -> None:
        """Drop slots older than the horizon; merge fine slots older than `fine_s` into coarse ones."""
        while self.fine and self.fine[0][0] <= now - self.fine_s:
            end, accs, ejections = self.fine.popleft()
            self._merge_into(self.coarse, math.ceil(end / self.coarse_s) * self.coarse_s, accs, ejections)
        while self.coarse and self.coarse[0][0] <= now - self.horizon_s:
            self.coarse.popleft()
        while self.fine and self.fine[0][0] <= now - self.horizon_s:
            self.fine.popleft()
        if self.covered_from is not None and self.covered_from < now - self.horizon_s:
            self.covered_from = now - self.horizon_s

    def span(self, now: float, span_s: float) -> float:
        """The seconds a rate over the last `span_s` divides by (less just after start)."""
        span_s = min(span_s, self.horizon_s)
        if self.covered_from is None:
            return span_s
        return max(self.resolution_s, min(span_s, now - self.covered_from))

    def select(self, now: float, span_s: float) -> dict[FlowKey, Acc]:
        """Every flow's increase over the last `span_s` seconds (fresh objects); beyond `fine_s`
        to the nearest `coarse_s`."""
        cutoff = now - min(span_s, self.horizon_s)
        out: dict[FlowKey, Acc] = {}
        for slots in (self.coarse, self.fine):
            for end, accs, _ in slots:
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
        for slots in (self.coarse, self.fine):
            for end, _, ej in slots:
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


def fmt_pct(x: float | None) -> str:
    """`12.5%`, `-`."""
    return "-" if x is None else f"{x * 100:.1f}%"


def fmt_ms(x: float | None) -> str:
    """`180 ms`, `2.5 ms`, `-`."""
    if x is None:
        return "-"
    return f"{x:.0f} ms" if x >= 10 else f"{x:.1f} ms"
