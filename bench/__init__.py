"""Benchmarks: each prints its figures and, last, the ratios against a baseline."""
