"""nnctl benchmark suite: `make bench` or `python -m bench.run_all`; each `python -m bench.<name>` runs alone."""
