"""Benchmarks for jaxroute (run as ``python -m benchmarks.<name>``)."""
