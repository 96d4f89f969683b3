"""Incremental replication: a log of immutable page segments after each snapshot, shipped,
compacted, restored, followed, and rolled back to a point in time.

Modules here may import protocol, storage and the foundation modules; never connections, the
machine, routing, the request path, the CLI or dev.
"""
