"""Benchmark scripts (python -m benchmarks.NAME); results in docs/benchmarks.md."""
