"""Benchmarks run by ``stagemesh bench``: ratios against a baseline measured in the same run."""
