"""The chains the builders return are the layers that run, in the order written there, each from the module
of its concern (no sockets)."""

from __future__ import annotations

import pytest

from gateway.chain import main as print_chains
from gateway.server import build_gateway_stack
from sidecar.datapath.chain import describe, sidecar_chains
from sidecar.proxy import (
    Authorize, Balance, Breaker, Fault, LeastRequest, Layer, Metrics, Mirror, ProxyState, RateLimit, Retries, Route,
    RouteByHost, RouteTo, Rules, StartTrace, Stack, Timeout, Traffic, TrafficBalance, build_inbound_stack,
    build_outbound_stack,
)

OUTBOUND = [Metrics, StartTrace, RouteByHost, Traffic, Rules, Timeout, Fault, Breaker, Retries, Mirror, TrafficBalance]
INBOUND = [Metrics, StartTrace, RateLimit, Authorize, RouteTo, LeastRequest]
GATEWAY = [Metrics, StartTrace, Route, "CheckJwt", Traffic, Rules, Timeout, Fault, Breaker, Retries, Mirror,
           TrafficBalance]

# Each layer class and the module of its concern (sidecar/datapath/layers/, one concern a module).
LAYER_MODULES = [
    (Layer, "base"), (Balance, "base"),
    (Metrics, "metrics"),
    (StartTrace, "trace"),
    (RateLimit, "ratelimit"),
    (Authorize, "authorize"),
    (Route, "route"), (RouteByHost, "route"), (RouteTo, "route"),
    (Traffic, "traffic"),
    (Rules, "rules"),
    (Timeout, "timeout"),
    (Fault, "fault"),
    (Breaker, "breaker"),
    (Retries, "retries"),
    (Mirror, "mirror"),
    (LeastRequest, "balance"), (TrafficBalance, "balance"),
]


@pytest.fixture
def state():
    s = ProxyState("frontend")
    yield s
    s.close()


@pytest.mark.parametrize("build, expected, ends", [
    # enders: innermost first, the metrics layer (outermost) last
    (build_outbound_stack, OUTBOUND, [Retries, Breaker, Fault, Timeout, Metrics]),
    (lambda s: build_inbound_stack(s, 8080), INBOUND, [Metrics]),
    (build_gateway_stack, GATEWAY, [Retries, Breaker, Fault, Timeout, Metrics]),
])
def test_chain_order(state, build, expected, ends) -> None:
    stack = build(state)
    names = [t if isinstance(t, str) else t.__name__ for t in expected]
    assert [type(layer).__name__ for layer in stack.chain] == names
    assert [type(layer) for layer in stack.enders] == ends
    assert stack.balance is stack.chain[-1]


@pytest.mark.parametrize("cls, module", LAYER_MODULES)
def test_each_layer_is_defined_in_the_module_of_its_concern(cls, module) -> None:
    assert cls.__module__ == f"sidecar.datapath.layers.{module}"


def test_every_layer_of_the_chains_is_in_the_table(state) -> None:
    """Not vacuous: the table above covers each layer class the builders use."""
    stacks = (build_outbound_stack(state), build_inbound_stack(state, 8080), build_gateway_stack(state))
    used = {type(layer) for stack in stacks for layer in stack.chain}
    assert {cls for cls in used if cls.__name__ != "CheckJwt"} <= {cls for cls, _ in LAYER_MODULES}


@pytest.mark.parametrize("chain, error", [
    ((StartTrace(),), "ends with its one balance layer"),
    ((LeastRequest(), StartTrace()), "ends with its one balance layer"),
    ((LeastRequest(), LeastRequest()), "ends with its one balance layer"),
])
def test_a_chain_ends_with_one_balance_layer(state, chain, error) -> None:
    with pytest.raises(ValueError, match=error):
        Stack(direction="outbound", reporter="source", source_name="x", chain=chain, request_headers={},
              mesh_headers=b"", connect_timeout=1.0, pool=state.pools, gauge=None)


@pytest.mark.parametrize("balance, max_tries, outlier", [
    (LeastRequest(1), 1, False), (TrafficBalance(3), 3, True),
])
def test_stack_reads_connect_tries_and_outliers_from_its_balance_layer(state, balance, max_tries, outlier) -> None:
    stack = Stack(direction="outbound", reporter="source", source_name="x", chain=(Breaker(), balance),
                  request_headers={}, mesh_headers=b"", connect_timeout=1.0, pool=state.pools, gauge=None)
    assert (stack.max_tries, stack.outlier, stack.breaker) == (max_tries, outlier, True)
    assert isinstance(stack.balance, Balance) and isinstance(stack.chain[0], Layer)


PRINTED_OUTBOUND = """outbound (outbound):
  1. metrics  [on_end]                       sidecar.datapath.layers.metrics
  2. trace context                           sidecar.datapath.layers.trace
  3. route by host                           sidecar.datapath.layers.route
  4. traffic state                           sidecar.datapath.layers.traffic
  5. rules + split                           sidecar.datapath.layers.rules
  6. timeout  [on_end]                       sidecar.datapath.layers.timeout
  7. fault  [on_end]                         sidecar.datapath.layers.fault
  8. circuit breaker  [on_end]               sidecar.datapath.layers.breaker
  9. retries + budget  [on_end]              sidecar.datapath.layers.retries
  10. mirror                                 sidecar.datapath.layers.mirror
  11. balance (mesh.lb, outliers) + connect  sidecar.datapath.layers.balance"""

PRINTED_INBOUND = """inbound (inbound):
  1. metrics  [on_end]                  sidecar.datapath.layers.metrics
  2. trace context                      sidecar.datapath.layers.trace
  3. rate limit                         sidecar.datapath.layers.ratelimit
  4. authorize                          sidecar.datapath.layers.authorize
  5. route to the local app             sidecar.datapath.layers.route
  6. balance (least request) + connect  sidecar.datapath.layers.balance"""

PRINTED_GATEWAY = """gateway (gateway):
  1. metrics  [on_end]                       sidecar.datapath.layers.metrics
  2. trace context                           sidecar.datapath.layers.trace
  3. route (gateway routes)                  sidecar.datapath.layers.route
  4. jwt                                     gateway.server
  5. traffic state                           sidecar.datapath.layers.traffic
  6. rules + split                           sidecar.datapath.layers.rules
  7. timeout  [on_end]                       sidecar.datapath.layers.timeout
  8. fault  [on_end]                         sidecar.datapath.layers.fault
  9. circuit breaker  [on_end]               sidecar.datapath.layers.breaker
  10. retries + budget  [on_end]             sidecar.datapath.layers.retries
  11. mirror                                 sidecar.datapath.layers.mirror
  12. balance (mesh.lb, outliers) + connect  sidecar.datapath.layers.balance"""


def test_the_chains_printed(state) -> None:
    """What `python -m sidecar.datapath.chain` / `python -m gateway.chain` print, one layer a line with its module."""
    assert sidecar_chains(state) == [PRINTED_OUTBOUND, PRINTED_INBOUND]
    assert describe("gateway", build_gateway_stack(state)) == PRINTED_GATEWAY


def test_the_chain_command_prints_all_three(capsys) -> None:
    print_chains()
    assert capsys.readouterr().out == "\n\n".join((PRINTED_OUTBOUND, PRINTED_INBOUND, PRINTED_GATEWAY)) + "\n"
