"""Benchmarks of the pack; run from the repository root as `python -m bench.run_all` (see run_all.py)."""
