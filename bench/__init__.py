"""meshd benchmarks (`make bench`, `python -m bench`): data path, control plane, start-up.

Loopback only: every byte of load goes to 127.0.0.1 (the start-up part polls the demo containers'
bridge addresses for readiness). See bench/RESULTS.md for the last full run and how to read it.
"""
