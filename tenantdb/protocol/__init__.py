"""The protocol over the bucket: the lock record, the lease (conditional writes), snapshots.

Modules here may import storage and the foundation modules (errors, config, parsing, logs,
metrics, tenants, localfiles), never replication, the machine or the request path.
"""
