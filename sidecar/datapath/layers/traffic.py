"""The traffic state layer (`Traffic`): a mesh destination's `_Lane`, read by the traffic layers after it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..wire import NEXT
from .base import Layer, _Lane

if TYPE_CHECKING:
    from ..downstream import _Downstream
    from ..exchange import Exchange


class Traffic(Layer):
    """traffic state: a mesh destination's sidecar.traffic state (its _Lane), read by the layers after it."""

    def __init__(self):
        Layer.__init__(self, "traffic state")

    def on_request(self, down: _Downstream, ex: Exchange) -> int:
        cluster = ex.cluster
        if not cluster.mesh:
            return NEXT
        state = down.state
        lanes = state.lanes
        lane = lanes.get(cluster.name)
        if lane is None or lane.cluster is not cluster or lane.tr.cluster is not cluster:
            # first request after a snapshot swap: sync (state.traffic.of), then copy
            lane = lanes[cluster.name] = _Lane(state.traffic.of(cluster))
        ex.traffic = lane.tr
        ex.lane = lane
        sub = lane.all
        ex.subset = sub
        ex.cluster = sub.cluster
        return NEXT
