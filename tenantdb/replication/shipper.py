"""Ship each commit's changed pages to the bucket as fenced segments; checkpoint what is shipped.

One ``Shipper`` per served tenant. Every ``sync_interval`` it reads the commits added to the
WAL since the last shipped position, encodes the newest image of each changed page as one
segment, and moves ``lock.json``'s log tail onto it by CAS, carrying the segment inline;
that CAS also renews the lease, and is the one request a sync makes. A segment counts only
once that CAS landed. The carried segments reach the bucket later, in packs of several
(``carrier``), under keys only this generation's range can have.

tenantdb is the only checkpointer of the databases it opens: every connection has
``wal_autocheckpoint=0``, and the shipper runs ``wal_checkpoint(PASSIVE)`` only while it
holds the write lock and every frame in the WAL is shipped. So a WAL restart (new salts)
is followed only after such a checkpoint, and only when salt-1 proves it is exactly one
restart (an app's own checkpoint may add another, whose WAL nobody read); any other
restart, or a WAL that cannot be read as expected, falls back to a full snapshot rather
than guessing.

The shipper decides *when*; the work is done by the modules beside it: ``next_segment``
(the WAL's next commits as a segment), ``carrier`` (what lock.json carries, and its packs),
``uploads`` (log objects in the background),
``compaction`` (merges), ``checkpoint`` (connections and safe checkpoints),
``snapshot_copy`` (a consistent copy and its WAL position) and ``garbage`` (collection).
``Shipper`` stays one class of about 450 lines on purpose: shipping, checkpointing and
snapshots all move one WAL position under one lock, and the position, the unpublished
segments and the need for a snapshot must change together in each of them.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections import deque
from pathlib import Path

from tenantdb import clock
from tenantdb.errors import LeaseLostError, ReplicationError, TenantDBError
from tenantdb.metrics import Metrics
from tenantdb.protocol.lease import Lease
from tenantdb.protocol.lockfile import LogPointer, now_ms
from tenantdb.protocol.snapshot import publish_snapshot, temp_snapshot_path
from tenantdb.replication import checkpoint
from tenantdb.replication.carrier import Carried, Carrier
from tenantdb.replication.checkpoint import CONNECTION_PRAGMAS, open_connection
from tenantdb.replication.checksum import PageHashes, format_state
from tenantdb.replication.compaction import Compactor
from tenantdb.replication.garbage import GarbageCollector
from tenantdb.replication.group_commit import GroupCommit, Writers
from tenantdb.replication.next_segment import Built, encode_next, read_next
from tenantdb.replication.snapshot_copy import MAX_FRAMES_PER_SEGMENT, copy_consistent
from tenantdb.replication.uploads import LogUploads, carried_segments, put_log_object
from tenantdb.replication.wal import WALPosition, wal_index_frames, wal_start

__all__ = [
    "CONNECTION_PRAGMAS",
    "Shipper",
    "carried_segments",
    "empty_log",
    "open_connection",
    "put_log_object",
]

log = logging.getLogger("tenantdb.replication")

# A restore applies at most this many objects: past it (compaction failing), a snapshot.
MAX_CHUNKS = 64


def empty_log(hashes: PageHashes) -> LogPointer:
    """A log with no segment yet, on top of a database whose pages ``hashes`` describes."""
    return LogPointer.empty(1, format_state(hashes.state), hashes.db_pages)


class Shipper:
    """Keeps the bucket's log of one tenant within a sync interval of the local database.

    Why ~450 lines: shipping, checkpoints and snapshots all move one WAL position under one
    lock (see the module's docstring); what does not touch that position lives beside it
    (``next_segment``, ``uploads``, ``compaction``, ``checkpoint``, ``snapshot_copy``,
    ``garbage``).
    """

    def __init__(
        self,
        lease: Lease,
        db_path: Path,
        *,
        hashes: PageHashes | None,
        prefix: str,
        work_dir: Path,
        snapshot_retention: int,
        retention: float = 86400.0,
        metrics: Metrics | None = None,
        writers: Writers | None = None,
    ) -> None:
        """``hashes`` describes the database as the bucket has it; None means unknown.

        ``writers`` (the connection pool) tells a group commit that more commits are on
        the way."""
        self.metrics = metrics or Metrics()
        # Since when (monotonic) a commit is known to wait for the bucket: the log lag.
        self._unshipped_since: float | None = None
        self.lease = lease
        self.db_path = db_path
        self.wal_path = Path(f"{db_path}-wal")
        self.shm_path = Path(f"{db_path}-shm")
        self.prefix = prefix
        self.work_dir = work_dir
        self._lock = asyncio.Lock()
        self.uploads = LogUploads(lease.bucket, lease.tenant)
        self.garbage = GarbageCollector(
            lease,
            prefix=prefix,
            retention=retention,
            snapshot_retention=snapshot_retention,
            lock=self._lock,
            uploading=self.uploads.__contains__,
        )
        self.compactor = Compactor(lease, prefix=prefix)
        # The published segments lock.json carries inline, and the packs that store them.
        self.carrier = Carrier(self.uploads, prefix=prefix, tenant=lease.tenant)
        self._hashes = hashes
        # None until the first read: the start of whatever WAL exists then. Nothing in it
        # can have been checkpointed (the database was just restored or created): from
        # ``open`` to that read, the reader holds a read transaction (``_pinned``), so no
        # other connection's checkpoint, restart or close can fold frames away unread.
        self._position: WALPosition | None = None
        self._pinned = False
        # Salts of the WALs the position has moved past: every commit in them is shipped.
        self._passed_wals: deque[tuple[int, int]] = deque(maxlen=16)
        # Segments made and not yet published, in log order: the first is retried as it
        # is until it is published; the next may be made and uploaded meanwhile.
        self._unpublished: deque[Built] = deque()
        # Segment indices are never reused, even for a segment that was never published.
        self._next_index: int | None = None
        # True while the position is the end of the WAL as seen holding the write lock (a
        # snapshot's copy, or a checkpoint of everything shipped): a restart then lost
        # nothing, as SQLite restarts the WAL only before the first frame of a write.
        self._restart_expected = False
        # The last segment stopped at MAX_FRAMES_PER_SEGMENT: more commits are waiting.
        self._backlog = False
        self._needs_snapshot = hashes is None
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._group = GroupCommit(self.ship_once, tenant=lease.tenant, writers=writers)
        self._snapshot_at = clock.monotonic()
        self.snapshots = 0  # published by this shipper

    def __repr__(self) -> str:
        return f"Shipper(tenant={self.lease.tenant!r}, db={str(self.db_path)!r})"

    async def open(self) -> None:
        """Open the shipper's two connections; they keep the WAL from being deleted."""
        self._writer = await asyncio.to_thread(open_connection, self.db_path)
        self._reader = await asyncio.to_thread(open_connection, self.db_path)
        if not self._needs_snapshot:
            # (A snapshot due copies the database file, whatever happened to the WAL.)
            await asyncio.to_thread(checkpoint.pin_snapshot, self._reader)
            self._pinned = True

    async def close(self) -> PageHashes | None:
        """Close the connections (the last one to close folds the WAL into the file).

        Returns the page hashes of the closed database file when it is exactly what the
        shipper published (every commit shipped, the WAL folded in whole), else None:
        the caller closes every other connection to the file first.
        """
        self._group.close()
        async with self._lock:
            self._forget_unpublished()
            self.uploads.cancel_all()  # lock.json carries what they were for
            published = await asyncio.to_thread(self._everything_published)
            for conn in (self._reader, self._writer):
                if conn is not None:
                    await asyncio.to_thread(conn.close)
            self._reader = self._writer = None
            # A WAL left behind was not folded in whole (another connection still open).
            if published and not await asyncio.to_thread(self.wal_path.exists):
                return self._hashes
            return None

    def _everything_published(self) -> bool:
        """Whether every commit in the database is published: ``_hashes`` describes it."""
        if self._hashes is None or self._needs_snapshot:
            return False
        try:
            start = wal_start(self.wal_path)
        except ReplicationError:
            return False  # unreadable: unknown, and closing must not fail for it
        if start is None:
            return True  # an empty WAL: the file alone is the database
        frames = wal_index_frames(self.shm_path, start.salts)
        return frames is not None and self._shipped(start.salts, frames)

    @property
    def source(self) -> sqlite3.Connection:
        """A connection for consistent reads of the whole database (snapshots)."""
        if self._reader is None:
            raise ReplicationError(f"{self!r} is not open")
        return self._reader

    async def sync(self) -> None:
        """Ship everything committed so far; return once the bucket has it.

        Concurrent callers share uploads (see ``GroupCommit``). Commits that land
        meanwhile are not waited for, so this returns under a steady stream of writes too.
        """
        # Two small reads of files in the page cache: cheaper inline than in a thread.
        target = self._committed_now()
        self._note_unshipped(target)
        await self._group.wait(lambda: target is not None and self._shipped(*target))

    def _committed_now(self) -> tuple[tuple[int, int], int] | None:
        """The current WAL's salts and committed frame count, when the wal-index says."""
        start = wal_start(self.wal_path)
        if start is None:
            return None
        salts = start.salts
        frames = wal_index_frames(self.shm_path, salts)
        return None if frames is None else (salts, frames)

    def _shipped(self, salts: tuple[int, int], frames: int) -> bool:
        """Whether the position is past ``frames`` frames of the WAL with ``salts``."""
        position = self._position
        if position is None or self._needs_snapshot:
            return False
        if position.salts != salts:
            return salts in self._passed_wals  # else a newer WAL, not read yet
        return position.frames >= frames

    def _move_to(self, position: WALPosition | None) -> None:
        """Make ``position`` the shipped position, remembering a WAL left behind."""
        old = self._position
        if old is not None and (position is None or position.salts != old.salts):
            self._passed_wals.append(old.salts)
        self._position = position
        if position is not None:
            self._unpin()  # from here a restart since the position is seen (read_next)

    def _unpin(self) -> None:
        """End the read transaction ``open`` began, if it is still open."""
        if self._pinned and self._reader is not None:
            self._reader.execute("ROLLBACK")
        self._pinned = False

    async def ship_once(self) -> bool:
        """Publish every commit so far in one CAS (or the snapshot the log needs).

        Returns False if nothing was due. The segments are uploaded in the background:
        until they are, lock.json carries them (see ``_advance``).
        """
        async with self._lock:
            self._note_unshipped(self._committed_now())
            shipped = await self._ship_locked()
            self._note_unshipped(self._committed_now())
            return shipped

    def _note_unshipped(self, target: tuple[tuple[int, int], int] | None) -> None:
        """Start the log lag's clock at the first sight of an unshipped commit; stop it at none.

        Commits are seen when a request waits for one or at each sync interval, so the lag
        reads low by up to one interval, never high.
        """
        if target is None or self._shipped(*target):
            self._unshipped_since = None
        elif self._unshipped_since is None:
            self._unshipped_since = clock.monotonic()

    def lag(self) -> float:
        """Seconds the oldest commit not yet in the bucket has waited; 0 when none."""
        since = self._unshipped_since
        return 0.0 if since is None else clock.monotonic() - since

    def upload_failing_for(self) -> float:
        """Seconds the upload of a log object has been failing (lock.json carries it
        meanwhile); 0 when none is."""
        return self.uploads.failing_for()

    async def _ship_locked(self) -> bool:
        if self._needs_snapshot:
            await self._snapshot()
            return True
        try:
            if not self._unpublished:
                built = await asyncio.to_thread(self._build, None)
                if built is None:
                    return False
                self._unpublished.append(built)
            await self._advance(list(self._unpublished))
        except ReplicationError as exc:
            # The WAL or the log is not what the shipper expects: never guess.
            log.warning("tenant %s: %s; taking a full snapshot instead", self.lease.tenant, exc)
            self._forget_unpublished()
            self._needs_snapshot = True
        return True

    def _forget_unpublished(self) -> None:
        """Drop the segments made but not published (their indices are never reused).

        The packs of carried segments go on: lock.json publishes them, and only a write
        sent after their packs exist may stop carrying them (see ``Carrier``).
        """
        for built in self._unpublished:
            self.uploads.forget(built.key, cancel=True)
        self._unpublished.clear()

    async def run(self, interval: float, snapshot_interval: float) -> None:
        """Sync every ``interval`` seconds, checkpoint and snapshot as due, until fenced."""
        while True:
            await asyncio.sleep(interval)
            self.carrier.retry()  # a failed upload is retried, commits or not
            try:
                # One segment per interval, more only while a backlog is being worked off.
                while await self.ship_once() and self._backlog:
                    pass
                # A new base first: a merge of what it would hold is bytes for nothing.
                if self._snapshot_due(snapshot_interval):
                    async with self._lock:
                        await self._snapshot()
                await self._compact()
                await self._checkpoint_if_large()
            except LeaseLostError:
                return
            except (TenantDBError, OSError, sqlite3.Error) as exc:
                log.warning(
                    "tenant %s: log shipping failed, will retry: %s", self.lease.tenant, exc
                )

    async def snapshot(self) -> bool:
        """Ship, then publish a full snapshot as the log's base unless the newest already is.

        Returns whether a snapshot was published (by the sync's fallback or here).
        """
        before = self.snapshots
        await self.sync()
        async with self._lock:
            record = self.lease.record
            if record is None or record.snapshot is None or self._log().tail >= self._log().base:
                await self._snapshot()
        return self.snapshots > before

    def _snapshot_due(self, every: float) -> bool:
        pointer = self._log()
        too_long = pointer.objects() >= MAX_CHUNKS
        outgrew = self.compactor.log_outgrew(pointer, self._db_bytes())
        return too_long or outgrew or (every > 0 and clock.monotonic() - self._snapshot_at >= every)

    def _db_bytes(self) -> int:
        """The database's size as the log has it (what a snapshot would upload)."""
        hashes = self._hashes
        return 0 if hashes is None else hashes.db_pages * hashes.page_size

    def _log(self) -> LogPointer:
        """The log as lock.json has it; a lock without one gets a log on its snapshot."""
        record = self.lease.record
        if record is None or self._hashes is None:
            raise ReplicationError(f"tenant {self.lease.tenant}: the log has no base yet")
        return record.log or empty_log(self._hashes)

    # -- segments ------------------------------------------------------------------------

    def _build(self, after: Built | None) -> Built | None:
        """Read the next commits from the WAL and encode them as the next segment.

        The segment follows the published log, or ``after`` (not published yet).
        """
        hashes = after.hashes if after else self._hashes
        if hashes is None:
            raise ReplicationError("no base state to build a segment on")
        start = after.read.end if after else self._position or wal_start(self.wal_path)
        if start is None:
            return None  # no WAL yet: nothing was committed since the database was opened
        expected = after is None and self._restart_expected
        read = read_next(self.db_path, start, restart_expected=expected)
        if not read.commits:
            if after is None:
                self._move_to(read.end)
            return None
        record = self.lease.record
        if record is None:
            raise LeaseLostError("the lease is not held", tenant=self.lease.tenant)
        return encode_next(
            read,
            hashes,
            prefix=self.prefix,
            tenant=self.lease.tenant,
            generation=record.generation,
            index=self._take_index(),
        )

    def _take_index(self) -> int:
        index = self._peek_index()
        self._next_index = index + 1
        return index

    def _peek_index(self) -> int:
        if self._next_index is None:
            record = self.lease.record
            self._next_index = record.log.tail + 1 if record and record.log else 1
        return self._next_index

    async def _advance(self, batch: list[Built]) -> None:
        """Append segments to the log in one CAS (it fences them): they are published.

        lock.json carries them inline, so that one write publishes them; they are written
        to the bucket later, in packs (see ``Carrier``), and a segment stops being carried
        only in a write sent after its pack's upload was answered.
        """
        new = [Carried(b.index, b.generation, b.body) for b in batch]
        stored = await self.carrier.prepare(self.lease.record, new)
        last = batch[-1]
        state = format_state(last.hashes.state)

        def append(log: LogPointer | None) -> LogPointer:
            if log is not None and log.tail == last.index and log.state == state:
                return log  # our own write of them landed unheard, and was adopted
            for built in batch:
                log = built.append_to(log)
            if log is None:
                raise ReplicationError("nothing to append")
            return log.with_packs(stored.ranges).with_inline([c.body for c in stored.inline])

        await self.lease.update_log(append)
        self.metrics.shipped(sum(len(built.body) for built in batch), len(batch))
        for built in batch:
            self._unpublished.popleft()
            self.compactor.remember(built.key, built.body)
        self.carrier.published(stored)
        self._move_to(last.read.end)
        self._hashes = last.hashes
        self._restart_expected = False
        self._backlog = last.read.frames >= MAX_FRAMES_PER_SEGMENT

    # -- compaction ----------------------------------------------------------------------

    async def _compact(self) -> None:
        """Merge log objects as ``compaction.next_merge`` plans: a restore stays short."""
        while self._hashes is not None and not self._needs_snapshot:
            if not await self.compactor.merge_next(self._log(), self._db_bytes()):
                return
            self.garbage.garbage_made()

    async def collect_garbage_when_due(self, interval: float) -> None:
        """Look every ``interval`` seconds whether garbage is due, collect it, until fenced."""
        await self.garbage.run_when_due(interval)

    async def collect_garbage(self) -> list[str]:
        """Delete the objects no restore within the retention needs; return their keys."""
        return await self.garbage.collect()

    # -- checkpoints and snapshots -------------------------------------------------------

    async def _checkpoint_if_large(self) -> None:
        """Checkpoint once the WAL holds CHECKPOINT_WAL_BYTES; hold writes off if need be.

        The checkpoint that blocks no writer needs a moment with every commit shipped; under
        a steady stream of writes that moment may never come, and the WAL would grow without
        end. Past ``CHECKPOINT_STALL_FACTOR`` times the size, writes are held off for the
        one publication that ships the rest, and the checkpoint runs then.

        First the WAL file left longer than the WAL by a restart is cut (``trim_wal``).
        """
        async with self._lock:
            writer, position = self._writer, self._position
            if writer is not None and position is not None:
                await asyncio.to_thread(
                    checkpoint.trim_wal, writer, self.wal_path, self.shm_path, position
                )
        size = await asyncio.to_thread(self._wal_bytes)
        if size < checkpoint.CHECKPOINT_WAL_BYTES:
            return
        async with self._lock:
            await asyncio.to_thread(self._checkpoint)
            if size >= checkpoint.CHECKPOINT_WAL_BYTES * checkpoint.CHECKPOINT_STALL_FACTOR:
                await self._checkpoint_holding_writes()

    def _wal_bytes(self) -> int:
        return checkpoint.wal_bytes(self.wal_path, self.shm_path)

    async def _checkpoint_holding_writes(self) -> None:
        """Take SQLite's write lock, ship everything, checkpoint it all, let writers go."""
        writer, reader = self._writer, self._reader
        if writer is None or reader is None or self._needs_snapshot:
            return
        await asyncio.to_thread(writer.execute, "BEGIN IMMEDIATE")
        try:
            while not self._needs_snapshot and await self._ship_locked():
                pass  # no commit can land meanwhile: this ends at the WAL's end
            if self._unpublished or self._needs_snapshot:
                return
            self._restart_expected = await asyncio.to_thread(
                checkpoint.checkpoint_everything, reader
            )
        finally:
            await asyncio.to_thread(writer.execute, "ROLLBACK")

    def _checkpoint(self) -> None:
        """Fold shipped frames into the database file, blocking no writer (blocking call)."""
        reader, checkpointer = self._reader, self._writer
        if reader is None or checkpointer is None or self._unpublished or self._needs_snapshot:
            return
        start = self._position
        if start is None:
            return  # nothing read yet: nothing shipped to fold in
        expected = checkpoint.checkpoint_shipped(reader, checkpointer, self.shm_path, start)
        if expected is not None:
            self._restart_expected = expected

    async def _snapshot(self) -> None:
        """Publish a full snapshot as the log's new base (compaction, or a fallback)."""
        with self.metrics.timing("checkpoint"):
            await self._publish_snapshot()

    async def _publish_snapshot(self) -> None:
        if self._unpublished and not self._needs_snapshot:
            # Publish them first: a snapshot would skip their indices, and a restore
            # cannot tell a skipped index from a lost one (it refuses moments there).
            try:
                await self._advance(list(self._unpublished))
            except ReplicationError:
                self._forget_unpublished()
        # The snapshot's CAS replaces the log, inline segments and all: a carried segment
        # not stored by then would be published and lost (a point-in-time restore into it
        # could only fail), so the snapshot waits for their packs, and fails with them.
        await self.carrier.store_all(self.lease.record)
        self._unpin()  # the copy reads the file through the reader, whatever the WAL did
        copy = temp_snapshot_path(self.work_dir)
        try:
            position, hashes, at_end = await asyncio.to_thread(
                copy_consistent, self._reader, self._writer, self.db_path, copy
            )
            taken_ms = now_ms()  # after the copy: every commit it holds
            # From here the shipper's position is the copy's: until the snapshot is known
            # to be published, nothing can be shipped on top of either.
            self._needs_snapshot = True
            index = self._peek_index()
            pointer = LogPointer.empty(index, format_state(hashes.state), hashes.db_pages)
            await publish_snapshot(
                self.lease,
                self.lease.bucket,
                copy,
                log=pointer,
                taken_ms=taken_ms,
            )
        finally:
            copy.unlink(missing_ok=True)
        self._move_to(position)
        self._hashes = hashes
        self._forget_unpublished()
        self.carrier.replaced()  # the snapshot replaced the log that carried them
        self._needs_snapshot, self._restart_expected = False, at_end
        self._snapshot_at = clock.monotonic()
        self.snapshots += 1
        self.garbage.garbage_made()
