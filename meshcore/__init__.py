"""The mesh's pure core: standard library only, no I/O, no clocks or randomness of its own."""
