"""The adaptive policy control loop: tighten a failing service's outlier detection, relax it after.

Pure and standard library only; every step takes `now`. meshd's metrics hub runs it per destination
service and applies the overrides through its normal snapshot path.

- `decide_adaptive_policy`: the control loop. When a destination service's error rate (all versions,
  worse of its callers' and its own view) reaches MESH_TIGHTEN_ERROR_RATE (default 0.4) on at least
  `min_requests` requests, and the lower bound of its 95% Wilson score interval does too (a service
  failing 30% is not tightened because its first 20 requests happened to fail 40%: the tight policy
  ejects a lone instance after two errors in a row, an outage where retries had kept checkouts
  going), meshd tightens its outlier detection (TIGHT_OVERRIDES); when the rate then stays below the
  threshold for `recovery_s` (default 60 s) it relaxes back to the service's own labels.
  TIGHT_OVERRIDES, typed fields of the policy's `outlier` section (only ever tighter than the
  service's labels, see `tighten_policy`):
    consecutive_5xx       5  -> 2    eject a failing endpoint after 2 errors in a row
    base_ejection_s       30 -> 10   but for a shorter time: with the eager threshold a healthy
                                     endpoint that was unlucky comes back soon
    max_ejection_percent  10 -> 50   let up to half of the endpoints be ejected (a bad canary
                                     version is often that half)
  A mechanism the service's labels turned off (consecutive-5xx=off) stays off. Circuit-breaker limits
  are not touched: meshd cannot know a service's capacity.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from .flowstats import Stats, fmt_pct
from .policy import TrafficPolicy


@dataclass(frozen=True)
class OutlierOverrides:
    """Outlier-detection values the control loop lays over a service's policy, never loosening it."""

    consecutive_5xx: int          # eject after this many errors in a row (at most: a lower label wins)
    base_ejection_s: float        # at most this base ejection time
    max_ejection_percent: float   # at least this share of endpoints may be ejected


TIGHT_OVERRIDES = OutlierOverrides(consecutive_5xx=2, base_ejection_s=10.0, max_ejection_percent=50.0)


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
    overrides: OutlierOverrides | None        # what to lay over the service's policy (None: nothing)


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
    figures = (f"error rate {fmt_pct(window.error_rate)} over {window.span_s:.0f} s "
               f"({int(window.errors)}/{int(window.requests)} requests)")
    bad = enough and rate >= cfg.threshold
    if state.mode != "tight":
        if not enough:
            return state, None, f"too few requests to judge ({int(window.requests)} < {cfg.min_requests})"
        if not bad:
            return state, None, f"{figures} below {fmt_pct(cfg.threshold)}"
        # Only this step, which can eject, needs the bound; in tight mode the plain rate keeps it tight.
        low = wilson_lower_bound(window.errors, window.requests, cfg.z)
        if low < cfg.threshold:
            return state, None, (f"{figures} >= {fmt_pct(cfg.threshold)}, but too few requests to be sure: "
                                 f"at least {fmt_pct(low)} (95% Wilson bound)")
        return (AdaptiveState(mode="tight", changed_at=now),
                AdaptiveAction("tighten", TIGHT_OVERRIDES),
                f"{figures} >= {fmt_pct(cfg.threshold)} (at least {fmt_pct(low)}, 95% Wilson bound): "
                f"tightening outlier detection "
                f"({', '.join(f'{k}={v:g}' for k, v in asdict(TIGHT_OVERRIDES).items())})")
    if bad:
        return replace(state, below_since=None), None, f"{figures} still >= {fmt_pct(cfg.threshold)}: staying tight"
    since = state.below_since if state.below_since is not None else now
    if now - since >= cfg.recovery_s:
        return (AdaptiveState(mode="normal", changed_at=now), AdaptiveAction("relax", None),
                f"{figures} below {fmt_pct(cfg.threshold)} for {now - since:.0f} s: relaxing to the service's labels")
    return (replace(state, below_since=since), None,
            f"{figures} below {fmt_pct(cfg.threshold)} for {now - since:.0f} s; relax after {cfg.recovery_s:.0f} s")


def tighten_policy(policy: TrafficPolicy, overrides: OutlierOverrides | None) -> TrafficPolicy:
    """`policy` with adaptive overrides laid over its outlier section, never loosening it.

    consecutive_5xx and base ejection take the smaller, max ejection percent the larger; a mechanism
    the labels turned off stays off; `policy` itself when nothing changes.
    """
    if overrides is None:
        return policy
    mine = policy.outlier
    tight = replace(
        mine,
        consecutive_5xx=(None if mine.consecutive_5xx is None
                         else min(mine.consecutive_5xx, overrides.consecutive_5xx)),
        base_ejection=min(mine.base_ejection, overrides.base_ejection_s),
        max_ejection_percent=max(mine.max_ejection_percent, overrides.max_ejection_percent))
    return policy if tight == mine else replace(policy, outlier=tight)


def encode_overrides(overrides: OutlierOverrides) -> dict[str, Any]:
    """The JSON form of overrides (meshd's store, admin API and events)."""
    return asdict(overrides)


def decode_overrides(raw: Any) -> OutlierOverrides | None:
    """Overrides from their JSON form; None for anything else (an older meshd's label strings)."""
    if not isinstance(raw, dict) or set(raw) != {"consecutive_5xx", "base_ejection_s", "max_ejection_percent"}:
        return None
    c5, base, pct = raw["consecutive_5xx"], raw["base_ejection_s"], raw["max_ejection_percent"]
    numbers = (c5, base, pct)
    if any(isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) for x in numbers):
        return None
    if not isinstance(c5, int) or c5 < 1 or base <= 0 or not 0 <= pct <= 100:
        return None
    return OutlierOverrides(consecutive_5xx=c5, base_ejection_s=float(base), max_ejection_percent=float(pct))
