"""meshd: the control plane of the mesh."""

__version__ = "0.1.0"
