"""Restoring: this machine has just taken the lease and opens the tenant to serve it.

From the moment the lease is taken it is renewed (the renewal passes on to the holder).
Opening makes the local file the newest data (local_data.py), opens the log shipper,
migrates (and records the schema in lock.json) and makes the connection pool; a failure
is retried with backoff while the lease holds, and the machine says so (503, red health)
meanwhile.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import sqlite3
from collections.abc import Iterator

from tenantdb.connections.pool import ConnectionPool
from tenantdb.errors import ConfigurationError, LeaseLostError, TenantDBError
from tenantdb.machine.context import Machine, MachineRole
from tenantdb.machine.holder import Holder
from tenantdb.machine.local_data import prepare_local_file
from tenantdb.machine.migrations import apply_migrations, schema_of
from tenantdb.replication.follower import Follower
from tenantdb.replication.shipper import Shipper
from tenantdb.replication.takeovers import record_takeover

__all__ = ["RECOVERY_PAUSES", "Restoring"]

log = logging.getLogger("tenantdb")

# Pauses between attempts to open the tenant after a failed restore, while holding the lease.
RECOVERY_PAUSES = (1.0, 2.0, 5.0, 10.0, 30.0)


class Restoring(MachineRole):
    """Holds the lease, renews it, and opens the tenant until it serves.

    ``follower`` is the warm copy of the standby that took the lease, if it did. With
    ``in_background`` the opening runs in a supervised task of its own (a takeover);
    without, the caller runs ``open()`` (a startup) and ``keep_opening`` if it fails.
    """

    state = "restoring"
    required = ("renewal",)

    def __init__(
        self, machine: Machine, *, follower: Follower | None = None, in_background: bool = True
    ) -> None:
        super().__init__(machine)
        self.follower = follower
        self._in_background = in_background
        self.problem: str | None = None  # why the tenant could not be opened, if it failed

    def enter(self) -> None:
        self.spawn("renewal", self.machine.lease.keep_renewed, "fail_stop")
        if self._in_background:
            self.keep_opening()

    def reasons(self) -> Iterator[str]:
        if self.problem:
            yield "the tenant's database cannot be opened (retrying)"

    def handoff_expected(self) -> bool:
        return True  # the lease is taken: the tenant is on its way to being served here

    def keep_opening(self, failed: int = 0) -> None:
        """Open the tenant in a supervised task, retrying with backoff (``failed`` so far)."""
        self.spawn("recovery", functools.partial(self._keep_opening, failed), "restart")

    async def _keep_opening(self, failed: int) -> None:
        """The lease is renewed meanwhile; if it is lost, the move to fenced cancels this."""
        for attempt in itertools.count(failed):
            if attempt:
                await asyncio.sleep(RECOVERY_PAUSES[min(attempt - 1, len(RECOVERY_PAUSES) - 1)])
            try:
                await self.open()
            except Exception as exc:
                await self.opening_failed(exc, attempt)
                continue
            self.problem = None
            return

    async def opening_failed(self, exc: Exception, attempt: int) -> None:
        """Note why the tenant could not be opened (attempt ``attempt``) and close it."""
        machine = self.machine
        self.problem = f"{type(exc).__name__}: {exc}"
        pause = RECOVERY_PAUSES[min(attempt, len(RECOVERY_PAUSES) - 1)]
        expected = isinstance(exc, (TenantDBError, OSError, sqlite3.Error))
        if not expected:
            machine.metrics.task_failed("recovery")
        log.log(
            logging.ERROR if expected else logging.CRITICAL,
            "tenant %s: holds the lease but could not open the database (%s); retrying in %.0fs",
            machine.tenant,
            self.problem,
            pause,
            exc_info=None if expected else exc,
        )
        await machine.close_database()

    async def open(self) -> None:
        """Prepare the local file, open the shipper, migrate, then move to serving."""
        machine, tenant = self.machine, self.machine.tenant
        settings, lease = machine.settings, machine.lease
        # Before anything of this generation is uploaded (preparing the file uploads
        # nothing): it tells point-in-time restores which earlier uploads were published.
        recording = asyncio.ensure_future(record_takeover(lease))
        # The standby's warm copy is the holder's file after this, used or not.
        follower, self.follower = self.follower, None
        try:
            hashes = await prepare_local_file(machine, lease.previous, follower)
        except BaseException:
            recording.cancel()
            await asyncio.gather(recording, return_exceptions=True)
            raise
        await recording
        # Lent only once serving; the shipper's group commit asks it who is writing.
        pool = ConnectionPool(
            machine.path, settings.pool_size, track_commits=settings.durability == "bucket"
        )
        machine.shipper = Shipper(
            lease,
            machine.path,
            hashes=hashes,
            prefix=settings.prefix,
            work_dir=settings.data_dir,
            snapshot_retention=settings.snapshot_retention,
            retention=settings.retention,
            metrics=machine.metrics,
            writers=pool,
        )
        # Open before migrating: the shipper's connections keep the WAL (and its unshipped
        # frames) in place when the migration's connection closes.
        await machine.shipper.open()
        try:
            ran = await asyncio.to_thread(apply_migrations, machine.path, machine.migrations)
        except ConfigurationError:
            raise
        except Exception as exc:
            raise ConfigurationError(
                f"tenant {tenant}: a migration failed: {type(exc).__name__}: {exc}"
            ) from exc
        if ran:
            log.info("tenant %s: applied %d migration(s)", tenant, ran)
        schema = schema_of(machine.migrations)
        if lease.record is None or lease.record.schema != schema:
            # lock.json names the schema only once the bucket has the migrations' commits:
            # a listing that reads it must never be ahead of the data.
            await machine.shipper.ship_once()
            await lease.record_schema(schema)
        machine.pool = pool
        if self.mover.role is not self:
            raise LeaseLostError(
                f"tenant {tenant}: the lease was lost while restoring", tenant=tenant
            )
        self.mover.move(Holder(machine))

    async def wind_down(self, deadline: float) -> None:
        """Stopped before the tenant could be opened: give the lease back at once."""
        log.warning(
            "tenant %s: stopped before the database could be opened (%s); nothing "
            "was published here, and the lease is released",
            self.machine.tenant,
            self.problem or "still restoring",
        )
        await self.mover.supervisor.cancel()
        await self.machine.close_database()
        await self.machine.release_now()
