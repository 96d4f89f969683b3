"""Stopping: the role before winds down (a holder's final publish and release), then stop.

The loops of the role before keep running meanwhile (the final publish needs the lease
renewed); ``TenantDB.stop`` cancels them and closes everything once the role has wound down.
"""

from __future__ import annotations

import asyncio
import logging

from tenantdb import clock
from tenantdb.errors import LeaseLostError, TenantDBError
from tenantdb.machine.context import Machine, MachineRole
from tenantdb.machine.mover import Role
from tenantdb.protocol.lockfile import ReleaseReason
from tenantdb.replication.shipper import Shipper

__all__ = ["Stopping", "final_publish"]

log = logging.getLogger("tenantdb")


class Stopping(MachineRole):
    """Winds ``previous`` (the role the machine stops from) down."""

    state = "stopping"
    down = True

    def __init__(self, machine: Machine, previous: Role) -> None:
        super().__init__(machine)
        self.previous = previous

    def inherits(self, task: str) -> bool:
        return True  # the role before winds down with its loops running

    def shipper(self) -> Shipper:
        return self.machine.open_shipper(self)

    async def wind_down(self, deadline: float) -> None:
        """Let the role before finish its work by the monotonic ``deadline``."""
        await self.previous.wind_down(deadline)


async def final_publish(machine: Machine, *, deadline: float) -> None:
    """Ship everything committed (retried until ``deadline``), then release the lease.

    If the publish fails, the lease is kept and the local file holds the newest data, for
    this machine's restart to publish.
    """
    tenant, path = machine.tenant, machine.path
    if machine.pool is not None:
        await machine.pool.close()
    attempt = 0
    while True:
        attempt += 1
        failure: Exception
        try:
            # Each attempt gets only the time left: a stalled upload (the read timeout can
            # exceed the kill timeout) must not outlast the machine, or the log below would
            # never be written.
            async with asyncio.timeout(max(deadline - clock.monotonic(), 0.1)):
                await machine.mover.role.shipper().sync()
            break
        except LeaseLostError:
            log.critical(
                "tenant %s: FINAL PUBLISH FENCED: another machine took the lease, so "
                "writes acknowledged here since the last publish are not in the bucket "
                "(they remain only in %s)",
                tenant,
                path.resolve(),
            )
            return
        except TimeoutError as exc:
            failure = exc
        except TenantDBError as exc:
            failure = exc
        reason = str(failure) or "it did not finish before the kill timeout"
        if clock.monotonic() + min(2.0, attempt * 0.5) >= deadline:
            log.critical(
                "tenant %s: FINAL PUBLISH FAILED (%s). The lease is NOT released and "
                "the newest data is only in %s: restart this machine to publish it",
                tenant,
                reason,
                path.resolve(),
            )
            return
        log.warning("tenant %s: final publish failed, retrying: %s", tenant, reason)
        await asyncio.sleep(min(2.0, attempt * 0.5))
    # "idle" only if still so now: a stop that interrupts requests is a handoff.
    limit = machine.settings.idle_stop
    why: ReleaseReason | None = "idle" if 0 < limit <= machine.activity.idle_for() else None
    try:
        async with asyncio.timeout(max(deadline - clock.monotonic(), 0.5)):
            await machine.lease.release(reason=why)
        log.info("tenant %s: lease released%s", tenant, " (idle)" if why else "")
    except (TenantDBError, TimeoutError) as exc:
        log.error(
            "tenant %s: published, but could not release the lease (%s); other machines "
            "wait for it to expire",
            tenant,
            str(exc) or "timed out",
        )
