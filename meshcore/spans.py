"""Finished spans as meshd stores and prints them (`SpanRecord`), and a trace as an indented tree.

Pure, standard library only. The span kinds and status codes are OTLP's (meshcore.otlp encodes spans).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

# OTLP Span.SpanKind and Status.StatusCode (opentelemetry/proto/trace/v1/trace.proto).
KIND_INTERNAL, KIND_SERVER, KIND_CLIENT = 1, 2, 3
KIND_NAMES = {0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}
STATUS_UNSET, STATUS_OK, STATUS_ERROR = 0, 1, 2


@dataclass(frozen=True)
class SpanRecord:
    """One finished span, as stored, exported and printed."""

    trace_id: str                  # 32 lowercase hex digits
    span_id: str                   # 16 lowercase hex digits
    parent_id: str | None
    name: str
    kind: int                      # KIND_*
    start_ns: int                  # Unix epoch nanoseconds
    end_ns: int
    service: str                   # resource service.name
    attributes: tuple[tuple[str, Any], ...] = ()
    error: bool = False
    resource: tuple[tuple[str, Any], ...] = ()

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6

    def attr(self, key: str, default: Any = None) -> Any:
        for k, v in self.attributes:
            if k == key:
                return v
        return default



@dataclass(frozen=True)
class TreeRow:
    """One line of a printed trace: a span at its depth."""

    depth: int
    span: SpanRecord
    orphan: bool = False  # its parent span was not received (yet)


def build_trace_tree(spans: Iterable[SpanRecord]) -> list[TreeRow]:
    """Spans in depth-first order, children by start time; spans whose parent is missing are
    roots marked orphan. Duplicate span ids keep the first seen."""
    by_id: dict[str, SpanRecord] = {}
    for s in spans:
        by_id.setdefault(s.span_id, s)
    children: dict[str | None, list[SpanRecord]] = {}
    orphans: set[str] = set()
    for s in by_id.values():
        parent = s.parent_id if s.parent_id in by_id else None
        if s.parent_id is not None and parent is None:
            orphans.add(s.span_id)
        children.setdefault(parent, []).append(s)
    for members in children.values():
        members.sort(key=lambda s: (s.start_ns, s.kind, s.span_id))
    rows: list[TreeRow] = []
    seen: set[str] = set()

    def walk(top: SpanRecord, orphan: bool) -> None:
        stack = [(0, top)]
        while stack:
            depth, s = stack.pop()
            if s.span_id in seen:
                continue
            seen.add(s.span_id)
            rows.append(TreeRow(depth, s, orphan if s is top else s.span_id in orphans))
            stack.extend((depth + 1, c) for c in reversed(children.get(s.span_id, [])))

    for s in children.get(None, []):
        walk(s, s.span_id in orphans)
    # Spans in a parent cycle (bad input) reach no root: each unreached one becomes an orphan root.
    for s in sorted(by_id.values(), key=lambda s: (s.start_ns, s.kind, s.span_id)):
        if s.span_id not in seen:
            walk(s, True)
    return rows
