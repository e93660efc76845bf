"""Load-balancing decisions (meshcore.lb): explicit random numbers, no sockets."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from meshcore.lb import candidates, connect_tries, merge_exclusions, pick_p2c, pick_random, pick_round_robin


def test_candidates_skip_excluded_in_order():
    assert candidates(4) == [0, 1, 2, 3]
    assert candidates(4, {1, 3}) == [0, 2]
    assert candidates(2, {0, 1}) == []


@pytest.mark.parametrize("counter, expected", [(0, 0), (1, 1), (2, 2), (3, 0), (7, 1)])
def test_round_robin_cycles(counter, expected):
    assert pick_round_robin(3, counter) == expected


def test_round_robin_with_exclusions_cycles_over_the_rest():
    picks = [pick_round_robin(4, c, exclude={1}) for c in range(6)]
    assert picks == [0, 2, 3, 0, 2, 3]


def test_round_robin_nothing_left():
    assert pick_round_robin(0, 5) is None
    assert pick_round_robin(2, 5, exclude={0, 1}) is None


@pytest.mark.parametrize("rand, expected", [(0.0, 0), (0.2499, 0), (0.25, 1), (0.99, 3), (1.0, 3)])
def test_random_maps_uniform_number_to_index(rand, expected):
    assert pick_random(4, rand) == expected


def test_random_with_exclusions_never_picks_excluded():
    for i in range(100):
        assert pick_random(5, i / 100, exclude={0, 2, 4}) in (1, 3)
    assert pick_random(3, 0.5, exclude={0, 1, 2}) is None
    assert pick_random(0, 0.5) is None


def test_p2c_picks_the_less_loaded_of_two_distinct():
    # rand_a=0.0 -> index 0; rand_b=0.0 -> first of the others -> index 1.
    assert pick_p2c([5, 1, 0], 0.0, 0.0) == 1
    assert pick_p2c([0, 1, 9], 0.0, 0.0) == 0
    # rand_b high -> last of the others -> index 2 (the idle one wins over 0).
    assert pick_p2c([5, 1, 0], 0.0, 0.99) == 2


def test_p2c_tie_keeps_the_first_draw():
    assert pick_p2c([3, 3, 3], 0.5, 0.0) == 1
    assert pick_p2c([3, 3, 3], 0.9, 0.0) == 2


def test_p2c_two_draws_are_distinct():
    # Same rand for both draws still compares two different endpoints.
    for r in (0.0, 0.3, 0.6, 0.99):
        chosen = pick_p2c([0, 0], r, r)
        other = 1 - chosen
        assert pick_p2c([1 if i == chosen else 0 for i in range(2)], r, r) == other


def test_p2c_single_and_empty():
    assert pick_p2c([7], 0.3, 0.9) == 0
    assert pick_p2c([], 0.3, 0.9) is None


def test_p2c_with_exclusions():
    assert pick_p2c([0, 9, 0], 0.0, 0.0, exclude={0}) == 2     # candidates 1, 2: the idle one
    assert pick_p2c([0, 9, 0], 0.7, 0.7, exclude={0, 2}) == 1  # one left
    assert pick_p2c([0, 0], 0.1, 0.1, exclude={0, 1}) is None


def test_p2c_never_picks_the_busiest_of_many():
    rng = random.Random(7)
    load = [0, 0, 0, 100]
    picks = Counter(pick_p2c(load, rng.random(), rng.random()) for _ in range(2000))
    assert picks[3] == 0
    assert set(picks) == {0, 1, 2}


def test_p2c_spreads_equal_load_roughly_evenly():
    rng = random.Random(11)
    picks = Counter(pick_p2c([0, 0, 0, 0], rng.random(), rng.random()) for _ in range(4000))
    assert all(800 < picks[i] < 1200 for i in range(4)), picks


@pytest.mark.parametrize("n, max_tries, expected", [(0, 3, 0), (1, 3, 1), (2, 3, 2), (5, 3, 3), (5, 1, 1)])
def test_connect_tries_bounded_by_endpoints_and_max(n, max_tries, expected):
    assert connect_tries(n, max_tries) == expected


def test_merge_exclusions_skips_ejected_while_others_remain():
    assert merge_exclusions((), (), 3) == ()
    assert set(merge_exclusions((), [1], 3)) == {1}
    assert set(merge_exclusions({0}, [1], 3)) == {0, 1}
    # Skipping the ejected would leave nothing: only the tried ones are skipped.
    assert set(merge_exclusions({0}, [1, 2], 3)) == {0}
    assert set(merge_exclusions((), [0, 1], 2)) == set()
    assert pick_p2c([0, 0, 0], 0.0, 0.0, merge_exclusions((), [0, 1], 3)) == 2
