"""The mesh API gateway: external traffic in, built from the sidecar's layers."""
