"""The SQLite connections a machine's requests borrow, and which of their statements committed.

Modules here may import replication (the shipper they hand commits to) and below; never the
machine, routing or the request path.
"""
