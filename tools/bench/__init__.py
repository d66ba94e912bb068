"""The tierfs benchmark suite: `python -m tools.bench.run` (see docs/benchmarks.md)."""
