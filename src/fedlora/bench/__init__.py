"""Benchmarks that print their figures and write JSON; run them with ``fedlora bench``."""
