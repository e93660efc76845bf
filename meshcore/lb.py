"""Load-balancing decisions over a service's endpoints; pure, standard library only.

Every picker takes the number (or the per-endpoint load) of the endpoints, the random numbers or
counter it needs, and an optional collection of excluded indexes (endpoints already tried for this
request), and returns the chosen index, or None when no endpoint is left to choose.
Random numbers are uniform floats in [0, 1) supplied by the caller, so every choice is testable.
"""

from __future__ import annotations

from typing import Collection, Sequence

DEFAULT_MAX_TRIES = 3  # connect attempts for one request, each on another endpoint


def candidates(n_endpoints: int, exclude: Collection[int] = ()) -> list[int]:
    """The indexes 0..n-1 not in `exclude`, in order."""
    if not exclude:
        return list(range(n_endpoints))
    return [i for i in range(n_endpoints) if i not in exclude]


def _scale(rand: float, n: int) -> int:
    # int(rand * n) is in 0..n-1 for rand in [0, 1); clamp so rand == 1.0 cannot overflow.
    i = int(rand * n)
    return n - 1 if i >= n else (0 if i < 0 else i)


def pick_round_robin(n_endpoints: int, counter: int, exclude: Collection[int] = ()) -> int | None:
    """Round robin: the `counter`-th endpoint (modulo) among those not excluded."""
    if not exclude:
        return counter % n_endpoints if n_endpoints > 0 else None
    left = candidates(n_endpoints, exclude)
    return left[counter % len(left)] if left else None


def pick_random(n_endpoints: int, rand: float, exclude: Collection[int] = ()) -> int | None:
    """A uniformly random endpoint among those not excluded."""
    if not exclude:
        return _scale(rand, n_endpoints) if n_endpoints > 0 else None
    left = candidates(n_endpoints, exclude)
    return left[_scale(rand, len(left))] if left else None


def pick_p2c(in_flight: Sequence[int], rand_a: float, rand_b: float,
             exclude: Collection[int] = ()) -> int | None:
    """Power of two choices, least outstanding requests (Envoy's LEAST_REQUEST).

    Two distinct endpoints are drawn at random (`rand_a`, `rand_b`) among those not excluded; the one
    with fewer requests in flight wins, the first drawn on a tie.
    """
    n = len(in_flight)
    if not exclude:
        if n <= 1:
            return 0 if n == 1 else None
        a = _scale(rand_a, n)
        b = _scale(rand_b, n - 1)
        if b >= a:
            b += 1
        return b if in_flight[b] < in_flight[a] else a
    left = candidates(n, exclude)
    m = len(left)
    if m <= 1:
        return left[0] if m == 1 else None
    ia = _scale(rand_a, m)
    ib = _scale(rand_b, m - 1)
    if ib >= ia:
        ib += 1
    a, b = left[ia], left[ib]
    return b if in_flight[b] < in_flight[a] else a


def merge_exclusions(tried: Collection[int], ejected: Collection[int], n_endpoints: int) -> Collection[int]:
    """The indexes a pick skips: those already tried plus the ejected ones (recent connect failures),
    unless that would skip every endpoint; then only those tried (an ejected endpoint beats none)."""
    if not ejected:
        return tried
    both = set(tried)
    both.update(ejected)
    return tried if len(both) >= n_endpoints else both


def connect_tries(n_endpoints: int, max_tries: int = DEFAULT_MAX_TRIES) -> int:
    """How many connect attempts one request gets: one per endpoint, at most `max_tries`."""
    return max(0, min(n_endpoints, max_tries))
