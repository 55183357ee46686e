"""Experiments, benchmarks and figures built on the public API (DESIGN §5)."""
