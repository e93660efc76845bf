"""Alarms on a window's Stats: error-rate spikes and latency jumps, as pure state machines
(state in, (state, alarm edge or None) out; `now` is an argument).

- `detect_error_spike`: error rate >= threshold (20%) on at least `min_requests` requests; it clears
  after the rate stays below `threshold * clear_ratio` (half) for `recovery_s` (hysteresis).
- `detect_latency_jump`: p99 > k (3) x baseline, where the baseline is a slow moving average of p99
  learnt only while healthy (floored at `floor_ms` so sub-millisecond noise does not alert); clears
  when p99 < clear_k (2) x baseline for `recovery_s`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .flowstats import Stats, fmt_ms, fmt_pct


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
                    Alarm("error_rate_spike", f"{what}: error rate {fmt_pct(rate)} >= {fmt_pct(cfg.threshold)} "
                          f"({int(stats.errors)} of {int(stats.requests)} requests in {stats.span_s:.0f} s)", rate))
        return state, None
    ok = not enough or rate < cfg.threshold * cfg.clear_ratio
    new, recovered = _hold(state, ok, now, cfg.recovery_s)
    if recovered:
        return new, Alarm("error_rate_recovered", f"{what}: error rate back to {fmt_pct(rate if enough else None)}"
                          f" (below {fmt_pct(cfg.threshold * cfg.clear_ratio)} for {cfg.recovery_s:.0f} s)", rate)
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
