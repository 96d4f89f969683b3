"""What every role of one machine shares for its tenant: files, lease, open database, requests.

The roles (mover.py) hand the tenant to each other through one ``Machine``: the data
directory's lock, the bucket, the lease, the shipper and pool while a holder has them open,
and the requests that keep the tenant awake (``Activity``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from contextlib import AsyncExitStack

from tenantdb import clock
from tenantdb.config import Settings
from tenantdb.connections.pool import ConnectionPool
from tenantdb.errors import LeaseHeldError, TenantDBError
from tenantdb.machine.datadir import DataDirLock
from tenantdb.machine.kept_hashes import keep_hashes
from tenantdb.machine.migrations import Migration
from tenantdb.machine.mover import Mover, Role
from tenantdb.machine.tail_hints import TailHintClient
from tenantdb.metrics import Metrics
from tenantdb.protocol.lease import Lease
from tenantdb.replication.shipper import Shipper
from tenantdb.storage import Bucket

__all__ = ["Activity", "Machine", "MachineRole"]

log = logging.getLogger("tenantdb")

# The longest wait for the release of the lease of a machine that cannot go on.
_RELEASE_TIMEOUT = 5.0


class Activity:
    """Requests for the tenant on this machine, for the idle stop (TENANTDB_IDLE_STOP)."""

    def __init__(self) -> None:
        self.running = 0
        self._last = clock.monotonic()
        self.idle = asyncio.Event()  # set when this machine should stop for idleness

    def request(self) -> Activity:
        """Mark a request for the tenant as running, inside ``with`` (the idle time counts
        from the last)."""
        return self

    # A class's own __enter__/__exit__, not @contextmanager: it runs once per request, and
    # a generator made and driven for each costs several times as much.
    def __enter__(self) -> None:
        self.running += 1

    def __exit__(self, *exc_info: object) -> None:
        self.running -= 1
        self._last = clock.monotonic()

    def idle_for(self) -> float:
        """Seconds since the last request for the tenant ended; 0 while one runs."""
        return 0.0 if self.running else clock.monotonic() - self._last

    def count_from_now(self) -> None:
        """Start counting the idle time afresh (a machine that just began to serve)."""
        self._last = clock.monotonic()


class Machine:
    """One tenant on this machine, as all its roles see it."""

    def __init__(
        self,
        settings: Settings,
        tenant: str,
        *,
        migrations: Sequence[Migration],
        bucket: Bucket | None,
        metrics: Metrics,
        mover: Mover,
        tail_hints: TailHintClient | None = None,
    ) -> None:
        self.settings = settings
        self.tenant = tenant
        self.migrations = tuple(migrations)
        self.path = settings.data_dir / f"{tenant}.sqlite3"
        self.bucket = bucket  # given by the caller; else opened at start, closed at stop
        self.metrics = metrics
        self.mover = mover
        self.dir_lock = DataDirLock(settings.data_dir)
        self.stack = AsyncExitStack()
        self.lease_or_none: Lease | None = None  # made at start
        # Another machine's holding as last seen by a standby (None once this one serves).
        self.holder: LeaseHeldError | None = None
        # While a holder has the tenant open (restoring opens them, the roles after close).
        self.shipper: Shipper | None = None
        self.pool: ConnectionPool | None = None
        self.activity = Activity()
        # How a standby asks the holder for tail hints (None: it polls lock.json only).
        self.tail_hints = tail_hints

    @property
    def lease(self) -> Lease:
        """The lease, once the machine has started."""
        if self.lease_or_none is None:
            raise TenantDBError("TenantDB has not been started")
        return self.lease_or_none

    def open_shipper(self, role: Role) -> Shipper:
        """The shipper, to ``role`` (one that may ship), while it is open."""
        if self.shipper is None:
            raise role.not_served()
        return self.shipper

    async def close_database(self) -> None:
        """Close the pool and the shipper, if open.

        A file closed with everything published keeps its page hashes beside it, so that
        the next start need not hash it (kept_hashes.py).
        """
        if self.pool is not None:
            await self.pool.close()
            self.pool = None
        if self.shipper is not None:
            published = await self.shipper.close()
            self.shipper = None
            if published is not None:
                await asyncio.to_thread(keep_hashes, self.path, published)

    async def release_now(self) -> None:
        """Give the lease up without a final publish, within a bound.

        A conditional write on this holding's own ETag: it never releases a lease another
        machine has taken since (that is a 412, and this machine counts as fenced).
        """
        lease = self.lease_or_none
        if lease is None or lease.status != "held":
            return
        try:
            async with asyncio.timeout(max(min(lease.valid_for, _RELEASE_TIMEOUT), 0.5)):
                await lease.release()
        except Exception as exc:  # a machine giving up must get to its exit whatever this does
            log.error(
                "tenant %s: could not release the lease (%s: %s); other machines wait for it "
                "to expire",
                self.tenant,
                type(exc).__name__,
                str(exc) or "timed out",
            )
            return
        log.warning("tenant %s: lease released without a final publish", self.tenant)

    async def close_resources(self) -> None:
        """Cancel every loop, close the database and the bucket, unlock the data directory."""
        await self.mover.supervisor.cancel()
        await self.close_database()
        await self.stack.aclose()
        self.dir_lock.release()


class MachineRole(Role):
    """A role ``machine`` plays (every one but the stopped machine's)."""

    def __init__(self, machine: Machine) -> None:
        super().__init__(machine.mover)
        self.machine = machine
