"""The tenant's live SQLite database on this machine: the public face of its roles.

``TenantDB`` runs one machine's side of the lease protocol: lock the data directory,
acquire the lease (or wait as a standby), restore or create the database, migrate, serve,
checkpoint while running, and publish then release at shutdown. Each of those is a role
of its own (starting.py, standby.py, restoring.py, holder.py, fenced.py, failed.py,
stopping.py), moved between by the table in mover.py; this class starts and stops them and
answers for whichever is current.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Any, Self, get_args

import aiosqlite

import tenantdb.logs as logs
from tenantdb import clock
from tenantdb.config import Settings
from tenantdb.connections.pool import ConnectionPool
from tenantdb.errors import ConfigurationError, LeaseHeldError, TenantDBError
from tenantdb.machine.context import Machine
from tenantdb.machine.datadir import DataDirLock
from tenantdb.machine.failed import Failed
from tenantdb.machine.migrations import Migration, apply_migrations
from tenantdb.machine.mover import Mover, Stopped, TenantState
from tenantdb.machine.replica import Bookmark, ReadCopy
from tenantdb.machine.restoring import Restoring
from tenantdb.machine.standby import Standby
from tenantdb.machine.starting import Starting
from tenantdb.machine.stopping import Stopping
from tenantdb.machine.supervisor import Health, HealthCheck, Supervisor
from tenantdb.machine.tail_hints import TailHintClient, TailState, tail_moves, wait_for_tail
from tenantdb.metrics import Metrics
from tenantdb.protocol.lease import Lease
from tenantdb.replication.shipper import Shipper
from tenantdb.storage import Bucket

__all__ = ["Health", "Migration", "TenantDB", "TenantState", "apply_migrations"]

log = logging.getLogger("tenantdb")


class TenantDB:
    """One tenant's database on this machine, kept in the bucket under a lease.

    Use ``async with TenantDB(settings) as tdb:`` in scripts (fails if another machine
    holds the lease), or ``start(standby=True)`` / ``stop()`` from a server lifespan.

    Why ~260 lines: it is the public face, one short delegating method per verb; what a
    machine does in each state is its role's (``mover.py`` and one module per role).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        migrations: Sequence[Migration] = (),
        bucket: Bucket | None = None,
        metrics: Metrics | None = None,
        tail_hints: TailHintClient | None = None,
    ) -> None:
        """``metrics`` receives the tenant's figures (a registry of its own if omitted);
        with ``tail_hints`` a standby asks the holder when lock.json moves (see
        machine/tail_hints.py) rather than polling it."""
        if settings.tenant is None:
            raise ConfigurationError("no tenant to serve: set TENANT_ID (or CUSTOMER_ID)")
        self.settings = settings
        self.tenant: str = settings.tenant
        self.metrics = metrics or Metrics()
        self._mover = Mover(self.tenant, failures=self.metrics, failed=self._failed_role)
        self._machine = Machine(
            settings,
            self.tenant,
            migrations=migrations,
            bucket=bucket,
            metrics=self.metrics,
            mover=self._mover,
            tail_hints=tail_hints,
        )
        self.migrations = self._machine.migrations
        self.path = self._machine.path
        self.draining = False
        self._draining_since: float | None = None
        self._health_checks: list[HealthCheck] = []
        self.metrics.watch(self, get_args(TenantState))

    def _failed_role(self, reason: str) -> Failed:
        return Failed(self._machine, reason)

    @classmethod
    def from_env(cls, *, migrations: Sequence[Migration] = (), **overrides: Any) -> TenantDB:
        """Build from the environment (see the README), with keyword overrides."""
        return cls(Settings.from_env(**overrides), migrations=migrations)

    def __repr__(self) -> str:
        return f"TenantDB(tenant={self.tenant!r}, state={self.state!r})"

    async def __aenter__(self) -> Self:
        await self.start(standby=False)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def state(self) -> TenantState:
        """The state of the role this machine plays for the tenant (see mover.py)."""
        return self._mover.state

    @property
    def holder(self) -> LeaseHeldError | None:
        """Another machine's holding of the tenant as last seen; None once this one serves."""
        return self._machine.holder

    @property
    def problem(self) -> str | None:
        """Why the held tenant could not be opened, while that is retried."""
        role = self._mover.role
        return role.problem if isinstance(role, Restoring) else None

    @property
    def failure(self) -> str | None:
        """Why this machine failed stop, once it has (state "failed")."""
        return self._mover.failure

    @property
    def lock_damaged(self) -> bool:
        """True while a standby's last read of lock.json found it damaged."""
        role = self._mover.role
        return isinstance(role, Standby) and role.lock_damaged

    @property
    def pool(self) -> ConnectionPool:
        """The connection pool; only while this machine serves the tenant."""
        return self._mover.role.pool()

    def connection(self) -> contextlib.AbstractAsyncContextManager[aiosqlite.Connection]:
        """``async with tdb.connection() as db:`` borrows a connection to the database."""
        return self.pool.connection()

    def read_copy(self, bookmark: Bookmark | None = None) -> ReadCopy:
        """``async with tdb.read_copy(bookmark) as read:`` a read-only connection to this
        replica's copy (``read.connection``), once it is at ``bookmark``; raises
        ``ReplicaRefusedError`` when the copy may not serve (the holder then must)."""
        return self._mover.role.read_copy(bookmark)

    def bookmark(self) -> Bookmark | None:
        """The log position of what this machine last published (None before any)."""
        lease = self._machine.lease_or_none
        record = lease.record if lease is not None else None
        return Bookmark.of(record) if record is not None else None

    async def wait_tail(self, after: Bookmark, wait: float) -> TailState:
        """Whether this machine holds the lease and the position it published, once that is
        past ``after`` (or it stops holding), else after ``wait`` seconds: a tail hint."""
        lease = self._machine.lease_or_none
        if lease is None:
            return TailState(holding=False, position=None)
        return await wait_for_tail(lease, after, wait)

    async def tail_moves(self, after: Bookmark, wait: float) -> AsyncIterator[TailState]:
        """Each move of the position this machine published past the last one told
        (``after`` at first) for ``wait`` seconds, then where it stands; it ends once this
        machine does not hold the lease: a tail hint stream."""
        lease = self._machine.lease_or_none
        if lease is None:
            yield TailState(holding=False, position=None)
            return
        async for state in tail_moves(lease, after, wait):
            yield state

    @property
    def lease(self) -> Lease:
        """The lease object (for inspection and tests)."""
        return self._machine.lease

    @property
    def serving(self) -> bool:
        """True while this machine holds a live lease and the database is open."""
        return self.state == "serving" and not self.draining and self.lease.valid_for > 0

    async def confirm_lease(self) -> None:
        """Return once this holder may answer: after a freeze (Fly's suspend), once a
        renewal of the lease landed; ``LeaseLostError`` if it was lost meanwhile."""
        await self.lease.confirmed()

    def drain(self) -> None:
        """Stop taking new requests (``serving`` turns False) ahead of ``stop()``.

        The kill timeout counts from here: ``stop()`` fits its final publish in what is left.
        """
        self.draining = True
        self._draining_since = clock.monotonic()

    def handoff_expected(self) -> bool:
        """True when the lease is coming to this machine: it has taken the lease and is
        opening the tenant, or, as last seen, the holder released it or let it expire."""
        return self._mover.role.handoff_expected()

    def add_health_check(self, check: HealthCheck) -> None:
        """Make ``health()`` red whenever ``check()`` returns a reason (None: all is well)."""
        self._health_checks.append(check)

    def health(self) -> Health:
        """Red while this machine cannot do its part: a task its state needs is not running
        (ended, or waiting to restart), it failed, it cannot open a held tenant, or an added
        check says so. A standby that follows the holder is healthy."""
        reasons = self._mover.reasons()
        reasons.extend(reason for check in self._health_checks if (reason := check()))
        return Health(tuple(reasons))

    async def failed(self) -> str:
        """Wait until this machine has failed stop and released what it could; the reason."""
        return await self._mover.failed()

    def request(self) -> contextlib.AbstractContextManager[None]:
        """Mark a request for the tenant as running (the idle stop counts from the last)."""
        return self._machine.activity.request()

    def idle_for(self) -> float:
        """Seconds since the last request for the tenant ended; 0 while one runs."""
        return self._machine.activity.idle_for()

    async def idle(self) -> None:
        """Wait until this machine should stop for idleness (``TENANTDB_IDLE_STOP``).

        A holder: no request for ``idle_stop`` seconds. A standby: its holder released the
        lease for idleness and no request is running here. Stopping is the caller's to do
        (the middleware ends the server, exit code 0); ``stop()`` then releases the lease
        saying "idle" if the tenant is still idle by then.
        """
        await self._machine.activity.idle.wait()

    async def wait_serving(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for this machine to serve; whether it does."""
        if not self.serving:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._mover.serving_now.wait(), timeout)
        return self.serving

    async def start(self, *, standby: bool = True) -> None:
        """Lock the data dir, acquire the lease (or stand by), restore, migrate, open."""
        if self.state != "stopped":
            raise TenantDBError(f"TenantDB already started ({self.state})")
        logs.follow(self)  # this machine's log lines are about this tenant
        self._mover.reset()
        starting = Starting(self._machine)
        self._mover.move(starting)
        await starting.run(standby=standby)

    def generation(self) -> int:
        """The generation of the lease this machine holds or last held; 0 before any."""
        lease = self._machine.lease_or_none
        record = lease.record if lease is not None else None
        return record.generation if record else 0

    def log_lag(self) -> float:
        """Seconds the oldest commit not yet in the bucket has waited; 0 when none."""
        shipper = self._machine.shipper
        return shipper.lag() if shipper is not None else 0.0

    async def sync(self) -> None:
        """Return once everything committed so far is in the bucket (fenced, durable)."""
        await self._mover.role.shipper().sync()

    async def checkpoint(self) -> bool:
        """Ship what is committed, then make a full snapshot the log's new base.

        Returns False when the newest snapshot already holds everything (no segment since).
        """
        return await self._mover.role.shipper().snapshot()

    async def stop(self) -> None:
        """Final snapshot, publish, release; keep the local file if publishing fails."""
        if self.state == "stopped":
            return
        started = self._draining_since or clock.monotonic()
        stopping = Stopping(self._machine, self._mover.role)
        self._mover.move(stopping)
        try:
            await stopping.wind_down(started + self.settings.kill_timeout * 0.8)
        finally:
            await self._machine.close_resources()
            self._mover.move(Stopped(self._mover))
            took = clock.monotonic() - started
            log.info("tenant %s: shutdown took %.2fs", self.tenant, took)
            if took > self.settings.kill_timeout * 0.5:
                log.warning(
                    "tenant %s: shutdown took %.1fs of the %.0fs kill timeout; raise "
                    "kill_timeout in fly.toml",
                    self.tenant,
                    took,
                    self.settings.kill_timeout,
                )

    # What tests reach for to kill a machine without its protocol (as SIGKILL would) or to
    # look inside it; not part of the API.

    @property
    def _supervisor(self) -> Supervisor:
        return self._mover.supervisor

    @property
    def _failing(self) -> asyncio.Task[None] | None:
        return self._mover.failing

    @property
    def _shipper(self) -> Shipper | None:
        return self._machine.shipper

    @property
    def _lease(self) -> Lease | None:
        return self._machine.lease_or_none

    @property
    def _idle(self) -> asyncio.Event:
        return self._machine.activity.idle

    @property
    def _dir_lock(self) -> DataDirLock:
        return self._machine.dir_lock

    async def _close_database(self) -> None:
        await self._machine.close_database()

    async def _close_resources(self) -> None:
        await self._machine.close_resources()
