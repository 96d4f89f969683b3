"""A machine's lifecycle: the roles it plays for a tenant, the table of moves, and supervision.

``database.TenantDB`` is the public face; ``mover`` holds the table and moves between the
roles, one module each (starting, standby, replica, restoring, holder, fenced, failed,
stopping).
Modules here may import connections, replication, protocol and storage; never routing, the
request path, the CLI or dev.
"""
