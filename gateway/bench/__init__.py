"""Benchmarks that write JSON reports (``unlearn-gateway bench ...``), with the fixtures they run against."""
