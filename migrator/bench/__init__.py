"""Benchmarks, run as `python -m migrator.bench NAME [...]`.  Each reports min/median of several
runs and ratios against the bare kernel call (or raw socket) measured in the same run."""
