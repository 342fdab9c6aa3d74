"""Benchmarks, run as ``python -m benchmarks.<name>``: each prints a machine line, its config, a table, writes JSON."""
