"""Table tests of meshcore.resilience with a fake clock (plain floats) and seeded random numbers."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from meshcore import resilience as r
from meshcore.policy import CircuitPolicy, OutlierPolicy, RateLimitPolicy, RetryPolicy
from meshcore.resilience import (
    CircuitBreaker, HashRing, OutlierDetector, RateLimiter, RetryBudget, TokenBucket, backoff_delay,
    decide_fault, pick_weighted, ring_hash_pick, should_retry,
)
from meshcore.routing_rules import Fault

# ---- backoff -----------------------------------------------------------------------------------

@pytest.mark.parametrize("rand", [0.0, 0.5, 0.999])
def test_backoff_bounds_over_many_attempts(rand):
    base, cap = 0.025, 0.25
    for attempt in range(0, 200):
        ceiling = min(cap, base * 2 ** min(attempt, 60))
        delay = backoff_delay(attempt, base, cap, rand)
        assert 0.0 <= delay <= cap
        assert delay == pytest.approx(rand * ceiling)


@pytest.mark.parametrize("attempt, expected_ceiling", [(0, 0.025), (1, 0.05), (2, 0.1), (3, 0.2), (4, 0.25), (50, 0.25)])
def test_backoff_doubles_then_caps(attempt, expected_ceiling):
    assert backoff_delay(attempt, 0.025, 0.25, 0.999) == pytest.approx(0.999 * expected_ceiling)
    assert backoff_delay(attempt, 0.025, 0.25, 0.0) == 0.0


def test_backoff_full_jitter_spreads_uniformly():
    rng = random.Random(7)
    delays = [backoff_delay(3, 0.025, 0.25, rng.random()) for _ in range(10_000)]
    assert max(delays) < 0.2 and min(delays) >= 0.0
    assert sum(delays) / len(delays) == pytest.approx(0.1, rel=0.05)  # mean of uniform [0, 0.2)


def test_backoff_negative_attempt_is_treated_as_first():
    assert backoff_delay(-3, 0.1, 1.0, 0.5) == pytest.approx(0.05)


# ---- retry budget ------------------------------------------------------------------------------

@pytest.mark.parametrize("percent, minimum, active, retries, allowed", [
    (20, 3, 0, 0, True),      # the minimum lets a quiet service retry
    (20, 3, 0, 2, True),
    (20, 3, 0, 3, False),     # minimum reached
    (20, 3, 10, 2, True),     # 20% of 10 = 2 < min 3: the minimum rules
    (20, 3, 10, 3, False),
    (20, 3, 100, 19, True),   # 20% of 100 = 20
    (20, 3, 100, 20, False),
    (20, 0, 0, 0, False),     # no minimum, no traffic: no retry
    (50, 1, 9, 4, True),      # 4.5 allowed
    (50, 1, 9, 5, False),
])
def test_budget_arithmetic(percent, minimum, active, retries, allowed):
    b = RetryBudget(percent, minimum)
    for _ in range(active):
        b.start_request()
    for _ in range(retries):
        b.start_retry()
    assert b.can_retry(0.0) is allowed


def test_budget_start_finish_and_policy():
    b = RetryBudget.from_policy(RetryPolicy())
    assert (b.ratio, b.min_concurrency) == (0.2, 3)
    for _ in range(3):
        b.start_retry()
    assert not b.can_retry(1.0)
    b.finish_retry()
    assert b.can_retry(1.0)
    b.finish_request()          # never below zero
    b.finish_retry(); b.finish_retry(); b.finish_retry()
    assert (b.active_requests, b.active_retries) == (0, 0)
    for _ in range(50):
        b.start_request()
    assert b.limit() == 10.0


# ---- should_retry ------------------------------------------------------------------------------

DEFAULT = RetryPolicy()
ON_5XX = RetryPolicy(on=frozenset({"5xx"}))
ON_GW = RetryPolicy(on=frozenset({"gateway-error"}))
ON_CONNECT = RetryPolicy(on=frozenset({"connect-failure"}))
ON_CODES = RetryPolicy(on=frozenset({"retriable-status-codes"}), status_codes=frozenset({429, 503}))
NON_IDEM = RetryPolicy(on=frozenset({"5xx"}), non_idempotent=True)
NONE = RetryPolicy(attempts=0, on=frozenset({"5xx", "connect-failure", "reset"}))


@pytest.mark.parametrize("policy, attempt, method, status, failure, sent, expected", [
    # default policy: connect-failure, reset
    (DEFAULT, 0, "GET", None, "connect-failure", False, True),
    (DEFAULT, 1, "GET", None, "reset", True, True),
    (DEFAULT, 2, "GET", None, "reset", True, False),            # 2 retries done = attempts
    (DEFAULT, 0, "GET", 503, None, True, False),                # statuses are not in the default set
    (DEFAULT, 0, "GET", None, "timeout", True, True),           # reset covers a per-try timeout (no response)
    (DEFAULT, 0, "POST", None, "connect-failure", False, True), # never sent: safe for any method
    (DEFAULT, 0, "POST", None, "reset", True, False),           # sent: may have been processed
    (DEFAULT, 0, "PATCH", None, "reset", True, False),
    (DEFAULT, 0, "PUT", None, "reset", True, True),             # PUT and DELETE are idempotent
    (DEFAULT, 0, "DELETE", None, "reset", True, True),
    (DEFAULT, 0, "HEAD", None, "reset", True, True),
    (DEFAULT, 0, "OPTIONS", None, "reset", True, True),
    (DEFAULT, 0, "TRACE", None, "reset", True, True),
    (DEFAULT, 0, "CONNECT", None, "reset", True, False),
    (DEFAULT, 0, "PROPFIND", None, "reset", True, False),       # unknown methods are not idempotent
    # 5xx: any 500..599 and every failure
    (ON_5XX, 0, "GET", 500, None, True, True),
    (ON_5XX, 0, "GET", 599, None, True, True),
    (ON_5XX, 0, "GET", 499, None, True, False),
    (ON_5XX, 0, "GET", 404, None, True, False),
    (ON_5XX, 0, "GET", 200, None, True, False),
    (ON_5XX, 0, "GET", None, "connect-failure", False, True),
    (ON_5XX, 0, "GET", None, "reset", True, True),
    (ON_5XX, 0, "GET", None, "timeout", True, True),
    (ON_5XX, 0, "POST", 500, None, True, False),
    (ON_5XX, 0, "GET", None, None, True, False),                # nothing to go on
    # gateway-error: 502/503/504 and failures
    (ON_GW, 0, "GET", 502, None, True, True),
    (ON_GW, 0, "GET", 503, None, True, True),
    (ON_GW, 0, "GET", 504, None, True, True),
    (ON_GW, 0, "GET", 500, None, True, False),
    (ON_GW, 0, "GET", 501, None, True, False),
    (ON_GW, 0, "GET", None, "reset", True, True),
    # connect-failure only
    (ON_CONNECT, 0, "GET", None, "connect-failure", False, True),
    (ON_CONNECT, 0, "GET", None, "reset", True, False),
    (ON_CONNECT, 0, "GET", None, "timeout", True, False),
    (ON_CONNECT, 0, "GET", 503, None, True, False),
    # retriable-status-codes
    (ON_CODES, 0, "GET", 429, None, True, True),
    (ON_CODES, 0, "GET", 503, None, True, True),
    (ON_CODES, 0, "GET", 502, None, True, False),
    (ON_CODES, 0, "GET", None, "reset", True, False),
    # non-idempotent allowed
    (NON_IDEM, 0, "POST", 503, None, True, True),
    (NON_IDEM, 0, "PATCH", None, "reset", True, True),
    # attempts 0: never
    (NONE, 0, "GET", 503, None, True, False),
    (NONE, 0, "GET", None, "connect-failure", False, False),
])
def test_should_retry(policy, attempt, method, status, failure, sent, expected):
    assert should_retry(policy, attempt, method, status, failure, sent) is expected


# ---- circuit breaker ---------------------------------------------------------------------------

def test_breaker_requests_overflow_and_release():
    cb = CircuitBreaker(max_connections=10, max_pending=10, max_requests=2)
    assert cb.try_acquire_request() and cb.try_acquire_request()
    assert not cb.try_acquire_request()             # third overflows (UO)
    assert (cb.requests, cb.overflows_total) == (2, 1)
    cb.release_request()
    assert cb.try_acquire_request()
    assert not cb.try_acquire_request()
    assert cb.overflows_total == 2


@pytest.mark.parametrize("kind", ["pending", "connection"])
def test_breaker_pending_and_connections(kind):
    cb = CircuitBreaker(max_connections=1, max_pending=1, max_requests=100)
    acquire, release = getattr(cb, f"try_acquire_{kind}"), getattr(cb, f"release_{kind}")
    assert acquire()
    assert not acquire()
    release()
    release()                                       # extra release never goes negative
    assert acquire() and not acquire()
    assert cb.requests == 0                         # the other counters are independent


def test_breaker_from_default_policy_is_effectively_unlimited():
    cb = CircuitBreaker.from_policy(CircuitPolicy())
    assert all(cb.try_acquire_request() for _ in range(10_000))
    assert cb.overflows_total == 0


# ---- outlier detection -------------------------------------------------------------------------

KEYS = [f"10.0.0.{i}:15006" for i in range(1, 11)]   # ten endpoints: 10% = one ejection


def detector(**kw) -> OutlierDetector:
    d = OutlierDetector(OutlierPolicy(**kw))
    d.set_endpoints(KEYS)
    return d


def test_ejects_after_n_consecutive_5xx():
    d = detector()
    a = KEYS[0]
    for i in range(4):
        assert d.record(a, 500, now=1.0 + i) is False
    assert not d.is_ejected(a, 5.0)
    assert d.record(a, 503, now=5.0) is True
    assert d.is_ejected(a, 5.0) and d.ejections_total == 1
    assert a not in d.healthy(KEYS, 5.0) and len(d.healthy(KEYS, 5.0)) == 9


def test_success_resets_the_count():
    d = detector()
    a = KEYS[0]
    for _ in range(4):
        d.record(a, 500, 1.0)
    d.record(a, 200, 1.0)
    for _ in range(4):
        assert d.record(a, 500, 2.0) is False
    assert not d.is_ejected(a, 2.0)
    d.record(a, 404, 2.0)                             # 4xx is a success for outlier detection
    assert d.state()[a]["consecutive_5xx"] == 0


def test_failures_count_as_5xx():
    d = detector(consecutive_5xx=3)
    for failure in ("connect-failure", "reset", "timeout"):
        d.record(KEYS[1], failure, 1.0)
    assert d.is_ejected(KEYS[1], 1.0)


def test_returns_after_base_ejection_and_second_ejection_is_longer():
    d = detector(consecutive_5xx=1, base_ejection=30.0)
    a = KEYS[0]
    d.record(a, 500, 100.0)
    assert d.is_ejected(a, 129.9)
    assert not d.is_ejected(a, 130.0)               # back after 30 s
    assert a in d.healthy(KEYS, 130.0)
    d.record(a, 500, 131.0)                          # second ejection soon after: 2 x 30 s
    assert d.is_ejected(a, 190.9)
    assert not d.is_ejected(a, 191.0)
    assert d.state(191.0)[a]["times_ejected"] == 2
    assert d.ejections_total == 2


def test_ejection_time_is_capped():
    d = detector(consecutive_5xx=1, base_ejection=100.0, interval=10_000.0)
    a, now, lengths = KEYS[0], 0.0, []
    for _ in range(5):
        assert d.record(a, 500, now)
        until = d.state()[a]["ejected_until"]
        lengths.append(until - now)
        now = until                                  # fails again the moment it returns
    assert lengths == [100.0, 200.0, 300.0, 300.0, 300.0]


def test_ejection_multiplier_decays_while_healthy():
    d = detector(consecutive_5xx=1, base_ejection=30.0, interval=10.0)
    a = KEYS[0]
    d.record(a, 500, 0.0)          # ejected 30 s, times 1
    d.record(a, 500, 30.0)         # back at 30, ejected again: times 2 -> 60 s
    assert d.state()[a]["ejected_until"] == 90.0
    d.record(a, 500, 90.0 + 25.0)  # two intervals healthy: times 2 - 2 = 0, +1 -> 30 s
    assert d.state()[a]["ejected_until"] == 145.0


def test_max_ejection_percent_with_at_least_one():
    d = detector(consecutive_5xx=1, max_ejection_percent=10.0)
    assert d.record(KEYS[0], 500, 1.0) is True       # 1 of 10 = 10%
    assert d.record(KEYS[1], 500, 1.0) is False      # 2 of 10 = 20% > 10%
    assert len(d.healthy(KEYS, 1.0)) == 9
    three = OutlierDetector(OutlierPolicy(consecutive_5xx=1, max_ejection_percent=10.0))
    three.set_endpoints(KEYS[:3])
    assert three.record(KEYS[0], 500, 1.0) is True   # 33% > 10%, but one host may always be ejected
    assert three.record(KEYS[1], 500, 1.0) is False
    # once the first returns, the refused one is ejected at its next error (its count was kept)
    assert three.record(KEYS[1], 500, 31.0) is True


def test_max_ejection_percent_fifty():
    d = detector(consecutive_5xx=1, max_ejection_percent=50.0)
    ejected = [d.record(k, 502, 1.0) for k in KEYS]
    assert ejected.count(True) == 5


def test_default_panics_rather_than_ejecting_a_lone_instance():
    d = OutlierDetector(OutlierPolicy(consecutive_5xx=1))
    d.set_endpoints(KEYS[:1])
    d.record(KEYS[0], 500, 1.0)
    assert d.is_ejected(KEYS[0], 1.0)
    assert d.healthy(KEYS[:1], 1.0) == KEYS[:1]      # 0% healthy < 50%: panic, still routed


def test_all_ejected_means_no_healthy_endpoint_without_panic():
    d = OutlierDetector(OutlierPolicy(consecutive_5xx=1, max_ejection_percent=100.0, min_health_percent=0.0))
    keys = KEYS[:2]
    d.set_endpoints(keys)
    d.record(keys[0], 500, 1.0)
    assert d.healthy(keys, 1.0) == [keys[1]]
    d.record(keys[1], 500, 1.0)
    assert d.is_ejected(keys[0], 1.0) and d.is_ejected(keys[1], 1.0)
    assert d.healthy(keys, 1.0) == []                # no panic: callers get 503 UH at once
    assert d.panics_total == 0
    assert d.healthy(keys, 1.0 + 30.0) == keys       # back after the base ejection
    assert d.healthy([], 1.0) == []


def test_panic_below_min_health_percent():
    d = OutlierDetector(OutlierPolicy(consecutive_5xx=1, max_ejection_percent=100.0, min_health_percent=50.0))
    keys = KEYS[:4]
    d.set_endpoints(keys)
    d.record(keys[0], 500, 1.0)
    d.record(keys[1], 500, 1.0)
    assert d.healthy(keys, 1.0) == keys[2:]          # 50% healthy: not below the threshold
    d.record(keys[2], 500, 1.0)
    assert d.healthy(keys, 1.0) == keys              # 25% healthy: panic, everyone
    assert d.panics_total == 1


def test_gateway_errors_threshold():
    d = detector(consecutive_5xx=None, consecutive_gateway_errors=2)
    a = KEYS[0]
    d.record(a, 502, 1.0)
    d.record(a, 500, 1.0)                            # a 500 breaks the gateway-error run
    assert d.record(a, 504, 1.0) is False
    assert d.record(a, "reset", 1.0) is True
    for _ in range(20):
        assert d.record(KEYS[1], 500, 1.0) is False  # consecutive-5xx is off


def test_set_endpoints_drops_vanished_state_and_state_is_json_ready():
    d = detector(consecutive_5xx=1)
    d.record(KEYS[0], 500, 1.0)
    assert d.state(1.0)[KEYS[0]]["ejected"] is True
    d.set_endpoints(KEYS[1:])
    assert KEYS[0] not in d.state() and not d.is_ejected(KEYS[0], 1.0)
    assert set(d.state()[KEYS[1]]) == {"ejected", "ejected_until", "times_ejected", "consecutive_5xx",
                                       "consecutive_gateway_errors"}


# ---- token bucket and rate limiter -------------------------------------------------------------

def test_token_bucket_burst_then_refill():
    b = TokenBucket(rate_per_s=2.0, burst=3)
    assert [b.take(10.0)[0] for _ in range(4)] == [True, True, True, False]
    allowed, retry_after = b.take(10.0)
    assert not allowed and retry_after == pytest.approx(0.5)   # one token at 2/s
    assert b.take(10.25) == (False, pytest.approx(0.25))
    assert b.take(10.5)[0] is True
    assert b.take(100.0)[0] and b.take(100.0)[0] and b.take(100.0)[0]   # refill stops at burst
    assert not b.take(100.0)[0]


def test_token_bucket_multi_take_and_clock_going_back():
    b = TokenBucket(rate_per_s=1.0, burst=5)
    assert b.take(0.0, n=5) == (True, 0.0)
    assert b.take(0.0, n=2) == (False, pytest.approx(2.0))
    assert b.take(0.0, n=6) == (False, float("inf"))           # more than the bucket holds
    assert b.take(-10.0)[0] is False                            # time going back adds nothing
    assert b.take(1.0)[0] is True


def test_token_bucket_rejects_bad_parameters():
    with pytest.raises(ValueError):
        TokenBucket(0, 1)
    with pytest.raises(ValueError):
        TokenBucket(1, 0)


def test_rate_limiter_shared_bucket():
    rl = RateLimiter.from_policy(RateLimitPolicy(rate_per_s=1.0, burst=2.0, per_caller=False))
    assert rl.check("a", 0.0)[0] and rl.check("b", 0.0)[0]
    assert rl.check("c", 0.0)[0] is False
    assert rl.limited_total == 1


def test_rate_limiter_per_caller_buckets_are_independent():
    rl = RateLimiter(rate_per_s=1.0, burst=1, per_caller=True)
    assert rl.check("spiffe://mesh.local/ns/shop/sa/web", 0.0)[0]
    assert not rl.check("spiffe://mesh.local/ns/shop/sa/web", 0.0)[0]
    assert rl.check("spiffe://mesh.local/ns/shop/sa/cart", 0.0)[0]
    assert len(rl) == 2


def test_rate_limiter_per_caller_is_bounded_lru():
    rl = RateLimiter(rate_per_s=1.0, burst=1, per_caller=True, max_buckets=3)
    for caller in ("a", "b", "c"):
        assert rl.check(caller, 0.0)[0]
    assert not rl.check("a", 0.0)[0]                 # touches a: b is now the least recently used
    assert rl.check("d", 0.0)[0]                     # evicts b
    assert len(rl) == 3
    assert not rl.check("a", 0.0)[0]                 # a kept its empty bucket
    assert rl.check("b", 0.0)[0]                     # b was evicted: fresh bucket
    big = RateLimiter(rate_per_s=1.0, burst=1, per_caller=True)
    for i in range(10_050):
        big.check(f"caller-{i}", 0.0)
    assert len(big) == 10_000


# ---- weighted pick -----------------------------------------------------------------------------

def test_pick_weighted_proportions():
    rng = random.Random(12345)
    weights = (("v1", 70), ("v2", 20), ("v3", 10))
    counts = Counter(pick_weighted(weights, rng.random()) for _ in range(10_000))
    assert counts["v1"] == pytest.approx(7000, abs=250)
    assert counts["v2"] == pytest.approx(2000, abs=200)
    assert counts["v3"] == pytest.approx(1000, abs=150)


@pytest.mark.parametrize("rand, expected", [(0.0, "v1"), (0.8999, "v1"), (0.9, "v2"), (0.9999, "v2"), (1.0, "v2")])
def test_pick_weighted_bands(rand, expected):
    assert pick_weighted((("v1", 90), ("v2", 10)), rand) == expected


def test_pick_weighted_zero_weight_never_picked():
    assert {pick_weighted((("v1", 0), ("v2", 100), ("v3", 0)), x / 100) for x in range(101)} == {"v2"}
    with pytest.raises(ValueError):
        pick_weighted((("v1", 0),), 0.5)


# ---- consistent hashing ------------------------------------------------------------------------

ENDPOINTS = [f"10.1.0.{i}:15006" for i in range(1, 9)]
REQUEST_KEYS = [f"user-{i}" for i in range(2000)]


def test_ring_same_key_same_endpoint_and_spread():
    ring = HashRing(ENDPOINTS)
    first = [ring.pick(k) for k in REQUEST_KEYS]
    rebuilt = HashRing(list(ENDPOINTS))
    assert first == [rebuilt.pick(k) for k in REQUEST_KEYS]                      # stable across builds
    assert first == [ring_hash_pick(k, ENDPOINTS) for k in REQUEST_KEYS]
    counts = Counter(first)
    assert set(counts) == set(range(len(ENDPOINTS)))
    assert max(counts.values()) < 2.0 * len(REQUEST_KEYS) / len(ENDPOINTS)       # no hot endpoint


def test_ring_removing_one_endpoint_moves_only_its_keys():
    before = HashRing(ENDPOINTS)
    removed = ENDPOINTS[3]
    remaining = [e for e in ENDPOINTS if e != removed]
    after = HashRing(remaining)
    moved = 0
    for k in REQUEST_KEYS:
        old = ENDPOINTS[before.pick(k)]
        new = remaining[after.pick(k)]
        if old != removed:
            assert new == old, k                     # keys on other endpoints stay put
        else:
            moved += 1
    assert 0 < moved < len(REQUEST_KEYS) * 0.25      # only the removed endpoint's share moved


def test_ring_is_not_python_hash_and_handles_empty():
    # blake2b gives the same ring in every process, unlike the salted hash().
    assert r._hash64("x") == int.from_bytes(__import__("hashlib").blake2b(b"x", digest_size=8).digest(), "big")
    assert HashRing([]).pick("k") is None
    assert ring_hash_pick("k", []) is None
    assert ring_hash_pick("k", ["only"]) == 0


# ---- fault injection ---------------------------------------------------------------------------

@pytest.mark.parametrize("fault, rand_abort, rand_delay, expected", [
    (None, 0.0, 0.0, (None, 0.0)),
    (Fault(abort_percent=50, abort_status=503), 0.49, 0.0, (503, 0.0)),
    (Fault(abort_percent=50, abort_status=503), 0.50, 0.0, (None, 0.0)),
    (Fault(abort_percent=100, abort_status=429), 0.999, 0.999, (429, 0.0)),
    (Fault(abort_percent=0, abort_status=503), 0.0, 0.0, (None, 0.0)),
    (Fault(delay_percent=10, delay_s=1.0), 0.0, 0.05, (None, 1.0)),
    (Fault(delay_percent=10, delay_s=1.0), 0.0, 0.10, (None, 0.0)),
    (Fault(abort_percent=100, abort_status=500, delay_percent=100, delay_s=0.2), 0.3, 0.3, (500, 0.2)),
])
def test_decide_fault(fault, rand_abort, rand_delay, expected):
    assert decide_fault(fault, rand_abort, rand_delay) == expected


def test_fault_proportions():
    rng = random.Random(99)
    fault = Fault(abort_percent=25, abort_status=503)
    aborts = sum(decide_fault(fault, rng.random(), rng.random())[0] == 503 for _ in range(10_000))
    assert aborts == pytest.approx(2500, abs=200)


def test_response_flags_are_envoys():
    assert (r.UH, r.UF, r.UO, r.URX, r.RL, r.FI, r.DI, r.UT, r.UC, r.NR) == (
        "UH", "UF", "UO", "URX", "RL", "FI", "DI", "UT", "UC", "NR")


def test_token_bucket_refill_sums_do_not_lose_tokens_to_rounding():
    # 50/s with a burst of 1, a request every 5 ms for 4 s: one token per 20 ms, 200 (+1 at start).
    bucket = TokenBucket(50.0, 1.0)
    allowed = sum(bucket.take(i * 0.005)[0] for i in range(800))
    assert allowed == 200


def test_clean_is_the_endpoints_a_success_would_not_change():
    """OutlierDetector.clean, which the data path uses to skip record() on a success, is exactly the
    known endpoints with no consecutive errors; skipping record() for them gives the same detector."""
    import random
    draw = random.Random(11)
    policy = OutlierPolicy(consecutive_5xx=3, consecutive_gateway_errors=2, max_ejection_percent=100.0)
    always, skipping = OutlierDetector(policy), OutlierDetector(policy)
    keys = ["a:1", "b:1", "c:1"]
    for d in (always, skipping):
        d.set_endpoints(keys[:2])
    outcomes = [200, 204, 404, 500, 502, 503, 504, "reset", "connect-failure"]
    skipped = 0
    for step in range(3000):
        if step == 1500:
            for d in (always, skipping):
                d.set_endpoints(keys[1:])   # a:1 goes, c:1 comes
        key, outcome, now = draw.choice(keys), draw.choice(outcomes), step * 0.5
        ejected = always.record(key, outcome, now)
        if type(outcome) is int and outcome < 500 and key in skipping.clean:
            skipped += 1
        else:
            assert skipping.record(key, outcome, now) == ejected
        for d in (always, skipping):
            assert d.clean == {k for k, h in d._hosts.items() if h.c5xx == 0 and h.cgw == 0}
        assert skipping.state(now) == always.state(now)
    assert skipped > 300 and always.ejections_total > 10
