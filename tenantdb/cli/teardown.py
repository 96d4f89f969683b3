"""Stopping and destroying a tenant's Fly machines: shared by ``machines destroy`` and
``tenants delete --purge``."""

from __future__ import annotations

from collections.abc import Sequence

from tenantdb.cli.common import out
from tenantdb.routing.machines_api import Machine, MachinesClient

__all__ = ["destroy_machines"]

# States in which a machine's process may still hold the tenant's lease and unpublished
# writes; anything else can be destroyed without a graceful stop first.
_QUIET_STATES = frozenset({"stopped", "created", "destroyed", "destroying"})


async def destroy_machines(
    client: MachinesClient,
    machines: Sequence[Machine],
    tenant: str,
    *,
    force: bool = False,
    stop_timeout: float = 120,
) -> None:
    """Destroy ``machines`` of ``tenant``, each running one stopped gracefully first."""
    for machine in machines:
        if not force and machine.state not in _QUIET_STATES:
            # A graceful stop lets the machine publish its last snapshot and release
            # the lease before it is destroyed.
            out(f"stopping machine {machine.id} ({machine.state}) ...")
            await client.stop_machine(machine.id)
            await client.wait_for_state(
                machine.id, "stopped", instance_id=machine.instance_id, timeout=stop_timeout
            )
        await client.destroy_machine(machine.id, force=True)
        out(f"destroyed machine {machine.id} of tenant {tenant}")
