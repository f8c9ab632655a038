"""Benchmark suites: train, evaluate through one path, write the comparison table."""
