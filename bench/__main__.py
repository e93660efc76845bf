"""`python -m bench` (what `make bench` runs); see bench/harness.py and `python -m bench --help`."""

from bench.harness import main

main()
