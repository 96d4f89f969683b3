"""Incremental replication: a log of immutable page segments after each snapshot."""
