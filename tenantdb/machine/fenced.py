"""Fenced: the lease was lost; close the database, then stand by or take the lease back.

The lease's ``on_lost`` (``fence``) moves a holding machine here at once; the move cancels
the holding's loops, so nothing more is written under the lost lease.
"""

from __future__ import annotations

import asyncio
import logging

from tenantdb.errors import LeaseHeldError, LeaseLostError, TenantDBError
from tenantdb.machine.context import Machine, MachineRole
from tenantdb.machine.replica import stand_by
from tenantdb.machine.restoring import Restoring

__all__ = ["Fenced", "fence"]

log = logging.getLogger("tenantdb")


def fence(machine: Machine, lost: LeaseLostError) -> None:
    """The lease's ``on_lost``: a machine that holds the tenant (or opens it) is fenced."""
    if machine.mover.may_move("fenced"):
        machine.mover.move(Fenced(machine))


class Fenced(MachineRole):
    """Winds the lost holding down, then finds out who holds the tenant now."""

    state = "fenced"
    required = ("fenced",)

    def enter(self) -> None:
        self.spawn("fenced", self._after_fenced, "fail_stop")

    async def _after_fenced(self) -> None:
        machine = self.machine
        # The old holder's renewal, checkpoint and restore tasks must not outlive its lease.
        await self.mover.supervisor.cancel(keep=asyncio.current_task())
        await machine.close_database()
        try:
            await machine.lease.acquire()
        except LeaseHeldError as held:
            self.mover.move(stand_by(machine, held))
            return
        except TenantDBError as exc:
            log.error("tenant %s: fenced, and the lease cannot be read: %s", machine.tenant, exc)
            self.mover.move(stand_by(machine, None))
            return
        self.mover.move(Restoring(machine))
