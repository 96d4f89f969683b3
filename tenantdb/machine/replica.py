"""The replica: a standby (TENANTDB_REPLICA_READS) that also serves reads from its copy.

It follows the holder's log exactly as a standby does (and takes the lease the same way);
between two writes of the follower it lends requests a read-only connection to its copy
(``read_copy``), but only while that copy is trusted, is no older than
``TENANTDB_MAX_REPLICA_LAG`` and has reached the request's ``Bookmark`` (the log position
the client's last write needs), waiting up to ``TENANTDB_READ_WAIT`` for the follower to get
there. Otherwise it refuses (``ReplicaRefusedError``) and the request goes to the holder.

The follower writes the copy's pages in place, under SQLite's feet: a read connection is
opened with ``immutable=1`` (no locks, no -shm) and kept for the next read only until the
follower's next write (``CopyConnections``), and the ``CopyLock`` keeps the follower's writes
and the reads apart, writes first. A copy's lag is the time since a
read of lock.json *sent* then found the copy equal to what it names, or since a tail hint
stream was asked for on which the holder of that very lease then told it held at the
copy's position (machine/tail_hints.py): an idle replica with hints reads lock.json no more
often than a standby, and its lag stays under half the bound while its holder answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import Self

import aiosqlite

from tenantdb import clock
from tenantdb.errors import LeaseHeldError, ReplicaRefusedError
from tenantdb.machine.bookmark import Bookmark
from tenantdb.machine.context import Machine
from tenantdb.machine.copy_connections import PURE_READS, CopyConnections, close_connections
from tenantdb.machine.migrations import schema_of
from tenantdb.machine.standby import MIN_POLL_GAP, Standby
from tenantdb.protocol.lockfile import LockRecord

__all__ = ["BOOKMARK_HEADER", "Bookmark", "ReadCopy", "Replica", "stand_by"]

log = logging.getLogger("tenantdb")

# The header (and cookie) carrying a bookmark: "<generation>.<index>".
BOOKMARK_HEADER = "tenantdb-bookmark"
# How long a takeover waits for the reads of the copy to end before it interrupts them.
_DRAIN_TIMEOUT = 2.0
# SQLite authorizer actions that change a database (temp objects aside).
_WRITES = frozenset(
    {
        sqlite3.SQLITE_CREATE_INDEX,
        sqlite3.SQLITE_CREATE_TABLE,
        sqlite3.SQLITE_CREATE_TRIGGER,
        sqlite3.SQLITE_CREATE_VIEW,
        sqlite3.SQLITE_DELETE,
        sqlite3.SQLITE_DROP_INDEX,
        sqlite3.SQLITE_DROP_TABLE,
        sqlite3.SQLITE_DROP_TRIGGER,
        sqlite3.SQLITE_DROP_VIEW,
        sqlite3.SQLITE_INSERT,
        sqlite3.SQLITE_UPDATE,
        sqlite3.SQLITE_ALTER_TABLE,
        sqlite3.SQLITE_REINDEX,
        sqlite3.SQLITE_ANALYZE,
    }
)


def stand_by(machine: Machine, held: LeaseHeldError | None) -> Standby:
    """The role of a machine that does not hold its tenant: a replica if reads are on."""
    if machine.settings.replica_reads:
        return Replica(machine, held)
    return Standby(machine, held)


class CopyLock:
    """Reads of the copy share it; the follower's writes have it alone, and go first."""

    def __init__(self) -> None:
        self.readers = 0
        self.writing = False
        self._writers_waiting = 0
        self._changed = asyncio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _until(self, ready: Callable[[], bool]) -> None:
        while not ready():
            await self._changed.wait()

    async def acquire_shared(self) -> None:
        """Wait until no write runs or waits, then read (``release_shared`` after)."""
        await self._until(lambda: not self.writing and not self._writers_waiting)
        self.readers += 1

    def release_shared(self) -> None:
        """End one read."""
        self.readers -= 1
        self._notify()

    async def acquire_exclusive(self) -> None:
        """Wait until no read runs (new ones wait meanwhile), then write."""
        self._writers_waiting += 1
        try:
            await self._until(lambda: not self.writing and not self.readers)
        finally:
            self._writers_waiting -= 1
            self._notify()
        self.writing = True

    def release_exclusive(self) -> None:
        """End the write."""
        self.writing = False
        self._notify()


class ReadCopy:
    """One request's read of a replica's copy: ``async with`` waits for the copy to be
    allowed to serve it (or raises ``ReplicaRefusedError``) and opens ``connection``."""

    def __init__(self, replica: Replica, bookmark: Bookmark | None) -> None:
        self._replica = replica
        self.bookmark = bookmark
        self.position = Bookmark(0, 0)  # the copy's, once entered
        self.lag = 0.0  # seconds, once entered
        self.wrote = False  # the request tried to change the database
        self.waited = 0.0  # seconds it waited for the copy to reach its bookmark
        self.reusable = True  # the connection is as it was opened: the next read may have it
        self._connection: aiosqlite.Connection | None = None
        self._locked = False

    @property
    def connection(self) -> aiosqlite.Connection:
        """The read-only connection to the copy, inside ``async with``."""
        if self._connection is None:
            raise RuntimeError("ReadCopy is not entered")
        return self._connection

    async def __aenter__(self) -> Self:
        replica = self._replica
        settings = replica.machine.settings
        deadline = clock.monotonic() + settings.read_wait
        while True:
            await self._lock(deadline)
            try:
                refusal = self._check(replica, settings.max_replica_lag)
            except BaseException:
                self._unlock()
                raise
            if refusal is None:
                break
            self._unlock()
            if refusal != "behind" or clock.monotonic() >= deadline:
                raise self._refused(refusal)
            advanced = replica.advanced
            replica.poll_soon()
            waiting_since = clock.monotonic()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(_loop_time(deadline)):
                    await advanced.wait()
            self.waited += clock.monotonic() - waiting_since
        try:
            self._connection = await replica.connections.take(self._note)
        except BaseException:
            self._unlock()
            raise
        replica.reads.add(self)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection and let the follower write again (once)."""
        self._replica.reads.discard(self)
        connection, self._connection = self._connection, None
        try:
            if connection is not None:
                await self._replica.connections.give_back(connection, reusable=self.reusable)
        finally:
            self._unlock()

    async def revoke(self) -> None:
        """Interrupt and close this read (the copy is about to change hands)."""
        self.reusable = False
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.interrupt()
        await self.close()

    async def _lock(self, deadline: float) -> None:
        lock = self._replica.copy_lock
        try:
            async with asyncio.timeout_at(_loop_time(deadline)):
                await lock.acquire_shared()
        except TimeoutError:
            raise self._refused("its copy is being updated") from None
        self._locked = True

    def _unlock(self) -> None:
        if self._locked:
            self._locked = False
            self._replica.copy_lock.release_shared()

    def _check(self, replica: Replica, max_lag: float) -> str | None:
        """Why the copy may not serve this read now ("behind": not at the bookmark yet)."""
        if replica.mover.role is not replica or replica.taking_over:
            return "this machine is taking the lease or no longer a replica"
        current = replica.current
        if current is None:
            return "its copy is not trusted yet (not caught up with the log)"
        record, confirmed_at = current
        if record.schema != replica.schema:
            # The app's code expects its migrations: a copy before them (a new tenant's
            # first moments, a deploy whose holder has not migrated yet) would fail its reads.
            recorded = record.schema.version if record.schema else "unknown"
            return (
                f"its copy's schema ({recorded}) is not the app's ({replica.schema.version} "
                "migrations) yet"
            )
        self.position = Bookmark.of(record)
        self.lag = max(clock.monotonic() - confirmed_at, 0.0)
        if self.lag > max_lag:
            return (
                f"its copy is {self.lag:.1f}s behind the log (TENANTDB_MAX_REPLICA_LAG is "
                f"{max_lag:g}s)"
            )
        if self.bookmark is not None and self.position < self.bookmark:
            return "behind"
        return None

    def _refused(self, reason: str) -> ReplicaRefusedError:
        if reason == "behind":
            reason = (
                f"its copy is at {self.position}, before the request's bookmark "
                f"{self.bookmark} (waited TENANTDB_READ_WAIT)"
            )
        return ReplicaRefusedError(reason, tenant=self._replica.machine.tenant)

    def _note(self, action: int, _1: object, _2: object, db: str | None, _3: object) -> int:
        if action not in PURE_READS:
            self.reusable = False
            if action in _WRITES and db != "temp":
                self.wrote = True
        return sqlite3.SQLITE_OK


class Replica(Standby):
    """A standby that serves reads from its copy while the copy may (see ``ReadCopy``)."""

    state = "replica"
    follows_closely = True

    def __init__(self, machine: Machine, held: LeaseHeldError | None) -> None:
        super().__init__(machine, held)
        self.copy_lock = CopyLock()
        self.connections = CopyConnections(machine.path, keep=machine.settings.pool_size)
        self.reads: set[ReadCopy] = set()
        # The lock.json record the copy equals and when a poll that confirmed it was sent.
        self.current: tuple[LockRecord, float] | None = None
        self.advanced = asyncio.Event()  # set (and replaced) each time ``current`` moves
        self.taking_over = False  # reads are refused while the lease may come here
        # The schema lock.json must record for the copy to serve: the app's migrations.
        self.schema = schema_of(machine.migrations)

    def read_copy(self, bookmark: Bookmark | None) -> ReadCopy:
        return ReadCopy(self, bookmark)

    def poll_soon(self) -> None:
        """Poll lock.json now rather than after the interval (a read waits on the log)."""
        self._poll_now.set()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._poll_now.wait()
        self._poll_now.clear()
        # Woken by reads: still no more than one poll per MIN_POLL_GAP.
        gap = self._last_poll + MIN_POLL_GAP - clock.monotonic()
        if gap > 0:
            await asyncio.sleep(gap)

    def _hint_wait(self) -> float:
        # A stream vouches for the copy as of its request, so the lag of an idle copy
        # reaches two waits (and round trips): a quarter of the bound keeps it at half.
        return min(super()._hint_wait(), self.machine.settings.max_replica_lag / 4)

    def _vouched(self, position: Bookmark, sent: float) -> None:
        current = self.current
        if current is None or Bookmark.of(current[0]) != position or sent <= current[1]:
            return  # the copy is not at the position the holder vouched for
        if self.follower.hashes(current[0]) is None:
            return  # the follower is writing the copy
        self.current = (current[0], sent)

    def _polled(self, record: LockRecord, sent: float) -> None:
        if self.follower.hashes(record) is not None:
            self.current = (record, sent)
        elif self.current is not None and self.follower.hashes(self.current[0]) is None:
            self.current = None  # a follow failed half-way: the file is no known state
        else:
            return  # behind (the follow failed or waits): the lag grows
        self.advanced.set()
        self.advanced = asyncio.Event()

    async def _follow(self, record: LockRecord) -> None:
        try:
            async with asyncio.timeout(max(1.0, 2 * self.machine.settings.follow_interval)):
                await self.copy_lock.acquire_exclusive()
        except TimeoutError:
            # Long reads must not stall the standby's loop (it takes over in time): the
            # copy stays as it is, and falls behind, until they end.
            log.info("tenant %s: reads of the copy run on; following later", self.machine.tenant)
            return
        stale = self.connections.retire()
        try:
            await super()._follow(record)
        finally:
            self.copy_lock.release_exclusive()
            await close_connections(stale)

    async def _standby_loop(self) -> None:
        try:
            await super()._standby_loop()
        finally:
            if self.mover.role is not self:  # not a restart: the replica is over
                await self.connections.close()

    async def wind_down(self, deadline: float) -> None:
        await super().wind_down(deadline)
        await self.connections.close()

    @contextlib.asynccontextmanager
    async def _taking_over(self) -> AsyncIterator[None]:
        """No read runs across the move: they drain (or are interrupted) first."""
        self.taking_over = True  # reads that get the lock meanwhile are refused at once
        locked = False
        try:
            try:
                async with asyncio.timeout(_DRAIN_TIMEOUT):
                    await self.copy_lock.acquire_exclusive()
            except TimeoutError:
                log.warning(
                    "tenant %s: interrupting %d read(s) of the copy to take the lease",
                    self.machine.tenant,
                    len(self.reads),
                )
                for read in list(self.reads):
                    await read.revoke()
                await self.copy_lock.acquire_exclusive()
            locked = True
            yield
        finally:
            # Once the lease is taken the copy is the holder's: locked against reads for good.
            if self.mover.role is self:
                self.taking_over = False
                if locked:
                    self.copy_lock.release_exclusive()


def _loop_time(deadline: float) -> float:
    """A ``clock.monotonic()`` deadline on the event loop's clock."""
    loop = asyncio.get_running_loop()
    return loop.time() + (deadline - clock.monotonic())
