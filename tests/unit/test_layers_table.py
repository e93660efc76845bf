"""The traffic layers of sidecar/datapath/layers/ driven one at a time: each a table of requests (the
lane's settings, the exchange's state) and the layer's decision (NEXT or HELD, a local reply, a timer, the
fields it sets, what on_end releases); no sockets.

The downstream is the real one, its calls into the rest of the engine recorded instead of run: a Python
subclass, whose overrides of the cpdef hooks the compiled layers reach too; its loop records timers.
The lane is a real one of a ServiceTraffic, its settings replaced per row."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from meshcore.policy import TrafficPolicy
from meshcore.resilience import CircuitBreaker, RetryBudget
from meshcore.snapshot import Endpoint, ServiceConfig
from sidecar.proxy import (
    HELD, NEXT, Authorize, Breaker, Exchange, Fault, Mirror, ProxyState, Retries, Route, Rules, Timeout, _Downstream, _Lane, _Listener,
    build_outbound_stack,
)
from sidecar.routing import make_cluster
from sidecar.traffic import TrafficRegistry


class Handle:
    """A timer of `Clock`: its delay and callback, and whether the layer cancelled it."""

    def __init__(self, delay: float, callback):
        self.delay = delay
        self.callback = callback.__name__
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Clock:
    """The downstream's loop as the layers use it: call_later, recorded."""

    def __init__(self):
        self.timers: list[Handle] = []

    def call_later(self, delay: float, callback, *args) -> Handle:
        handle = Handle(delay, callback)
        self.timers.append(handle)
        return handle


class RecordingDownstream(_Downstream):
    """A downstream whose local replies and mirror sends are recorded, not written."""

    def __init__(self, state: ProxyState):
        _Downstream.__init__(self, state, build_outbound_stack(state), _Listener(None, 0.3))
        self.loop = Clock()
        self.calls: list[tuple] = []

    def _reply(self, ex, status, flags, body=b"", content_type=b"", close=False, headers=()):
        self.calls.append(("reply", status, flags))

    def _send_mirror(self, ex):
        self.calls.append(("mirror", ex.mirror))


@pytest.fixture
def down():
    state = ProxyState("orders", rand=lambda: 0.5)
    yield RecordingDownstream(state)
    state.close()


def lane(**settings) -> _Lane:
    """A real lane of a one-endpoint mesh service, with `settings` (its fields) replaced."""
    svc = ServiceConfig(name="payments", namespace="shop", protocol="http", port=80, identity="x",
                        policy=TrafficPolicy())
    cluster = make_cluster("payments", "http", (Endpoint("p0", "10.0.0.1", 15006, "v1", "x"),), mesh=True, service=svc)
    out = _Lane(TrafficRegistry().of(cluster))
    for name, value in settings.items():
        setattr(out, name, value)
    return out


def request(down: RecordingDownstream, lane_: _Lane | None = None, **fields) -> Exchange:
    ex = Exchange(down)
    ex.lane = lane_
    for name, value in fields.items():
        setattr(ex, name, value)
    return ex


# ---- timeout: the whole request's deadline --------------------------------------------------------

@pytest.mark.parametrize("mesh_timeout, grpc_in, timer, grpc_out", [
    ("no lane", None, None, None),         # not a mesh destination: no deadline
    (None, None, None, None),              # a mesh service without one
    (2.0, None, 2.0, None),
    (2.0, b"1S", 1.0, b"1S"),              # gRPC's own deadline, shorter, is kept
    (0.5, b"1S", 0.5, b"500m"),            # the mesh's, shorter, caps it and is sent on
    ("no lane", b"1S", 1.0, b"1S"),        # gRPC's deadline without a mesh service
])
def test_timeout(down, mesh_timeout, grpc_in, timer, grpc_out) -> None:
    ex = request(down, None if mesh_timeout == "no lane" else lane(timeout=mesh_timeout), grpc_timeout=grpc_in)
    assert Timeout().on_request(down, ex) == NEXT
    assert [(t.delay, t.callback) for t in down.loop.timers] == ([] if timer is None else [(timer, "_timed_out")])
    assert ex.grpc_timeout == grpc_out
    Timeout().on_end(down, ex)
    assert ex.timer is None and all(t.cancelled for t in down.loop.timers)


# ---- fault: delay first, then abort ---------------------------------------------------------------

@pytest.mark.parametrize("fault, verdict, reply, timer, flags, fault_abort", [
    (None, NEXT, [], None, "-", 0),                          # no fault rule for the service
    ((None, 0.0), NEXT, [], None, "-", 0),                   # a rule, neither drawn
    ((503, 0.0), HELD, [("reply", 503, "FI")], None, "-", 0),
    ((None, 0.25), HELD, [], 0.25, "DI", 0),                 # delayed, then the chain goes on
    ((503, 0.25), HELD, [], 0.25, "DI", 503),                # delayed, then aborted (Envoy's order)
])
def test_fault(down, fault, verdict, reply, timer, flags, fault_abort) -> None:
    draws = []
    layer = Fault(lambda tr, a, b: draws.append((a, b)) or fault)
    ex = request(down, lane(fault=None if fault is None else "rule"))
    assert layer.on_request(down, ex) == verdict
    assert down.calls == reply
    assert [(t.delay, t.callback) for t in down.loop.timers] == ([] if timer is None else [(timer, "_fault_delayed")])
    assert (ex.flags, ex.fault_abort) == (flags, fault_abort)
    assert draws == ([] if fault is None else [(0.5, 0.5)])   # two draws of the state's random source
    layer.on_end(down, ex)
    assert ex.wait is None and all(t.cancelled for t in down.loop.timers)


# ---- circuit breaker: a request slot --------------------------------------------------------------

@pytest.mark.parametrize("max_requests, in_flight, verdict, reply, admitted, after", [
    (2, 0, NEXT, [], True, 1),
    (2, 1, NEXT, [], True, 2),
    (2, 2, HELD, [("reply", 503, "UO")], False, 2),   # overflow: the slot is not taken
])
def test_breaker(down, max_requests, in_flight, verdict, reply, admitted, after) -> None:
    breaker = CircuitBreaker(100, 100, max_requests)
    breaker.requests = in_flight
    ex = request(down, lane(breaker=breaker))
    assert Breaker().on_request(down, ex) == verdict
    assert (down.calls, ex.admitted, breaker.requests) == (reply, admitted, after)
    Breaker().on_end(down, ex)
    assert (ex.admitted, breaker.requests) == (False, in_flight)   # what it took, given back once
    Breaker().on_end(down, ex)
    assert breaker.requests == in_flight


def test_breaker_passes_what_is_no_mesh_destination(down) -> None:
    ex = request(down)
    assert Breaker().on_request(down, ex) == NEXT and not ex.admitted and down.calls == []


# ---- retries: the budget counts the request, a retriable one's body is held ------------------------

@pytest.mark.parametrize("retry_on, budgeted, keep_held", [
    (None, True, False),
    (frozenset({503}), True, True),
])
def test_retries_on_request(down, retry_on, budgeted, keep_held) -> None:
    budget = RetryBudget()
    ex = request(down, lane(budget=budget, retry_on=retry_on))
    assert Retries().on_request(down, ex) == NEXT
    assert (ex.budgeted, ex.keep_held, ex.retry_on, budget.active_requests) == (budgeted, keep_held, retry_on, 1)


def test_retries_pass_what_is_no_mesh_destination(down) -> None:
    ex = request(down)
    assert Retries().on_request(down, ex) == NEXT and not ex.budgeted and not ex.keep_held


@pytest.mark.parametrize("budgeted, in_retry, try_timer, wait, requests_after, retries_after", [
    (False, False, False, False, 1, 1),      # nothing taken: nothing given back
    (True, False, False, False, 0, 1),
    (True, True, False, False, 0, 0),        # a retry in flight ends with its request
    (True, True, True, True, 0, 0),          # its per-try timer and backoff wait cancelled
])
def test_retries_on_end(down, budgeted, in_retry, try_timer, wait, requests_after, retries_after) -> None:
    budget = RetryBudget()
    budget.active_requests, budget.active_retries = 1, 1
    timers = [Handle(1.0, test_retries_on_end) for _ in range(2)]
    ex = request(down, lane(budget=budget), budgeted=budgeted, in_retry=in_retry,
                 try_timer=timers[0] if try_timer else None, wait=timers[1] if wait else None)
    Retries().on_end(down, ex)
    assert (budget.active_requests, budget.active_retries) == (requests_after, retries_after)
    assert (ex.budgeted, ex.in_retry, ex.try_timer, ex.wait) == (False, False, None, None)
    assert [t.cancelled for t in timers] == [try_timer, wait]


# ---- mirror: a copy to a version subset, sent once the request is whole -----------------------------

@pytest.mark.parametrize("rule, upgrade, chosen, req_done, mirror, keep_held, sent", [
    (None, None, "v2", True, None, False, []),            # no mirror rule: not asked
    ("rule", b"websocket", "v2", True, None, False, []),  # an upgrade is a conversation, not copied
    ("rule", None, None, True, None, False, []),          # the rule's draw said no
    ("rule", None, "v2", False, "v2", True, []),          # body still coming: sent when it is whole
    ("rule", None, "v2", True, "v2", True, [("mirror", "v2")]),
])
def test_mirror(down, rule, upgrade, chosen, req_done, mirror, keep_held, sent) -> None:
    asked = []
    layer = Mirror(lambda traffic, rand: asked.append(rand) or chosen)
    ex = request(down, lane(mirror=rule), upgrade=upgrade, req_done=req_done)
    assert layer.on_request(down, ex) == NEXT
    assert (ex.mirror, ex.keep_held, down.calls) == (mirror, keep_held, sent)
    assert asked == ([0.5] if rule is not None and upgrade is None else [])


# ---- rules + split: the version subset --------------------------------------------------------------

@pytest.mark.parametrize("rules, chosen, verdict, reply", [
    (None, "v2", NEXT, []),                                      # no rules: the whole service
    ("rules", "v2", NEXT, []),
    ("rules", None, HELD, [("reply", 503, "UH")]),                # the chosen version has no endpoint
])
def test_rules(down, rules, chosen, verdict, reply) -> None:
    lane_ = lane(rules=rules)
    subset = None if chosen is None else type("Subset", (), {"cluster": f"cluster {chosen}"})()
    ex = request(down, lane_, subset=lane_.all, cluster=lane_.all.cluster)
    assert Rules(lambda ex_, tr, rand: subset).on_request(down, ex) == verdict
    assert down.calls == reply
    expected = subset if rules is not None and subset is not None else lane_.all
    assert (ex.subset, ex.cluster) == (expected, expected.cluster)


class Broken:
    """A decision that raises, as a bug or a bad value in it would."""

    allowed = frozenset()   # an Authorizer's: nothing remembered, so check_request decides

    def __call__(self, *args):
        raise ValueError("bad value in the decision")

    def check_request(self, *args):
        raise ValueError("bad value in the decision")

    def verify(self, *args):
        raise ValueError("bad value in the decision")


@pytest.mark.parametrize("make_layer, broken_state", [
    (lambda: Route(Broken()), None),
    (lambda: Authorize(), "authz"),
    (lambda: __import__("gateway.server", fromlist=["CheckJwt"]).CheckJwt(Broken()), "route"),
], ids=["route", "authorize", "gateway jwt"])
def test_a_hook_whose_decision_raises_answers_500_and_holds(down, caplog, make_layer, broken_state) -> None:
    """Only that request fails (500 NR, logged with the layer's name); the chain stops there."""
    layer = make_layer()
    ex = request(down)
    if broken_state == "route":   # the gateway's route of this request asks for a JWT
        ex.route = SimpleNamespace(auth="jwt", jwt_issuer="i", jwt_audience="a")
        ex.lines = []
    elif broken_state:
        setattr(down.state, broken_state, Broken())
    with caplog.at_level("ERROR", logger="sidecar.proxy"):
        assert layer.on_request(down, ex) == HELD
    assert down.calls == [("reply", 500, "NR")]
    assert [r.getMessage() for r in caplog.records] == [f"{layer.name} layer failed"]
    assert "bad value in the decision" in caplog.text


# ---- fields the layers add: (name, value) pairs, written by the HTTP/1.1 codec ----------------------

XFCC = ((b"x-forwarded-client-cert", b"URI=spiffe://shop/orders"),)


@pytest.mark.parametrize("peer_fields, before, added", [
    (None, None, None),                                            # no verified caller: nothing added
    (XFCC, None, XFCC),                                            # the connection's fields, as they are
    (XFCC, ((b"x-a", b"1"),), ((b"x-a", b"1"), *XFCC)),            # after what a layer before added
])
def test_authorize_adds_the_verified_caller_as_a_field(down, peer_fields, before, added) -> None:
    down.peer_fields = peer_fields
    ex = request(down, method=b"GET", target=b"/", added=before)
    assert Authorize().on_request(down, ex) == NEXT
    assert ex.added == added


TRACEPARENT = b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-01"


@pytest.mark.parametrize("added, traceparent, trace_fields, head", [
    (None, None, None, b"GET /a HTTP/1.1\r\nhost: h\r\nx-app: 1\r\n\r\n"),
    (None, TRACEPARENT, None, b"GET /a HTTP/1.1\r\nhost: h\r\nx-app: 1\r\ntraceparent: %b\r\n\r\n" % TRACEPARENT),
    ([(b"x-forwarded-for", b"10.0.0.9"), (b"x-forwarded-proto", b"https")], TRACEPARENT,
     ((b"tracestate", b"k=v"),),
     b"GET /a HTTP/1.1\r\nhost: h\r\nx-app: 1\r\nx-forwarded-for: 10.0.0.9\r\nx-forwarded-proto: https\r\n"
     b"traceparent: 00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-01\r\ntracestate: k=v\r\n\r\n"),
])
def test_the_head_sent_on_writes_the_added_and_trace_fields(down, added, traceparent, trace_fields, head) -> None:
    cluster = make_cluster("web", "http", (Endpoint("w0", "10.0.0.2", 80, "v1", ""),), mesh=False)
    ex = request(down, method=b"GET", target=b"/a", lines=[b"x-app", b": ", b"1", b"\r\n"])
    for name, value in added or ():
        ex.add_field(name, value)
    ex.traceparent = traceparent
    ex.trace_fields = trace_fields
    assert ex.added == (tuple(added) if added else None)
    assert down._head(ex, cluster, b"h") == head
