"""sidecar.proxy.balance_traffic, the outbound balance layer: the same choice as
sidecar.traffic.balance_subset (which it does itself, compiled, for least-request with nothing ever
ejected), from the same random draws; no sockets."""
from __future__ import annotations

import random

import pytest

from meshcore.policy import TrafficPolicy
from meshcore.snapshot import Endpoint, ServiceConfig
from sidecar.proxy import Exchange, ProxyState, _Downstream, _Listener, balance_traffic, build_outbound_stack
from sidecar.routing import make_cluster
from sidecar.traffic import TrafficRegistry, balance_subset


class Draws:
    """A fixed sequence of uniform draws, counted (both balancers must take as many)."""

    def __init__(self, values):
        self.values = list(values)
        self.taken = 0

    def __call__(self) -> float:
        value = self.values[self.taken % len(self.values)]
        self.taken += 1
        return value


def traffic(n: int, lb: str):
    svc = ServiceConfig(name="payments", namespace="shop", protocol="http", port=80, identity="x",
                        policy=TrafficPolicy(lb=lb))
    eps = tuple(Endpoint(f"p{i}", f"10.0.0.{i + 1}", 15006, "v1", "x") for i in range(n))
    cluster = make_cluster("payments", "http", eps, mesh=True, service=svc)
    return cluster, TrafficRegistry().of(cluster)


def both(n: int, lb: str, counts: dict, exclude, draws: list[float], ejected=None, outlier_failure=False):
    picks = []
    for balance in ("layer", "subset"):   # each with its own state: round-robin counts its picks
        cluster, tr = traffic(n, lb)
        if outlier_failure:
            tr.outlier.record(cluster.keys[0], "connect-failure", 1.0)
        rand = Draws(draws)
        state = ProxyState("orders", rand=rand)
        state.in_flight.update(counts)
        if ejected:
            state.ejected.update(ejected)
        if balance == "layer":
            down = _Downstream(state, build_outbound_stack(state), _Listener(None, 0.3))
            ex = Exchange(down)
            ex.subset = tr.all
            picks.append((balance_traffic(state, cluster, exclude, ex), rand.taken))
        else:
            picks.append((balance_subset(state, tr.all, exclude, None), rand.taken))
    return picks


CASES = []
rng = random.Random(7)
for _ in range(300):
    n = rng.choice([1, 1, 2, 3, 5])
    counts = {(f"10.0.0.{i + 1}", 15006): rng.randrange(4) for i in range(n) if rng.random() < 0.7}
    exclude = rng.choice([(), (0,), tuple(i for i in range(n) if rng.random() < 0.4)])
    CASES.append((n, counts, exclude, [rng.random(), rng.random(), rng.random()]))


@pytest.mark.parametrize("n, counts, exclude, draws", CASES[:150])
def test_least_request_is_balance_subsets(n, counts, exclude, draws):
    layer, subset = both(n, "least-request", counts, exclude, draws)
    assert layer == subset


@pytest.mark.parametrize("n, counts, exclude, draws", CASES[150:200])
@pytest.mark.parametrize("lb", ["round-robin", "random"])
def test_other_lbs_are_balance_subsets(n, counts, exclude, draws, lb):
    layer, subset = both(n, lb, counts, exclude, draws)
    assert layer == subset


@pytest.mark.parametrize("n, counts, exclude, draws", CASES[200:260])
def test_after_an_ejection_it_is_balance_subsets(n, counts, exclude, draws):
    ejected = {("10.0.0.1", 15006): float("inf")}
    layer, subset = both(n, "least-request", counts, exclude, draws, ejected=ejected)
    assert layer == subset
    layer, subset = both(n, "least-request", counts, exclude, draws, outlier_failure=True)
    assert layer == subset


def test_the_cases_reach_every_outcome():
    """Not vacuous: the table picks several indexes, None, and P2C draws."""
    results = [both(n, "least-request", c, e, d)[0] for n, c, e, d in CASES[:150]]
    picks = {idx for idx, _ in results}
    assert None in picks and {0, 1, 2} <= picks
    assert any(taken == 2 for _, taken in results)


def test_least_request_takes_the_less_loaded_of_two():
    # pick_p2c: the two draws choose endpoints 0 and 1; 1 has fewer requests in flight
    counts = {("10.0.0.1", 15006): 3, ("10.0.0.2", 15006): 0}
    (idx, taken), _ = both(2, "least-request", counts, (), [0.1, 0.6])
    assert (idx, taken) == (1, 2)
