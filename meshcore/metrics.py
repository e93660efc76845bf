"""A minimal Prometheus registry and text exposition (format 0.0.4) for the sidecar and gateway.

The subset of prometheus_client's API the nodes use, with the same shapes (`collect()` yields families
whose `samples` are `Sample(name, labels, value)`; counter families are named without `_total`, their
samples with it) and the same text output, minus the `_created` series. prometheus_client costs each
sidecar ~3 MiB of memory (it imports http.server, email, wsgiref, urllib...); meshd keeps using it.

No locks: updates run on the event loop's thread, except the span exporter's thread (sidecar.tracing),
which writes series of its own. Each series has one writing thread, children are created with
`dict.setdefault` (atomic under the GIL) and a scrape iterates copies, so nothing needs a lock.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")


class Sample(NamedTuple):
    """One exposed value: full sample name (`x_total`, `x_bucket`...), label dict, value."""
    name: str
    labels: dict
    value: float


class MetricFamily:
    """A named, typed set of samples, as a collector yields it at each scrape."""

    def __init__(self, name: str, documentation: str, typ: str):
        self.name = name
        self.documentation = documentation
        self.type = typ
        self.samples: list[Sample] = []

    def __repr__(self) -> str:
        return f"MetricFamily({self.name!r}, {self.type!r}, {self.samples!r})"


class CounterMetricFamily(MetricFamily):
    """A counter family built by a custom collector; `name` may end in `_total` (stripped)."""

    def __init__(self, name: str, documentation: str, labels: Sequence[str] = ()):
        super().__init__(name[:-6] if name.endswith("_total") else name, documentation, "counter")
        self._labelnames = tuple(labels)

    def add_metric(self, label_values: Sequence[str], value: float) -> None:
        """Add the series `name_total{labels}` = value."""
        self.samples.append(Sample(self.name + "_total", dict(zip(self._labelnames, label_values)), value))


class HistogramMetricFamily(MetricFamily):
    """A histogram family built by a custom collector."""

    def __init__(self, name: str, documentation: str, labels: Sequence[str] = ()):
        super().__init__(name, documentation, "histogram")
        self._labelnames = tuple(labels)

    def add_metric(self, label_values: Sequence[str], buckets: Sequence[tuple[str, float]],
                   sum_value: float) -> None:
        """Add `_bucket{le}` per (le, cumulative count), then `_count` (the last, +Inf, bucket) and `_sum`."""
        labels = dict(zip(self._labelnames, label_values))
        for le, count in buckets:
            self.samples.append(Sample(self.name + "_bucket", {**labels, "le": le}, count))
        self.samples.append(Sample(self.name + "_count", labels, buckets[-1][1]))
        self.samples.append(Sample(self.name + "_sum", dict(labels), sum_value))


_SUFFIXES = {"counter": ("", "_total"), "histogram": ("", "_bucket", "_count", "_sum")}


class Registry:
    """Collectors (anything with `collect()` yielding MetricFamily), collected in registration order."""

    def __init__(self) -> None:
        self._collectors: list[Any] = []
        self._names: set[str] = set()

    def register(self, collector: Any) -> None:
        """Add a collector; ValueError naming them when its metric names are already registered."""
        families = collector.describe() if hasattr(collector, "describe") else collector.collect()
        names = {f.name + s for f in families for s in _SUFFIXES.get(f.type, ("",))}
        taken = names & self._names
        if taken:
            raise ValueError(f"duplicate metric names in registry: {', '.join(sorted(taken))}")
        self._names |= names
        self._collectors.append(collector)

    def collectors(self) -> list[Any]:
        """The collectors, in registration order."""
        return list(self._collectors)

    def collect(self) -> Iterator[MetricFamily]:
        """Every family of every collector, as of now."""
        for collector in list(self._collectors):
            yield from collector.collect()

    def get_sample_value(self, name: str, labels: dict | None = None) -> float | None:
        """The value of the sample `name` whose labels are exactly `labels` (default none), or None."""
        labels = labels or {}
        for family in self.collect():
            for s in family.samples:
                if s.name == name and s.labels == labels:
                    return s.value
        return None


CollectorRegistry = Registry


class _CounterChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        """Add `amount` (>= 0)."""
        if amount < 0:
            raise ValueError("counters can only be incremented by non-negative amounts")
        self.value += amount

    def get(self) -> float:
        return self.value


class _GaugeChild:
    __slots__ = ("value", "_fn")

    def __init__(self) -> None:
        self.value = 0.0
        self._fn: Callable[[], float] | None = None

    def set(self, value: float) -> None:
        """Set the value."""
        self.value = float(value)

    def inc(self, amount: float = 1) -> None:
        """Add `amount`."""
        self.value += amount

    def dec(self, amount: float = 1) -> None:
        """Subtract `amount`."""
        self.value -= amount

    def set_function(self, fn: Callable[[], float]) -> None:
        """Read the value from `fn()` at each scrape from now on."""
        self._fn = fn

    def get(self) -> float:
        return float(self._fn()) if self._fn is not None else self.value


class _Metric:
    """A metric with children per label values (an unlabelled one has the single child `()`)."""

    _type = ""
    _child: type = object
    _suffix = ""

    def __init__(self, name: str, documentation: str, labelnames: Iterable[str] = (),
                 registry: Registry | None = None):
        if self._type == "counter" and name.endswith("_total"):
            name = name[:-6]
        labelnames = tuple(labelnames)
        if not _NAME.match(name) or not all(_LABEL.match(n) and not n.startswith("__") for n in labelnames):
            raise ValueError(f"invalid metric or label name: {name} {labelnames}")
        self.name = name
        self.documentation = documentation
        self._labelnames = labelnames
        self._children: dict[tuple[str, ...], Any] = {} if labelnames else {(): self._child()}
        if registry is not None:
            registry.register(self)

    def labels(self, *values: Any, **kw: Any) -> Any:
        """The child for these label values (positional, or all names as keywords); created at first use."""
        if kw:
            if values or set(kw) != set(self._labelnames):
                raise ValueError(f"{self.name}: labels {sorted(kw)} given, expected {list(self._labelnames)}")
            values = tuple(kw[n] for n in self._labelnames)
        if not self._labelnames or len(values) != len(self._labelnames):
            raise ValueError(f"{self.name}: {len(values)} label values given, expected {list(self._labelnames)}")
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        return child if child is not None else self._children.setdefault(key, self._child())

    def _single(self) -> Any:
        if self._labelnames:
            raise ValueError(f"{self.name}: labelled metric, use .labels(...) first")
        return self._children[()]

    def describe(self) -> list[MetricFamily]:
        return [MetricFamily(self.name, self.documentation, self._type)]

    def collect(self) -> Iterator[MetricFamily]:
        family = MetricFamily(self.name, self.documentation, self._type)
        name = self.name + self._suffix
        for key, child in self._children.copy().items():
            family.samples.append(Sample(name, dict(zip(self._labelnames, key)), child.get()))
        yield family


class Counter(_Metric):
    """A monotonic counter: family `name`, samples `name_total` (no `_created` samples)."""

    _type = "counter"
    _child = _CounterChild
    _suffix = "_total"

    def inc(self, amount: float = 1) -> None:
        """Add `amount` (>= 0) to an unlabelled counter."""
        self._single().inc(amount)


class Gauge(_Metric):
    """A value that goes up and down, or is read from a function at scrape time."""

    _type = "gauge"
    _child = _GaugeChild

    def set(self, value: float) -> None:
        """Set an unlabelled gauge."""
        self._single().set(value)

    def inc(self, amount: float = 1) -> None:
        """Add to an unlabelled gauge."""
        self._single().inc(amount)

    def dec(self, amount: float = 1) -> None:
        """Subtract from an unlabelled gauge."""
        self._single().dec(amount)

    def set_function(self, fn: Callable[[], float]) -> None:
        """Make an unlabelled gauge read `fn()` at each scrape."""
        self._single().set_function(fn)


# ---- text exposition format 0.0.4 -------------------------------------------------------------------

def format_value(value: float) -> str:
    """A value as prometheus_client writes it (Go's formatting): `1.0`, `2.5e+06`, `+Inf`, `-Inf`, `NaN`."""
    d = float(value)
    if d == math.inf:
        return "+Inf"
    if d == -math.inf:
        return "-Inf"
    if math.isnan(d):
        return "NaN"
    s = repr(d)
    dot = s.find(".")
    if d > 0 and dot > 6:  # Go switches to exponents sooner than Python
        return f"{s[0]}.{s[1:dot]}{s[dot + 1:]}".rstrip("0.") + f"e+{dot - 1:02d}"
    return s


def _escape_label_value(v: str) -> str:
    return v.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def render_families(families: Iterable[MetricFamily]) -> str:
    """Families in the Prometheus text format (CONTENT_TYPE), labels sorted by name."""
    out = []
    for family in families:
        name = family.name + "_total" if family.type == "counter" else family.name
        doc = family.documentation.replace("\\", r"\\").replace("\n", r"\n")
        out.append(f"# HELP {name} {doc}\n# TYPE {name} {family.type}\n")
        for s in family.samples:
            labels = ",".join(f'{k}="{_escape_label_value(v)}"' for k, v in sorted(s.labels.items()))
            out.append(f"{s.name}{{{labels}}} {format_value(s.value)}\n" if labels
                       else f"{s.name} {format_value(s.value)}\n")
    return "".join(out)


def render(registry: Registry) -> bytes:
    """The registry in the Prometheus text format (CONTENT_TYPE), UTF-8. A collector with an
    `exposition()` method renders itself (it may cache its text while nothing changed)."""
    out = []
    for collector in registry.collectors():
        own = getattr(collector, "exposition", None)
        out.append(own() if own is not None else render_families(collector.collect()))
    return "".join(out).encode("utf-8")
