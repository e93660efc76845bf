"""meshctl: the command-line client of meshd."""
