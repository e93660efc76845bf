"""The mesh PKI shared by meshd and the sidecars: CA, keys and CSRs, TLS material holder."""
