"""Experiments, benchmarks and figures built on the public API (README, "Layout")."""
