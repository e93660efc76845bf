"""The data path's names where importers find them: the engine, its layers and builders
(sidecar.datapath.engine), the TLS hook and peer probes (.peers), byte tunnels (.pipes) and the
listeners (.listeners), re-exported."""

from __future__ import annotations

from .datapath import engine as _engine, listeners as _listeners, peers as _peers, pipes as _pipes

for _module in (_peers, _engine, _pipes, _listeners):
    globals().update({name: value for name, value in vars(_module).items() if not name.startswith("__")})
del _module
