"""Test support: the moto S3 server harness and helpers shared by tests and benchmarks."""
