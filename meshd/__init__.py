"""meshd: the control plane of the mesh."""
