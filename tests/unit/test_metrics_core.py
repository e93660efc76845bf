"""meshcore.metrics: the nodes' registry and text exposition, checked against prometheus_client (which the
tests, and meshd, may import; the sidecar and gateway do not)."""

from __future__ import annotations

import math

import pytest
from prometheus_client import generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString

from meshcore.metrics import (
    CONTENT_TYPE, CollectorRegistry, Counter, CounterMetricFamily, Gauge, HistogramMetricFamily, Registry,
    Sample, format_value, render,
)

AWKWARD = ['say "hi"', "back\\slash", "two\nlines", "ünïcødé ✓", "", "\\n literal", 'end\\"']


class _Families:
    """A collector yielding fixed families."""

    def __init__(self, *families):
        self.families = families

    def collect(self):
        yield from self.families


def build() -> tuple[Registry, dict]:
    """A registry with every kind of series, and what its samples must read back as."""
    reg = Registry()
    plain = Counter("jobs", "Jobs done.", registry=reg)
    plain.inc()
    plain.inc(2.5)
    by_kind = Counter("events_total", "Events by kind and value.", ("kind", "value"), registry=reg)
    for i, v in enumerate(AWKWARD):
        by_kind.labels("awkward", v).inc(i + 1)
    by_kind.labels(kind="kw", value="x").inc()
    temp = Gauge("temperature_celsius", "Temperature,\nwith a \\ in its help.", ("room",), registry=reg)
    temp.labels("hall").set(-3.25)
    temp.labels("oven").set(math.inf)
    temp.labels("void").set(-math.inf)
    temp.labels('q"uote').inc(7)
    temp.labels('q"uote').dec(2)
    level = Gauge("level", "Read at scrape time.", registry=reg)
    level.set_function(lambda: 12345678.0)
    hist = HistogramMetricFamily("latency_ms", "Latency.", labels=("path",))
    hist.add_metric(["/a\"b"], [("0.5", 1), ("10.0", 3), ("+Inf", 4)], 21.5)
    hist.add_metric(["/ü\n"], [("0.5", 0), ("10.0", 0), ("+Inf", 0)], 0)
    custom = CounterMetricFamily("custom_total", "A collector's counter.", labels=("a",))
    custom.add_metric(["x\\y"], 9)
    reg.register(_Families(hist, custom))
    expected = {
        ("jobs", "counter"): {("jobs_total", ()): 3.5},
        ("events", "counter"): {**{("events_total", (("kind", "awkward"), ("value", v))): float(i + 1)
                                   for i, v in enumerate(AWKWARD)},
                                ("events_total", (("kind", "kw"), ("value", "x"))): 1.0},
        ("temperature_celsius", "gauge"): {("temperature_celsius", (("room", "hall"),)): -3.25,
                                           ("temperature_celsius", (("room", "oven"),)): math.inf,
                                           ("temperature_celsius", (("room", "void"),)): -math.inf,
                                           ("temperature_celsius", (("room", 'q"uote'),)): 5.0},
        ("level", "gauge"): {("level", ()): 12345678.0},
        ("latency_ms", "histogram"): {
            **{("latency_ms_bucket", (("le", le), ("path", '/a"b'))): n for le, n in (("0.5", 1), ("10.0", 3), ("+Inf", 4))},
            ("latency_ms_count", (("path", '/a"b'),)): 4, ("latency_ms_sum", (("path", '/a"b'),)): 21.5,
            **{("latency_ms_bucket", (("le", le), ("path", "/ü\n"))): 0 for le in ("0.5", "10.0", "+Inf")},
            ("latency_ms_count", (("path", "/ü\n"),)): 0, ("latency_ms_sum", (("path", "/ü\n"),)): 0},
        ("custom", "counter"): {("custom_total", (("a", "x\\y"),)): 9},
    }
    return reg, expected


def test_round_trip_through_prometheus_clients_parser():
    reg, expected = build()
    text = render(reg).decode("utf-8")
    got = {}
    docs = {}
    for fam in text_string_to_metric_families(text):
        got[(fam.name, fam.type)] = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in fam.samples}
        docs[fam.name] = fam.documentation
    assert got == expected
    assert list(got) == list(expected)  # registration order
    assert docs["temperature_celsius"] == "Temperature,\nwith a \\ in its help."


def _as_prometheus_client(reg: Registry):
    """The same families as prometheus_client Metric objects (to render with its generate_latest)."""
    class Collector:
        def collect(self):
            for fam in reg.collect():
                m = Metric(fam.name, fam.documentation, fam.type)
                for s in fam.samples:
                    m.add_sample(s.name, s.labels, s.value)
                yield m
    return Collector()


def test_text_is_byte_for_byte_prometheus_clients():
    reg, _ = build()
    assert render(reg) == generate_latest(_as_prometheus_client(reg))


@pytest.mark.parametrize("value", [0, 1, -1, 0.5, 1e-9, 123456.0, 1234567.0, 12345678.9, 1e22, -1e22, 2**53,
                                   3.735928559e9, math.inf, -math.inf, math.nan])
def test_format_value_matches_prometheus_client(value):
    assert format_value(value) == floatToGoString(value)


@pytest.mark.parametrize("value, text", [(1, "1.0"), (math.inf, "+Inf"), (-math.inf, "-Inf"), (math.nan, "NaN"),
                                         (10005130.3, "1.00051303e+07")])
def test_format_value_table(value, text):
    assert format_value(value) == text


@pytest.mark.parametrize("build_metric, lines", [
    (lambda r: Counter("a", "Help.", registry=r), ["# HELP a_total Help.", "# TYPE a_total counter", "a_total 0.0"]),
    (lambda r: Counter("a", "Help.", ("x",), registry=r), ["# HELP a_total Help.", "# TYPE a_total counter"]),
    (lambda r: Gauge("g", "Help.", registry=r), ["# HELP g Help.", "# TYPE g gauge", "g 0.0"]),
    (lambda r: Gauge("g", "Help.", ("x",), registry=r), ["# HELP g Help.", "# TYPE g gauge"]),
    (lambda r: Gauge("g", "", ("b", "a"), registry=r).labels("1", "2").set(3),
     ["# HELP g ", "# TYPE g gauge", 'g{a="2",b="1"} 3.0']),  # labels sorted by name
    (lambda r: Counter("c", "", ("v",), registry=r).labels('a"b\\c\nd').inc(),
     ["# HELP c_total ", "# TYPE c_total counter", 'c_total{v="a\\"b\\\\c\\nd"} 1.0']),
])
def test_exposition_table(build_metric, lines):
    reg = Registry()
    build_metric(reg)
    assert render(reg).decode().splitlines() == lines


def test_collect_shapes_like_prometheus_client():
    reg = CollectorRegistry()
    c = Counter("hits_total", "Hits.", ("code",), registry=reg)
    c.labels(200).inc(3)
    (fam,) = reg.collect()
    assert (fam.name, fam.documentation, fam.type) == ("hits", "Hits.", "counter")
    assert fam.samples == [Sample("hits_total", {"code": "200"}, 3.0)]
    s = fam.samples[0]
    assert (s.name, s.labels, s.value) == ("hits_total", {"code": "200"}, 3.0)
    assert CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"


def test_get_sample_value():
    reg, _ = build()
    assert reg.get_sample_value("jobs_total") == 3.5
    assert reg.get_sample_value("events_total", {"kind": "kw", "value": "x"}) == 1.0
    assert reg.get_sample_value("events_total", {"kind": "kw"}) is None  # labels must match exactly
    assert reg.get_sample_value("events", {"kind": "kw", "value": "x"}) is None  # the sample name, not the family
    assert reg.get_sample_value("level") == 12345678.0
    assert reg.get_sample_value("latency_ms_count", {"path": '/a"b'}) == 4
    assert reg.get_sample_value("latency_ms_bucket", {"path": '/a"b', "le": "10.0"}) == 3
    assert reg.get_sample_value("nothing") is None


def test_set_function_is_read_at_each_scrape():
    reg = Registry()
    box = [1]
    Gauge("idle", "", registry=reg).set_function(lambda: box[0])
    assert reg.get_sample_value("idle") == 1.0
    box[0] = 5
    assert reg.get_sample_value("idle") == 5.0


def test_children_are_cached_and_unregistered_metrics_are_fine():
    c = Counter("free", "", ("a",))  # registry None: not registered anywhere
    assert c.labels("x") is c.labels(a="x")
    c.labels("x").inc()
    assert [s.value for f in c.collect() for s in f.samples] == [1.0]


@pytest.mark.parametrize("first, second", [
    (lambda r: Counter("dup", "", registry=r), lambda r: Counter("dup_total", "", registry=r)),
    (lambda r: Counter("dup", "", registry=r), lambda r: Gauge("dup_total", "", registry=r)),
    (lambda r: Gauge("dup", "", registry=r), lambda r: Gauge("dup", "", ("x",), registry=r)),
    (lambda r: r.register(_Families(HistogramMetricFamily("dup", "", labels=()))),
     lambda r: Gauge("dup_bucket", "", registry=r)),
])
def test_duplicate_names_raise_naming_the_metric(first, second):
    reg = Registry()
    first(reg)
    with pytest.raises(ValueError, match="dup"):
        second(reg)
    assert len(list(reg.collect())) == 1


@pytest.mark.parametrize("call", [
    lambda m: m.labels("only-one"),
    lambda m: m.labels("a", "b", "c"),
    lambda m: m.labels(code="200"),
    lambda m: m.labels(code="200", method="GET", extra="x"),
    lambda m: m.labels("200", method="GET"),
    lambda m: m.inc(),          # a labelled metric needs its labels
])
def test_label_arity_errors_name_the_metric(call):
    m = Counter("requests_by_code", "", ("code", "method"))
    with pytest.raises(ValueError, match="requests_by_code"):
        call(m)


def test_labels_on_an_unlabelled_metric_and_bad_values():
    g = Gauge("plain_gauge", "")
    with pytest.raises(ValueError, match="plain_gauge"):
        g.labels("x")
    with pytest.raises(ValueError):
        Counter("c", "").inc(-1)
    with pytest.raises(ValueError):
        Counter("bad-name", "")
    with pytest.raises(ValueError):
        Gauge("g", "", ("le-x",))
