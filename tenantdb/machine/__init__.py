"""A machine's lifecycle: the roles it plays for a tenant, the table of moves, and supervision.

Modules here may import connections, replication, protocol and storage; never routing, the
request path, the CLI or dev.
"""
