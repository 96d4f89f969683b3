"""Routing: finding the machine that serves another tenant (DNS, lock.json, the Machines API)
and answering for it with fly-replay, or streaming a large body there.

Modules here may import protocol (the lock record), storage and the foundation modules;
never replication, connections, the machine, the request path, the CLI or dev.
"""

from tenantdb.routing.dns import MachineLocator

__all__ = ["MachineLocator"]
