"""The mesh data plane: the per-container sidecar proxy."""
