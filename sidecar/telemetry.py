"""Request metrics with Istio's standard names and labels, on a registry of the node's own.

The hot path is one dict lookup (the series of a label tuple) plus three in-place updates (count,
sum, one histogram bucket found by bisection): no locks, no per-request objects. The series are
exposed at scrape time by a collector as `istio_requests_total` (counter) and
`istio_request_duration_milliseconds` (histogram). prometheus-client's own Counter/Histogram cost
several microseconds per request (a lock per update, a linear bucket scan), which matters at proxy
rates. Everything runs on the event loop's thread, scrapes included. The registry and the text format
are meshcore.metrics (standard library only; the nodes do not import prometheus_client).
"""

from __future__ import annotations

import time
from bisect import bisect_left
from typing import Callable, Iterator

from meshcore.protocol import NODE_START_TIME_METRIC
from meshcore.metrics import (
    CONTENT_TYPE, Counter, CounterMetricFamily, Gauge, HistogramMetricFamily, MetricFamily, Registry, render,
    render_families,
)

REPORTER_SOURCE = "source"            # outbound sidecar and gateway (Istio's ingress reports "source")
REPORTER_DESTINATION = "destination"  # inbound sidecar
NO_FLAGS = "-"                        # Envoy's response_flags when there are none
UNKNOWN = "unknown"

# Istio's default buckets for istio_request_duration_milliseconds.
DURATION_BUCKETS_MS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000,
                       300000, 600000, 1800000, 3600000)
DURATION_BOUNDS = tuple(float(b) for b in DURATION_BUCKETS_MS)   # upper bounds, for bisect_left
_BOUND_NAMES = tuple(str(b) for b in DURATION_BOUNDS) + ("+Inf",)

REQUEST_LABELS = ("reporter", "source_workload", "source_version", "destination_service",
                  "destination_workload", "destination_version", "request_protocol", "response_code",
                  "response_flags", "grpc_response_status", "connection_security_policy")
MUTUAL_TLS = "mutual_tls"   # connection_security_policy of a request that crossed an mTLS hop (Istio's value)
NO_TLS = "none"

TUNNEL_LABELS = ("reporter", "source_workload", "source_version", "destination_service", "destination_version")



class _Series:
    __slots__ = ("labels", "count", "sum", "buckets")

    def __init__(self, labels: tuple[str, ...]):
        self.labels = labels
        self.count = 0
        self.sum = 0.0
        self.buckets = [0] * (len(DURATION_BOUNDS) + 1)  # per bucket, not cumulative; last is +Inf


class _RequestCollector:
    """Exposes the request series as Istio's counter and histogram."""

    def __init__(self, series: dict):
        self._series = series
        self._text_key: tuple[int, int] | None = None
        self._text = ""

    def exposition(self) -> str:
        """The two families' text, rendered again only when a request was counted since the last
        time: series are never removed and counts only grow, so (series, total count) says it.
        An idle node answers a scrape without re-rendering its histograms (most of its text)."""
        series = self._series
        key = (len(series), sum(s.count for s in series.values()))
        if key != self._text_key:
            self._text, self._text_key = render_families(self.collect()), key
        return self._text

    def describe(self) -> list[MetricFamily]:
        return [CounterMetricFamily("istio_requests_total", "", labels=REQUEST_LABELS),
                HistogramMetricFamily("istio_request_duration_milliseconds", "", labels=REQUEST_LABELS)]

    def collect(self) -> Iterator[MetricFamily]:
        total = CounterMetricFamily("istio_requests_total", "Requests handled by the proxy.",
                                    labels=REQUEST_LABELS)
        duration = HistogramMetricFamily(
            "istio_request_duration_milliseconds",
            "Request duration in milliseconds, first request byte to last response byte.",
            labels=REQUEST_LABELS)
        for s in list(self._series.values()):
            total.add_metric(s.labels, s.count)
            cumulative = 0
            buckets = []
            for name, n in zip(_BOUND_NAMES, s.buckets):
                cumulative += n
                buckets.append((name, cumulative))
            duration.add_metric(s.labels, buckets, s.sum)
        yield total
        yield duration


class _HeldWritesCollector:
    """Exposes the write batch's counts (sidecar/datapath/batch.py), read at scrape time."""

    def __init__(self, counts: Callable[[], tuple[int, int]]):
        self._counts = counts

    def describe(self) -> list[MetricFamily]:
        return [CounterMetricFamily("mesh_sidecar_held_write_turns_total", ""),
                CounterMetricFamily("mesh_sidecar_held_writes_total", "")]

    def collect(self) -> Iterator[MetricFamily]:
        turns, writes = self._counts()
        held_turns = CounterMetricFamily("mesh_sidecar_held_write_turns_total",
                                         "Event-loop turns whose writes were held to the turn's end (a busy node).")
        held_turns.add_metric((), turns)
        held = CounterMetricFamily("mesh_sidecar_held_writes_total",
                                   "Connections written at the end of those turns, each with one write.")
        held.add_metric((), writes)
        yield held_turns
        yield held


class Telemetry:
    """The node's metrics: Istio request metrics plus a few of the sidecar's own gauges."""

    def __init__(self, registry: Registry | None = None, started: float | None = None):
        self.registry = registry if registry is not None else Registry()
        # record_request's key (REQUEST_LABELS' values, response_code an int) -> its series;
        # sidecar.proxy.count_request counts into a series it finds here itself (the last three
        # lines of record_request, compiled) and calls record_request for a new one.
        self.series: dict[tuple, _Series] = {}
        self.registry.register(_RequestCollector(self.series))
        # meshd counts a node's first scrape whole when the node started while it watched
        # (meshcore.promtext.scrape_delta): requests before that scrape are not lost.
        self.start_time = Gauge(NODE_START_TIME_METRIC, "When this node's metrics began, seconds since the epoch.",
                                registry=self.registry)
        self.start_time.set(time.time() if started is None else started)
        self.connections_active = Gauge(
            "mesh_sidecar_connections_active", "Downstream connections open, by listener direction.",
            ("direction",), registry=self.registry)
        self.pool_idle = Gauge(
            "mesh_sidecar_upstream_pool_idle", "Idle keep-alive upstream connections in the pools.",
            registry=self.registry)
        self._conn_children: dict[str, Gauge] = {}
        self.mirror_requests = Counter(
            "mesh_mirror_requests", "Mirrored (shadow) request copies sent by the proxy, by the shadow's answer "
            "(response_code 0: no answer).",
            ("source_workload", "destination_service", "destination_version", "response_code"),
            registry=self.registry)
        self._mirror_children: dict[tuple, Counter] = {}
        # Istio's TCP byte counters, here for the tunnels an HTTP Upgrade (WebSocket) becomes:
        # received = bytes from the client's side, sent = bytes from the server's side.
        self.tcp_received = Counter("istio_tcp_received_bytes", "Bytes a tunnel carried from its client.",
                                    TUNNEL_LABELS, registry=self.registry)
        self.tcp_sent = Counter("istio_tcp_sent_bytes", "Bytes a tunnel carried from its server.",
                                TUNNEL_LABELS, registry=self.registry)

    def record_request(self, reporter: str, source_workload: str, source_version: str,
                       destination_service: str, destination_workload: str, destination_version: str,
                       response_code: int, response_flags: str, duration_ms: float,
                       request_protocol: str = "http", grpc_response_status: str = "",
                       connection_security_policy: str = NO_TLS) -> None:
        """Count one finished request and observe its duration (a gRPC call: its grpc-status; over
        mutual TLS: connection_security_policy mutual_tls)."""
        key = (reporter, source_workload, source_version, destination_service, destination_workload,
               destination_version, request_protocol, response_code, response_flags, grpc_response_status,
               connection_security_policy)
        s = self.series.get(key)
        if s is None:
            s = self.series[key] = _Series(key[:7] + (str(response_code), response_flags, grpc_response_status,
                                                      connection_security_policy))
        s.count += 1
        s.sum += duration_ms
        s.buckets[bisect_left(DURATION_BOUNDS, duration_ms)] += 1

    def request_count(self, **labels: str) -> int:
        """Requests recorded whose labels include all of `labels` (for tests and the admin API)."""
        idx = [(REQUEST_LABELS.index(k), v) for k, v in labels.items()]
        return sum(s.count for s in self.series.values() if all(s.labels[i] == v for i, v in idx))

    def record_mirror(self, source_workload: str, destination_service: str, destination_version: str,
                      response_code: int) -> None:
        """Count one mirrored request copy (`mesh_mirror_requests_total`); 0 = no answer."""
        key = (source_workload, destination_service, destination_version, response_code)
        child = self._mirror_children.get(key)
        if child is None:
            child = self._mirror_children[key] = self.mirror_requests.labels(
                source_workload, destination_service, destination_version, str(response_code))
        child.inc()

    def record_tunnel_bytes(self, labels: tuple, received: int, sent: int) -> None:
        """Count the bytes of a tunnel (TUNNEL_LABELS' values) that ended or moved on."""
        if received:
            self.tcp_received.labels(*labels).inc(received)
        if sent:
            self.tcp_sent.labels(*labels).inc(sent)

    def connections(self, direction: str) -> Gauge:
        """The cached gauge child of `mesh_sidecar_connections_active` for a direction."""
        child = self._conn_children.get(direction)
        if child is None:
            child = self._conn_children[direction] = self.connections_active.labels(direction)
        return child

    def watch_pool(self, idle_count: Callable[[], float]) -> None:
        """Make `mesh_sidecar_upstream_pool_idle` read `idle_count()` at scrape time."""
        self.pool_idle.set_function(idle_count)

    def watch_writes(self, counts: Callable[[], tuple[int, int]]) -> None:
        """Expose the write batch's (turns, writes) as `mesh_sidecar_held_write_turns_total` and
        `mesh_sidecar_held_writes_total`, read at scrape time."""
        self.registry.register(_HeldWritesCollector(counts))


def render_metrics(telemetry: Telemetry) -> bytes:
    """The Prometheus text exposition of the node's registry (content type: CONTENT_TYPE)."""
    return render(telemetry.registry)
