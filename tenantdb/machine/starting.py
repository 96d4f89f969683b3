"""Starting: lock the data directory, open the bucket, take the lease or stand by.

A startup that fails gives the lease it took back at once (not at its expiry) and leaves
the machine stopped; a tenant that cannot be opened while the lease is held is retried by
the restoring role instead, with the server up.
"""

from __future__ import annotations

import asyncio
import functools
import logging

from tenantdb.errors import ConfigurationError, LeaseHeldError
from tenantdb.machine.context import MachineRole
from tenantdb.machine.fenced import fence
from tenantdb.machine.mover import Stopped
from tenantdb.machine.replica import stand_by
from tenantdb.machine.restoring import Restoring
from tenantdb.protocol.lease import Lease
from tenantdb.protocol.snapshot import remove_stray_temp_files
from tenantdb.storage import open_bucket

__all__ = ["Starting"]

log = logging.getLogger("tenantdb")


class Starting(MachineRole):
    """Runs a machine's startup in the caller's task (``TenantDB.start``)."""

    state = "starting"
    down = True

    async def run(self, *, standby: bool) -> None:
        """Start; with ``standby``, wait as a standby when another machine holds the lease
        (else raise ``LeaseHeldError``) and keep retrying a tenant that cannot be opened."""
        machine, mover, settings = self.machine, self.mover, self.machine.settings
        try:
            machine.dir_lock.acquire()
            claim = await asyncio.to_thread(machine.dir_lock.claim)
            for path in await asyncio.to_thread(remove_stray_temp_files, settings.data_dir):
                log.info("tenant %s: removed %s left by a killed process", machine.tenant, path)
            bucket = machine.bucket or open_bucket(settings)
            if machine.bucket is None:
                await machine.stack.enter_async_context(bucket)
            lease = machine.lease_or_none = Lease(
                bucket,
                machine.tenant,
                machine_id=settings.machine_id,
                region=settings.fly_region,
                ttl=settings.lease_ttl,
                prefix=settings.prefix,
                claim=claim,
                on_lost=functools.partial(fence, machine),
                cross_region=settings.consistent_across_regions,
            )
            try:
                await lease.acquire()
            except LeaseHeldError as held:
                if not standby:
                    raise
                mover.move(stand_by(machine, held))
                return
            restoring = Restoring(machine, in_background=False)
            mover.move(restoring)
            try:
                await restoring.open()
            except ConfigurationError:
                raise  # the app's own mistake (a migration): trying again cannot help
            except Exception as exc:
                if not standby or lease.status != "held" or mover.role is not restoring:
                    raise  # a script, or fenced meanwhile
                # One behaviour for a tenant that cannot be opened, at startup as after a
                # takeover: keep the lease, answer 503, red health, retry with backoff.
                await restoring.opening_failed(exc, 0)
                if mover.role is restoring:  # else fenced meanwhile: that role goes on
                    restoring.keep_opening(1)
        except BaseException:
            await mover.supervisor.cancel()
            await machine.close_database()
            await machine.release_now()
            await machine.close_resources()
            mover.move(Stopped(mover))
            raise
