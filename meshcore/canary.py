"""Canary statistics: two versions' Stats side by side and one verdict line (`compare_versions`).

Pure and standard library only. The error rates are compared with a two-proportion z-test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .flowstats import Stats, fmt_ms, fmt_pct


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
        findings.append(f"{worse} fails more: success {fmt_pct(1 - hi)} vs {fmt_pct(1 - lo)} ({better})")
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
                       f"(success {fmt_pct(a.success_rate)} vs {fmt_pct(b.success_rate)}, "
                       f"p99 {fmt_ms(a.p99)} vs {fmt_ms(b.p99)})", False)
    return Verdict("; ".join(findings), True, tuple(findings))
