"""meshd's metrics math: exposition parsing and deltas (meshcore.promtext), windows and quantiles
(meshcore.flowstats), anomalies (meshcore.alarms), the adaptive loop (meshcore.adaptive), verdicts
(meshcore.canary)."""

from __future__ import annotations

import math

import pytest

from meshcore.adaptive import (
    AdaptiveConfig, AdaptiveState, OutlierOverrides, TIGHT_OVERRIDES, decide_adaptive_policy, decode_overrides,
    encode_overrides, tighten_policy, wilson_lower_bound,
)
from meshcore.alarms import AlarmState, LatencyConfig, SpikeConfig, detect_error_spike, detect_latency_jump
from meshcore.canary import compare_versions
from meshcore.flowstats import (
    Acc, Stats, Window, by_edge, by_service, by_service_version, dedupe_reporters, histogram_quantile,
    summarize,
)
from meshcore.policy import DEFAULT_POLICY, decode_traffic_policy
from meshcore.promtext import FlowKey, Hist, parse_sample_line, parse_scrape, scrape_delta

EXPOSITION = r'''# HELP istio_requests_total Requests handled by the proxy.
# TYPE istio_requests_total counter
istio_requests_total{reporter="source",source_workload="frontend",source_version="v1",destination_service="catalog",destination_workload="catalog",destination_version="v1",request_protocol="http",response_code="200",response_flags="-"} 90.0
istio_requests_total{response_flags="UF",response_code="200",request_protocol="http",destination_version="v1",destination_workload="catalog",destination_service="catalog",source_version="v1",source_workload="frontend",reporter="source"} 10
istio_requests_total{reporter="source",source_workload="frontend",source_version="v1",destination_service="catalog",destination_workload="catalog",destination_version="v2",request_protocol="http",response_code="503",response_flags="-"} 5 1700000000000
istio_requests_total{reporter="destination",source_workload="we\"ird\\name",destination_service="catalog",destination_version="v1",response_code="200",} 3
# TYPE istio_request_duration_milliseconds histogram
istio_request_duration_milliseconds_bucket{reporter="source",source_workload="frontend",destination_service="catalog",destination_version="v1",response_code="200",le="1.0"} 10
istio_request_duration_milliseconds_bucket{reporter="source",source_workload="frontend",destination_service="catalog",destination_version="v1",response_code="200",le="5.0"} 30
istio_request_duration_milliseconds_bucket{reporter="source",source_workload="frontend",destination_service="catalog",destination_version="v1",response_code="200",le="10.0"} 40
istio_request_duration_milliseconds_bucket{le="+Inf",reporter="source",source_workload="frontend",destination_service="catalog",destination_version="v1",response_code="200"} 40
istio_request_duration_milliseconds_sum{reporter="source",source_workload="frontend",destination_service="catalog",destination_version="v1",response_code="200"} 160.5
istio_request_duration_milliseconds_count{reporter="source",source_workload="frontend",destination_service="catalog",destination_version="v1",response_code="200"} 40
istio_request_duration_milliseconds_created{reporter="source"} 1.7e9
# TYPE mesh_sidecar_connections_active gauge
mesh_sidecar_connections_active{direction="inbound"} 4.0
this is not a metric line
istio_requests_total{reporter="source" 12
istio_requests_total{reporter="source"} not-a-number
'''

V1_OK = FlowKey("source", "frontend", "catalog", "v1", "200")


def test_parse_sample_line_escapes_order_and_timestamps():
    name, labels, value = parse_sample_line(r'm{b="x\"}y",a="1\\2\n",} 2.5e1 1700000000')
    assert name == "m" and value == 25.0
    assert labels == {"b": 'x"}y', "a": "1\\2\n"}
    assert parse_sample_line("m +Inf")[2] == math.inf


def test_parse_scrape_keys_sums_and_skips():
    s = parse_scrape(EXPOSITION)
    assert s.requests[V1_OK] == 100.0  # two series differing only in response_flags (label order too)
    assert s.requests[FlowKey("source", "frontend", "catalog", "v2", "503")] == 5.0
    assert s.requests[FlowKey("destination", 'we"ird\\name', "catalog", "v1", "200")] == 3.0
    assert len(s.requests) == 3  # broken lines skipped, other metrics ignored
    h = s.hists[V1_OK]
    assert h.buckets == {1.0: 10, 5.0: 30, 10.0: 40, math.inf: 40} and h.sum == 160.5 and h.count == 40


def test_parse_scrape_reads_the_sidecar_exposition():
    telemetry = pytest.importorskip("sidecar.telemetry")
    t = telemetry.Telemetry()
    for ms in (0.3, 3.0, 7.0, 120.0):
        t.record_request("source", "frontend", "v1", "catalog", "catalog", "v2", 200, "-", ms)
    t.record_request("destination", "unknown", "unknown", "catalog", "catalog", "v2", 500, "-", 2.0)
    s = parse_scrape(telemetry.render_metrics(t).decode())
    assert s.requests[FlowKey("source", "frontend", "catalog", "v2", "200")] == 4
    assert s.requests[FlowKey("destination", "unknown", "catalog", "v2", "500")] == 1
    h = s.hists[FlowKey("source", "frontend", "catalog", "v2", "200")]
    assert h.count == 4 and h.buckets[math.inf] == 4 and h.buckets[0.5] == 1 and h.buckets[250.0] == 4


def _scrape(ok: float, err: float = 0.0, buckets=None, ejections: float | None = None) -> str:
    lines = [f'istio_requests_total{{reporter="source",source_workload="frontend",destination_service="catalog",'
             f'destination_version="v1",response_code="200"}} {ok}',
             f'istio_requests_total{{reporter="source",source_workload="frontend",destination_service="catalog",'
             f'destination_version="v1",response_code="500"}} {err}']
    total = 0
    for le, c in (buckets or {}).items():
        lines.append(f'istio_request_duration_milliseconds_bucket{{reporter="source",source_workload="frontend",'
                     f'destination_service="catalog",destination_version="v1",response_code="200",le="{le}"}} {c}')
        total = c
    if buckets:
        lines.append(f'istio_request_duration_milliseconds_count{{reporter="source",source_workload="frontend",'
                     f'destination_service="catalog",destination_version="v1",response_code="200"}} {total}')
        lines.append(f'istio_request_duration_milliseconds_sum{{reporter="source",source_workload="frontend",'
                     f'destination_service="catalog",destination_version="v1",response_code="200"}} {total * 2.0}')
    if ejections is not None:
        lines.append(f'mesh_outlier_ejections_total{{destination_service="catalog",destination_version="v1"}} {ejections}')
    return "\n".join(lines) + "\n"


def test_delta_baseline_growth_new_series_and_reset():
    first = parse_scrape(_scrape(10, 0))
    assert scrape_delta(None, first).empty()  # the first scrape is a baseline
    second = parse_scrape(_scrape(25, 3, {"1.0": 4, "+Inf": 5}, ejections=1))
    d = scrape_delta(first, second)
    assert d.requests[V1_OK] == 15 and d.requests[V1_OK._replace(code="500")] == 3
    assert d.hists[V1_OK].count == 5  # a series that appeared since the last scrape counts whole
    assert d.ejections == {("catalog", "v1"): 1}
    third = parse_scrape(_scrape(4, 0, {"1.0": 1, "+Inf": 2}, ejections=1))  # the sidecar restarted
    d = scrape_delta(second, third)
    assert d.requests[V1_OK] == 4 and V1_OK._replace(code="500") not in d.requests
    assert d.hists[V1_OK].count == 2 and d.hists[V1_OK].buckets[1.0] == 1
    assert d.ejections == {}


@pytest.mark.parametrize("started, watched_since, counted", [
    (None, 100.0, False),     # a node that does not say when it started: baseline
    (99.0, 100.0, False),     # started before meshd watched: its counts are old news
    (100.0, 100.0, True),     # born while watched: everything it counted is new
    (150.0, 100.0, True),
    (150.0, None, False),     # no watching time given: baseline
])
def test_first_scrape_counts_whole_only_for_a_node_born_while_watched(started, watched_since, counted):
    text = _scrape(7, 2, {"1.0": 5, "+Inf": 9})
    if started is not None:
        text += f"mesh_node_start_time_seconds {started}\n"
    cur = parse_scrape(text)
    assert cur.started == started
    d = scrape_delta(None, cur, watched_since=watched_since)
    if counted:
        assert d.requests[V1_OK] == 7 and d.requests[V1_OK._replace(code="500")] == 2
        assert d.hists[V1_OK].count == 9
    else:
        assert d.empty()


@pytest.mark.parametrize("q, expected", [(0.5, 3.0), (0.9, 8.0), (0.99, 9.8), (0.25, 1.0), (0.1, 0.4)])
def test_histogram_quantile_matches_hand_computation(q, expected):
    # 10 in (0,1], 20 in (1,5], 10 in (5,10]: p50 rank 20 -> 1 + 4 * 10/20 = 3; p90 rank 36 -> 5 + 5 * 6/10 = 8
    assert histogram_quantile(q, {1.0: 10, 5.0: 30, 10.0: 40, math.inf: 40}) == pytest.approx(expected)


def test_histogram_quantile_edges():
    assert histogram_quantile(0.9, {1.0: 10, math.inf: 20}) == 1.0  # rank in +Inf: highest finite bound
    assert histogram_quantile(0.5, {1.0: 0, math.inf: 0}) is None
    assert histogram_quantile(0.5, {1.0: 3}) is None               # no +Inf bucket
    assert histogram_quantile(0.5, {10.0: 6, 5.0: 8, math.inf: 8}) == pytest.approx(2.5)  # made monotonic


def test_window_rates_quantiles_and_eviction():
    w = Window(horizon_s=60, resolution_s=2)
    prev = parse_scrape(_scrape(0, 0, {"1.0": 0, "5.0": 0, "10.0": 0, "+Inf": 0}))
    t = 1000.0
    w.add(t, scrape_delta(None, prev), since=t)
    ok = err = 0
    buckets = {"1.0": 0, "5.0": 0, "10.0": 0, "+Inf": 0}
    for i in range(1, 16):  # 15 scrapes, 2 s apart: 9 ok + 1 error each
        ok, err = ok + 9, err + 1
        buckets = {"1.0": buckets["1.0"] + 2, "5.0": buckets["5.0"] + 6, "10.0": buckets["10.0"] + 8,
                   "+Inf": buckets["+Inf"] + 8}
        cur = parse_scrape(_scrape(ok, err, buckets))
        w.add(t + 2 * i, scrape_delta(prev, cur), since=t + 2 * (i - 1))
        prev = cur
    now = t + 30
    span = w.span(now, 60)
    assert span == 30  # only 30 s of data so far: rates divide by what was covered
    st = summarize(by_service_version(w.select(now, 60))[("catalog", "v1")], span)
    assert st.requests == 150 and st.errors == 15
    assert st.rps == pytest.approx(5.0) and st.success_rate == pytest.approx(0.9)
    assert st.p50 == pytest.approx(3.0) and st.p90 == pytest.approx(8.0)
    recent = summarize(by_service_version(w.select(now, 10))[("catalog", "v1")], 10)
    assert recent.requests == 50  # the last 10 s: 5 scrapes
    assert w.select(now + 200, 60) == {}  # all evicted past the horizon


def test_dedupe_prefers_the_callers_view_and_keeps_external_calls():
    def acc(n, e=0):
        return Acc(requests=n, errors=e, hist=Hist())
    flows = {
        FlowKey("source", "frontend", "catalog", "v1", "200"): acc(10),
        FlowKey("destination", "frontend", "catalog", "v1", "200"): acc(10),   # the same requests, seen inbound
        FlowKey("source", "frontend", "catalog", "v1", "503"): acc(2, 2),     # never reached catalog
        FlowKey("destination", "unknown", "catalog", "v1", "200"): acc(4),    # from outside the mesh
    }
    assert len(dedupe_reporters(flows)) == 3
    assert by_service_version(flows)[("catalog", "v1")].requests == 16
    assert by_service(flows)[("catalog",)].errors == 2
    edges = by_edge(flows)
    assert edges[("frontend", "catalog")].requests == 12 and edges[("unknown", "catalog")].requests == 4


def _stats(requests, errors=0, p99=None, span=10.0, p50=None):
    return Stats(requests=requests, errors=errors, span_s=span, p50=p50, p90=p99, p99=p99)


def test_error_spike_raises_and_clears_with_hysteresis():
    cfg = SpikeConfig(threshold=0.2, min_requests=20, clear_ratio=0.5, recovery_s=10)
    s = AlarmState()
    s, alarm = detect_error_spike(s, _stats(10, 9), 0, "catalog v2", cfg)
    assert alarm is None  # too few requests
    s, alarm = detect_error_spike(s, _stats(100, 25), 2, "catalog v2", cfg)
    assert alarm.kind == "error_rate_spike" and "25.0%" in alarm.message and s.active
    s, alarm = detect_error_spike(s, _stats(100, 15), 4, "catalog v2", cfg)
    assert alarm is None and s.active and s.clear_since is None   # under 20% but not under 10%
    s, alarm = detect_error_spike(s, _stats(100, 5), 6, "catalog v2", cfg)
    assert alarm is None and s.clear_since == 6
    s, alarm = detect_error_spike(s, _stats(100, 30), 8, "catalog v2", cfg)
    assert alarm is None and s.clear_since is None                # relapse resets the recovery clock
    s, _ = detect_error_spike(s, _stats(100, 1), 10, "catalog v2", cfg)
    s, alarm = detect_error_spike(s, _stats(100, 1), 19, "catalog v2", cfg)
    assert alarm is None and s.active
    s, alarm = detect_error_spike(s, _stats(100, 1), 20, "catalog v2", cfg)
    assert alarm.kind == "error_rate_recovered" and not s.active


def test_latency_jump_learns_a_baseline_then_alarms_and_recovers():
    cfg = LatencyConfig(k=3, clear_k=2, recovery_s=10, min_requests=20, warmup=3, alpha=0.5, floor_ms=5)
    s = AlarmState()
    for t in range(3):
        s, alarm = detect_latency_jump(s, _stats(100, p99=12.0), t, "catalog v1", cfg)
        assert alarm is None
    assert s.baseline == pytest.approx(12.0) and s.samples == 3
    s, alarm = detect_latency_jump(s, _stats(100, p99=30.0), 3, "catalog v1", cfg)
    assert alarm is None  # 2.5x: not a jump; learnt
    s, alarm = detect_latency_jump(s, _stats(100, p99=180.0), 4, "catalog v1", cfg)
    assert alarm.kind == "latency_jump" and "180 ms" in alarm.message and s.active
    base = s.baseline
    s, _ = detect_latency_jump(s, _stats(100, p99=180.0), 5, "catalog v1", cfg)
    assert s.baseline == base  # no learning while the alarm is active
    s, alarm = detect_latency_jump(s, _stats(100, p99=15.0), 6, "catalog v1", cfg)
    assert alarm is None and s.clear_since == 6
    s, alarm = detect_latency_jump(s, _stats(100, p99=15.0), 16, "catalog v1", cfg)
    assert alarm.kind == "latency_recovered" and not s.active


def test_latency_floor_keeps_sub_millisecond_noise_quiet():
    cfg = LatencyConfig(warmup=1, floor_ms=5)
    s, _ = detect_latency_jump(AlarmState(), _stats(100, p99=0.4), 0, "x", cfg)
    s, alarm = detect_latency_jump(s, _stats(100, p99=4.0), 1, "x", cfg)  # 10x a 0.4 ms p99, under 3 x 5 ms
    assert alarm is None


CFG = AdaptiveConfig(threshold=0.2, min_requests=20, recovery_s=60)


@pytest.mark.parametrize("state, window, now, action, mode, reason_has", [
    (AdaptiveState(), _stats(100, 30), 0, "tighten", "tight", "(30/100 requests) >= 20.0% (at least 21.9%"),
    (AdaptiveState(), _stats(20, 8), 0, "tighten", "tight", "tightening"),            # 40%: at least 21.9%
    (AdaptiveState(), _stats(100, 20), 0, None, "normal", "too few requests to be sure: at least 13.3%"),
    (AdaptiveState(), _stats(100, 25), 0, None, "normal", "too few requests to be sure"),
    (AdaptiveState(), _stats(1000, 250), 0, "tighten", "tight", "at least 22.4%"),    # 25%, sure now
    (AdaptiveState(), _stats(100, 19), 0, None, "normal", "below 20.0%"),
    (AdaptiveState(), _stats(10, 10), 0, None, "normal", "too few requests"),
    (AdaptiveState(mode="tight", below_since=50), _stats(100, 40), 100, None, "tight", "staying tight"),
    (AdaptiveState(mode="tight"), _stats(100, 1), 100, None, "tight", "relax after 60 s"),
    (AdaptiveState(mode="tight", below_since=50), _stats(100, 1), 100, None, "tight", "for 50 s"),
    (AdaptiveState(mode="tight", below_since=40), _stats(100, 1), 100, "relax", "normal", "relaxing"),
    (AdaptiveState(mode="tight", below_since=40), _stats(0, 0), 100, "relax", "normal", "relaxing"),
])
def test_adaptive_policy_table(state, window, now, action, mode, reason_has):
    new, act, reason = decide_adaptive_policy(state, window, now, CFG)
    assert (act.kind if act else None) == action and new.mode == mode and reason_has in reason
    if action == "tighten":
        assert act.overrides == TIGHT_OVERRIDES
    if action == "relax":
        assert act.overrides is None


@pytest.mark.parametrize("errors, requests, low", [
    (10, 10, 0.7225), (50, 100, 0.4038), (0, 10, 0.0), (8, 20, 0.2188), (100, 200, 0.4314), (0, 0, 0.0),
])
def test_wilson_lower_bound(errors, requests, low):
    assert wilson_lower_bound(errors, requests, 1.96) == pytest.approx(low, abs=1e-4)


@pytest.mark.parametrize("requests, errors, action", [
    (20, 8, None), (20, 12, None), (50, 20, None), (100, 40, None),   # 40-60% of a few: a 30% service's luck
    (200, 100, "tighten"), (100, 60, "tighten"),                      # half of 200, 60% of 100: sure
])
def test_the_default_loop_does_not_tighten_on_a_small_unlucky_window(requests, errors, action):
    """At the defaults (40%, 20 requests), a window a service failing 30% can show by chance does not
    tighten it; one that shows 40% or more surely does."""
    _, act, _ = decide_adaptive_policy(AdaptiveState(), _stats(requests, errors), 0, AdaptiveConfig())
    assert (act.kind if act else None) == action


def test_adaptive_policy_runs_a_whole_episode():
    state, t, actions = AdaptiveState(), 0.0, []
    for rate in [0.0] * 5 + [0.5] * 5 + [0.0] * 40:
        state, act, _ = decide_adaptive_policy(state, _stats(100, 100 * rate), t, CFG)
        if act:
            actions.append((t, act.kind))
        t += 2
    assert actions == [(10.0, "tighten"), (80.0, "relax")]  # below from t=20, relaxed 60 s later


@pytest.mark.parametrize("labels, expected", [
    # (labels of the service, its outlier section after tightening, as (c5xx, base s, max %))
    ({}, (2, 10.0, 50.0)),
    ({"mesh.outlier.consecutive-5xx": "1", "mesh.outlier.base-ejection": "5s",
      "mesh.outlier.max-ejection-percent": "80%"}, (1, 5.0, 80.0)),          # already tighter: kept
    ({"mesh.outlier.consecutive-5xx": "off"}, (None, 10.0, 50.0)),           # off stays off
    ({"mesh.outlier.consecutive-5xx": "3", "mesh.outlier.base-ejection": "1m"}, (2, 10.0, 50.0)),
    ({"mesh.outlier.max-ejection-percent": "50%"}, (2, 10.0, 50.0)),
])
def test_tighten_policy_changes_typed_fields_and_never_loosens(labels, expected):
    policy = decode_traffic_policy({**labels, "mesh.timeout": "2s", "mesh.lb": "round-robin"})
    tight = tighten_policy(policy, TIGHT_OVERRIDES)
    o = tight.outlier
    assert (o.consecutive_5xx, o.base_ejection, o.max_ejection_percent) == expected
    # only the outlier section moves; everything else is the labels' own
    assert tight.timeout == 2.0 and tight.lb == "round-robin" and tight.retries == policy.retries
    assert (o.interval, o.max_ejection, o.min_health_percent) == (policy.outlier.interval,
                                                                    policy.outlier.max_ejection,
                                                                    policy.outlier.min_health_percent)


def test_tighten_policy_returns_the_policy_itself_when_nothing_changes():
    strict = decode_traffic_policy({"mesh.outlier.consecutive-5xx": "1", "mesh.outlier.base-ejection": "5s",
                                    "mesh.outlier.max-ejection-percent": "90%"})
    assert tighten_policy(strict, TIGHT_OVERRIDES) is strict
    assert tighten_policy(DEFAULT_POLICY, None) is DEFAULT_POLICY


@pytest.mark.parametrize("raw, expected", [
    ({"consecutive_5xx": 2, "base_ejection_s": 10.0, "max_ejection_percent": 50.0}, TIGHT_OVERRIDES),
    ({"consecutive_5xx": 3, "base_ejection_s": 1, "max_ejection_percent": 100}, OutlierOverrides(3, 1.0, 100.0)),
    ({"mesh.outlier.consecutive-5xx": "2", "mesh.outlier.base-ejection": "10s"}, None),  # an older meshd's
    ({"consecutive_5xx": 0, "base_ejection_s": 10.0, "max_ejection_percent": 50.0}, None),
    ({"consecutive_5xx": 2.5, "base_ejection_s": 10.0, "max_ejection_percent": 50.0}, None),
    ({"consecutive_5xx": True, "base_ejection_s": 10.0, "max_ejection_percent": 50.0}, None),
    ({"consecutive_5xx": 2, "base_ejection_s": 0, "max_ejection_percent": 50.0}, None),
    ({"consecutive_5xx": 2, "base_ejection_s": float("inf"), "max_ejection_percent": 50.0}, None),
    ({"consecutive_5xx": 2, "base_ejection_s": 10.0, "max_ejection_percent": 101}, None),
    ({"consecutive_5xx": 2, "base_ejection_s": 10.0}, None),
    ([2, 10, 50], None),
])
def test_decode_overrides(raw, expected):
    assert decode_overrides(raw) == expected
    if expected is not None:
        assert decode_overrides(encode_overrides(expected)) == expected


def test_compare_versions_verdicts():
    v1 = _stats(1000, 1, p99=12.0, p50=3.0, span=60)
    v2 = _stats(1000, 2, p99=180.0, p50=3.0, span=60)
    v = compare_versions(v1, v2, "v1", "v2")
    assert v.significant and v.text == "v2 is slower: p99 180 ms vs 12 ms (+1400%)"
    v = compare_versions(v1, _stats(1000, 1, p99=13.0, p50=3.1, span=60), "v1", "v2")
    assert not v.significant and v.text.startswith("no significant difference")
    v = compare_versions(v1, _stats(500, 100, p99=12.0, p50=3.0, span=60), "v1", "v2")
    assert v.significant and v.text.startswith("v2 fails more: success 80.0% vs 99.9% (v1)")
    v = compare_versions(v1, _stats(5, 0, p99=999.0, span=60), "v1", "v2")
    assert not v.significant and "not enough traffic" in v.text and "v2 has 5" in v.text
    v = compare_versions(v2, v1, "v2", "v1")
    assert v.text == "v1 is faster: p99 12 ms vs 180 ms (-93%)"
    # 3 errors in 100 against 1 in 100: 2 points apart, but not significant with so few requests
    assert not compare_versions(_stats(100, 1, p99=5), _stats(100, 3, p99=5), "a", "b").significant


def test_health_view_takes_the_worse_reporter_per_flow():
    from meshcore.flowstats import Acc, health_by_service
    from meshcore.promtext import FlowKey
    # orders' outbound sees 100 answers, 2 failed after retries; payments' inbound saw 140 tries, 60 failed
    flows = {
        FlowKey("source", "orders", "payments", "v1", "200"): Acc(requests=98),
        FlowKey("source", "orders", "payments", "v1", "503"): Acc(requests=2, errors=2),
        FlowKey("destination", "orders", "payments", "v1", "200"): Acc(requests=80),
        FlowKey("destination", "orders", "payments", "v1", "500"): Acc(requests=60, errors=60),
        # a service nobody can reach: only its callers see the failures
        FlowKey("source", "orders", "users", "v1", "503"): Acc(requests=10, errors=10),
    }
    health = health_by_service(flows)
    assert health[("payments",)].requests == 140 and health[("payments",)].errors == 60
    assert health[("users",)].errors == 10


def test_request_families_are_rendered_again_only_after_a_count():
    telemetry = pytest.importorskip("sidecar.telemetry")
    from meshcore.metrics import render_families

    t = telemetry.Telemetry()
    t.record_request("source", "frontend", "v1", "catalog", "catalog", "v2", 200, "-", 3.0)
    collector = next(c for c in t.registry.collectors() if hasattr(c, "exposition"))
    first = collector.exposition()
    assert first == render_families(collector.collect()) and collector.exposition() is first   # cached
    t.series[next(iter(t.series))].count += 1      # the proxy's fast path counts a known series in place
    t.series[next(iter(t.series))].buckets[0] += 1
    second = collector.exposition()
    assert second is not first and second == render_families(collector.collect())
    t.record_request("destination", "unknown", "unknown", "catalog", "catalog", "v2", 500, "-", 2.0)
    assert 'response_code="500"' in collector.exposition()
    s = parse_scrape(telemetry.render_metrics(t).decode())
    assert s.requests[FlowKey("source", "frontend", "catalog", "v2", "200")] == 2


def test_window_merges_old_slots_and_stays_exact_over_the_last_minute():
    """Ten requests every 2 s for 300 s: beyond 70 s the 2 s slots are merged into 10 s ones, counts
    over any span stay whole, and the last 60 s are exact."""
    w = Window(horizon_s=300, resolution_s=2)
    t, ok = 1000.0, 0
    prev = parse_scrape(_scrape(0, 0, {"+Inf": 0}))
    w.add(t, scrape_delta(None, prev), since=t)
    counts = []
    for i in range(1, 151):
        ok += 10
        cur = parse_scrape(_scrape(ok, 0, {"+Inf": ok}))
        w.add(t + 2 * i, scrape_delta(prev, cur), since=t + 2 * (i - 1))
        prev = cur
        counts.append(len(w.slots))
    now = t + 300
    assert max(counts) <= 70 / 2 + (300 - 70) / 10 + 2        # 2 s slots for 70 s, 10 s slots beyond: not 150
    assert all(end % 10 == 0 for end, _, _ in w.coarse) and len(w.fine) <= 35
    total = lambda span: by_service_version(w.select(now, span))[("catalog", "v1")].requests  # noqa: E731
    assert total(60) == 300 and total(10) == 50 and total(2) == 10       # exact
    assert total(300) == 1500                                            # every delta of the last 300 s
    assert 590 <= total(120) <= 700                                      # to the nearest 10 s beyond 70 s
