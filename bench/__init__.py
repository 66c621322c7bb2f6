"""Benchmarks: each bench/bench_*.py has run() -> dict[str, float]; `python -m bench.run` runs them all."""
