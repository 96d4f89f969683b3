"""Failed: a loop the machine cannot run without died; stop everything, exit loudly.

The mover (fail-stop supervision) moves here and runs ``finish`` in a task of its own: the
machine stops serving at once, closes the database and releases the lease unless that
could lose answered commits; the server then exits (asgi/middleware.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from tenantdb.machine.context import Machine, MachineRole
from tenantdb.machine.mover import Failing

__all__ = ["Failed"]

log = logging.getLogger("tenantdb")


class Failed(MachineRole, Failing):
    """Says why the machine failed until it stops; ``finish`` winds it down."""

    state = "failed"

    def __init__(self, machine: Machine, reason: str) -> None:
        super().__init__(machine)
        self.reason = reason

    def reasons(self) -> Iterator[str]:
        yield f"this machine failed: {self.reason}"

    async def finish(self) -> None:
        """Cancel every loop, close the database, release the lease unless that loses data."""
        machine = self.machine
        await self.mover.supervisor.cancel()
        try:
            await machine.close_database()
        except Exception as exc:  # the exit must come whatever the database does
            log.error(
                "tenant %s: closing the failed machine's database: %s: %s",
                machine.tenant,
                type(exc).__name__,
                exc,
            )
        if machine.settings.durability == "async":
            # Commits answered but maybe not shipped (the dead shipper cannot say) are only
            # in the local file: the lease is kept for this machine's restart on its data
            # directory (same claim), which takes it back at once and publishes them;
            # without a volume, a standby takes over at the lease's expiry.
            log.error(
                "tenant %s: the lease is left to expire: with async durability, commits "
                "answered here may be only in %s",
                machine.tenant,
                machine.path.resolve(),
            )
        else:
            await machine.release_now()

    async def wind_down(self, deadline: float) -> None:
        """Wait for ``finish`` (the failure already stopped everything it could)."""
        await self.mover.failed()
