"""Ship each commit's changed pages to the bucket as fenced segments; checkpoint what is shipped.

One ``Shipper`` per served tenant. Every ``sync_interval`` it reads the commits added to the
WAL since the last shipped position, writes the newest image of each changed page as one
immutable segment (``If-None-Match: *``, a key only this generation writes), then moves
``lock.json``'s log tail onto it by CAS, which also renews the lease. A segment counts only
once that CAS landed: a fenced holder's uploads are garbage no restore reads.

tenantdb is the only checkpointer of the databases it opens: every connection has
``wal_autocheckpoint=0``, and the shipper runs ``wal_checkpoint(PASSIVE)`` only while it
holds the write lock and every frame in the WAL is shipped. So a WAL restart (new salts)
is followed only after such a checkpoint, and only when salt-1 proves it is exactly one
restart (an app's own checkpoint may add another, whose WAL nobody read); any other
restart, or a WAL that cannot be read as expected, falls back to a full snapshot rather
than guessing.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sqlite3
from collections import deque
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from tenantdb import clock
from tenantdb.errors import (
    LeaseLostError,
    ObjectTooLargeError,
    PreconditionFailedError,
    ReplicationError,
    TenantDBError,
)
from tenantdb.metrics import Metrics
from tenantdb.protocol.lease import Lease
from tenantdb.protocol.lockfile import INLINE_MAX_BYTES, LockRecord, LogChunk, LogPointer, now_ms
from tenantdb.protocol.snapshot import copy_database, publish_snapshot, temp_snapshot_path
from tenantdb.replication.checksum import PageHashes, database_page_size, format_state
from tenantdb.replication.compaction import merge_segments, next_merge
from tenantdb.replication.group_commit import GroupCommit, retrieve_exception
from tenantdb.replication.history import SegmentEntry, SnapshotEntry, read_history
from tenantdb.replication.segment import (
    SEGMENT_MAX_BYTES,
    Segment,
    SegmentHeader,
    chunk_key,
    encode_segment,
    segment_key,
)
from tenantdb.replication.wal import (
    CommittedPages,
    WALPosition,
    WALRestartedError,
    read_committed,
    restart_dropped_frames,
    restarted_once,
    wal_index_frames,
    wal_start,
)
from tenantdb.storage.base import Bucket

__all__ = [
    "CONNECTION_PRAGMAS",
    "Shipper",
    "carried_segments",
    "empty_log",
    "open_connection",
    "put_log_object",
]

log = logging.getLogger("tenantdb.replication")

# Frames read into one segment at most (a transaction longer than this is shipped whole).
MAX_FRAMES_PER_SEGMENT = 4096
# Checkpoint once the WAL holds this much shipped data; it restarts from the top after.
CHECKPOINT_WAL_BYTES = 4 << 20
# Past this many times CHECKPOINT_WAL_BYTES, writes are held off for one publication so
# that a checkpoint can take everything (see Shipper._checkpoint_if_large).
CHECKPOINT_STALL_FACTOR = 4
# SQLite truncates the WAL file to this size when it restarts it after a checkpoint.
JOURNAL_SIZE_LIMIT = 16 << 20
# The shortest pause between two looks (a LIST) for log objects no restore can use.
GC_INTERVAL = 600.0
# A restore applies at most this many objects: past it (compaction failing), a snapshot.
MAX_CHUNKS = 64
# Bytes of the log objects this holder wrote kept in memory, so that merges need not
# download them (a segment is at most MAX_FRAMES_PER_SEGMENT pages).
RECENT_BYTES = 16 << 20


# Every connection tenantdb opens to a tenant database: WAL, and no automatic checkpoint.
CONNECTION_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA wal_autocheckpoint=0",
    f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}",
    "PRAGMA busy_timeout=5000",
)


def open_connection(path: Path) -> sqlite3.Connection:
    """A connection to a tenant database with tenantdb's pragmas."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    for pragma in CONNECTION_PRAGMAS:
        conn.execute(pragma)
    return conn


def empty_log(hashes: PageHashes) -> LogPointer:
    """A log with no segment yet, on top of a database whose pages ``hashes`` describes."""
    return LogPointer.empty(1, format_state(hashes.state), hashes.db_pages)


def _succeeded(task: asyncio.Task[None]) -> bool:
    return task.done() and not task.cancelled() and task.exception() is None


def _chunks_within(log: LogPointer, first: int, last: int) -> list[LogChunk]:
    return [c for c in log.chunks() if first <= c.first and c.last <= last]


def carried_segments(record: LockRecord | None, *, prefix: str) -> list[tuple[str, bytes]]:
    """The segments a lock.json carries inline, as (key, body), oldest first."""
    pointer = record.log if record else None
    if record is None or pointer is None:
        return []
    return [
        (chunk_key(prefix, record.tenant, chunk), body)
        for chunk in pointer.chunks()
        if not chunk.merged and (body := pointer.inline_segment(chunk.last)) is not None
    ]


async def put_log_object(bucket: Bucket, key: str, body: bytes) -> None:
    """Create an immutable log object; a retry of our own landed upload is accepted."""
    try:
        await bucket.put(key, body, if_none_match="*")
    except PreconditionFailedError:
        # An object there is this upload, landed unheard, or a carried segment another
        # holder uploaded: the same bytes either way, so compare them. Anything else
        # (even of the same size) must not be published as ours.
        try:
            existing: bytes | None = (await bucket.get(key, max_size=len(body))).body
        except ObjectTooLargeError:
            existing = None
        if existing != body:
            raise ReplicationError(
                f"{key} exists with other bytes than the {len(body)} of this upload; "
                "refusing to ship past it",
                key=key,
            ) from None


@dataclass(frozen=True)
class _Built:
    """A segment made from the WAL and not yet published: retried as it is until it is."""

    key: str
    body: bytes
    read: CommittedPages
    hashes: PageHashes  # the database's pages with this segment applied
    index: int
    generation: int
    # The database this segment applies to: lock.json's log must end there.
    prev_state: str
    prev_pages: int

    def append_to(self, log: LogPointer | None) -> LogPointer:
        """``log`` with this segment at its tail; ReplicationError if it does not follow."""
        state = format_state(self.hashes.state)
        base = log or LogPointer.empty(1, self.prev_state, self.prev_pages)
        if base.tail != self.index - 1 or base.state != self.prev_state:
            raise ReplicationError(
                f"segment {self.key} does not follow lock.json's log (tail {base.tail})",
                key=self.key,
            )
        return base.appended(self.generation, state, self.hashes.db_pages)


class Shipper:
    """Keeps the bucket's log of one tenant within a sync interval of the local database."""

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
    ) -> None:
        """``hashes`` describes the database as the bucket has it; None means unknown."""
        self.metrics = metrics or Metrics()
        # Since when (monotonic) a commit is known to wait for the bucket: the log lag.
        self._unshipped_since: float | None = None
        self.lease = lease
        self.db_path = db_path
        self.wal_path = Path(f"{db_path}-wal")
        self.shm_path = Path(f"{db_path}-shm")
        self.prefix = prefix
        self.work_dir = work_dir
        self.snapshot_retention = snapshot_retention
        self.retention = retention
        # When to look for garbage next (monotonic); None: no garbage is known to exist. An
        # idle tenant costs no LIST: only merges, snapshots and a new holding make garbage.
        self._next_collection: float | None = clock.monotonic()
        self._hashes = hashes
        # None until the first read: the start of whatever WAL exists then (the database
        # was just restored or created, so nothing in it can have been checkpointed).
        self._position: WALPosition | None = None
        # Salts of the WALs the position has moved past: every commit in them is shipped.
        self._passed_wals: deque[tuple[int, int]] = deque(maxlen=16)
        # Segments made and not yet published, in log order: the first is retried as it
        # is until it is published; the next may be made and uploaded meanwhile.
        self._unpublished: deque[_Built] = deque()
        # Uploads of log objects not yet named by lock.json, or carried inline in it.
        self._uploads: dict[str, asyncio.Task[None]] = {}
        # When each log object's upload first failed, until one of its retries succeeds.
        self._upload_failed_at: dict[str, float] = {}
        # The published segments lock.json carries inline, as (key, body), oldest first;
        # None until read from the lock this holding started with.
        self._carried: deque[tuple[str, bytes]] | None = None
        self._recent: dict[str, bytes] = {}  # see _remember
        self._recent_bytes = 0
        # Segment indices are never reused, even for a segment that was never published.
        self._next_index: int | None = None
        # True while the position is the end of the WAL as seen holding the write lock (a
        # snapshot's copy, or a checkpoint of everything shipped): a restart then lost
        # nothing, as SQLite restarts the WAL only before the first frame of a write.
        self._restart_expected = False
        # The last segment stopped at MAX_FRAMES_PER_SEGMENT: more commits are waiting.
        self._backlog = False
        self._needs_snapshot = hashes is None
        self._lock = asyncio.Lock()
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._group = GroupCommit(self.ship_once, tenant=lease.tenant)
        self._snapshot_at = clock.monotonic()
        self.snapshots = 0  # published by this shipper

    def __repr__(self) -> str:
        return f"Shipper(tenant={self.lease.tenant!r}, db={str(self.db_path)!r})"

    async def open(self) -> None:
        """Open the shipper's two connections; they keep the WAL from being deleted."""
        self._writer = await asyncio.to_thread(open_connection, self.db_path)
        self._reader = await asyncio.to_thread(open_connection, self.db_path)

    async def close(self) -> None:
        """Close the connections (the last one to close folds the WAL into the file)."""
        self._group.close()
        async with self._lock:
            self._forget_unpublished()
            for upload in self._uploads.values():
                upload.cancel()  # lock.json carries what they were for: the next holder's
            self._uploads.clear()
            for conn in (self._reader, self._writer):
                if conn is not None:
                    await asyncio.to_thread(conn.close)
            self._reader = self._writer = None

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
        failed = [at for key, at in self._upload_failed_at.items() if key in self._uploads]
        return clock.monotonic() - min(failed) if failed else 0.0

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

        The uploads of carried segments go on: lock.json publishes them, and only a write
        sent after their objects exist may stop carrying them (see ``_upload_carried``,
        which also restarts any that lock.json turns out to carry).
        """
        for built in self._unpublished:
            upload = self._uploads.pop(built.key, None)
            if upload is not None:
                upload.cancel()
        self._unpublished.clear()

    async def _upload_carried(self) -> list[str]:
        """Put every segment lock.json carries into its object: before a CAS drops them.

        A snapshot's CAS replaces the log, inline segments and all; a carried segment whose
        object did not exist then would be published and lost, and a point-in-time restore
        into it could only fail. So the snapshot waits for them, and fails with them.
        Returns their keys.
        """
        carried = carried_segments(self.lease.record, prefix=self.prefix)
        for key, body in carried:
            await asyncio.shield(self._upload(key, body))
        return [key for key, _ in carried]

    async def run(self, interval: float, snapshot_interval: float) -> None:
        """Sync every ``interval`` seconds, checkpoint and snapshot as due, until fenced."""
        while True:
            await asyncio.sleep(interval)
            for key, body in self._carried or ():
                self._upload(key, body)  # a failed upload is retried, commits or not
            try:
                # One segment per interval, more only while a backlog is being worked off.
                while await self.ship_once() and self._backlog:
                    pass
                await self._compact()
                if self._snapshot_due(snapshot_interval):
                    async with self._lock:
                        await self._snapshot()
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
        too_long = len(pointer.chunks()) >= MAX_CHUNKS
        return too_long or (every > 0 and clock.monotonic() - self._snapshot_at >= every)

    def _log(self) -> LogPointer:
        """The log as lock.json has it; a lock without one gets a log on its snapshot."""
        record = self.lease.record
        if record is None or self._hashes is None:
            raise ReplicationError(f"tenant {self.lease.tenant}: the log has no base yet")
        return record.log or empty_log(self._hashes)

    # -- segments ------------------------------------------------------------------------

    def _build(self, after: _Built | None) -> _Built | None:
        """Read the next commits from the WAL and encode them as the next segment.

        The segment follows the published log, or ``after`` (not published yet).
        """
        hashes = after.hashes if after else self._hashes
        if hashes is None:
            raise ReplicationError("no base state to build a segment on")
        start = after.read.end if after else self._position or wal_start(self.wal_path)
        if start is None:
            return None  # no WAL yet: nothing was committed since the database was opened
        try:
            read = self._read(start)
        except WALRestartedError as exc:
            if after or not self._restart_expected or exc.current is None:
                raise ReplicationError(
                    f"{self.wal_path} was restarted by something other than tenantdb"
                ) from exc
            if not restarted_once(start, exc.current):
                # Another checkpoint and restart came between: the commits of the WAL
                # in between were never read, and the database file holds them.
                raise ReplicationError(
                    f"{self.wal_path} was restarted more than once since the position "
                    f"(salt-1 {start.salt1:08x}, now {exc.current.salt1:08x})"
                ) from exc
            if restart_dropped_frames(self.wal_path, start, exc.current):
                # A commit reached the old WAL after the position (a reader held the
                # restart off), and an app's checkpoint let the restart drop it.
                raise ReplicationError(
                    f"{self.wal_path} was restarted after frames the shipper never read"
                ) from exc
            read = self._read(exc.current)
        if not read.commits:
            if after is None:
                self._move_to(read.end)
            return None
        if len(read.pages) * (4 + read.end.page_size) > SEGMENT_MAX_BYTES:
            # Readers refuse a larger object unread: ship these commits in a snapshot.
            raise ReplicationError(
                f"{len(read.pages)} pages changed, more than one segment may carry"
            )
        if hashes.db_pages == 0 and hashes.page_size != read.end.page_size:
            hashes = PageHashes(read.end.page_size)  # a new database's first page size
        new_hashes = hashes.copy()
        new_hashes.apply(read.pages, read.db_pages)
        record = self.lease.record
        if record is None:
            raise LeaseLostError("the lease is not held", tenant=self.lease.tenant)
        index = self._take_index()
        header = SegmentHeader(
            tenant=self.lease.tenant,
            generation=record.generation,
            index=index,
            page_size=read.end.page_size,
            db_pages=read.db_pages,
            timestamp_ms=now_ms(),
            prev_state=hashes.state,
            state=new_hashes.state,
            commits=read.commits,
        )
        body = encode_segment(Segment(header, tuple(sorted(read.pages.items()))))
        key = segment_key(self.prefix, self.lease.tenant, record.generation, index)
        return _Built(
            key,
            body,
            read,
            new_hashes,
            index,
            record.generation,
            format_state(hashes.state),
            hashes.db_pages,
        )

    def _read(self, start: WALPosition, max_frames: int = MAX_FRAMES_PER_SEGMENT) -> CommittedPages:
        """Read committed frames from ``start``, bounded by the wal-index when it is sound.

        The wal-index says which frames are committed, so their checksums need not be
        recomputed (pure Python, about 90 µs a 4 KiB page: a tax on every write); without
        a trustworthy index every frame's checksum is verified instead.
        """
        committed = wal_index_frames(self.shm_path, start.salts)
        return read_committed(
            self.wal_path, start, max_frames=max_frames, committed_frames=committed
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

    async def _put_once(self, key: str, body: bytes) -> None:
        await put_log_object(self.lease.bucket, key, body)

    def _upload(self, key: str, body: bytes) -> asyncio.Task[None]:
        """The upload of a log object, started now unless running or done."""
        upload = self._uploads.get(key)
        if upload is None or (upload.done() and not _succeeded(upload)):
            upload = asyncio.get_running_loop().create_task(self._put_once(key, body))
            upload.add_done_callback(retrieve_exception)
            upload.add_done_callback(functools.partial(self._note_upload, key))
            self._uploads[key] = upload
        return upload

    def _note_upload(self, key: str, upload: asyncio.Task[None]) -> None:
        if _succeeded(upload):
            self._upload_failed_at.pop(key, None)
        elif not upload.cancelled() and key not in self._upload_failed_at:
            self._upload_failed_at[key] = clock.monotonic()
            log.warning(
                "tenant %s: uploading %s failed, retrying (lock.json carries it meanwhile): %s",
                self.lease.tenant,
                key,
                upload.exception(),
            )

    def _uploaded(self, key: str) -> bool:
        upload = self._uploads.get(key)
        return upload is not None and _succeeded(upload)

    async def _advance(self, batch: list[_Built]) -> None:
        """Append segments to the log in one CAS (it fences them): they are published.

        Their objects are uploaded in the background. Until a segment's object is known to
        be in the bucket, lock.json carries the segment itself (the newest ones, up to
        ``INLINE_MAX_BYTES``), so one write publishes it. A segment stops being carried
        only in a write sent after its upload finished; past the size limit, the oldest
        carried ones are waited for.
        """
        if self._carried is None:
            self._carried = deque(carried_segments(self.lease.record, prefix=self.prefix))
        chain = [*self._carried, *((b.key, b.body) for b in batch)]
        for key, body in chain:
            self._upload(key, body)
        start = next((i for i, (key, _) in enumerate(chain) if not self._uploaded(key)), len(chain))
        while start < len(chain) and sum(len(body) for _, body in chain[start:]) > INLINE_MAX_BYTES:
            await asyncio.shield(self._upload(*chain[start]))
            start += 1
        carried = chain[start:]
        last = batch[-1]
        state = format_state(last.hashes.state)

        def append(log: LogPointer | None) -> LogPointer:
            if log is not None and log.tail == last.index and log.state == state:
                return log  # our own write of them landed unheard, and was adopted
            for built in batch:
                log = built.append_to(log)
            if log is None:
                raise ReplicationError("nothing to append")
            return log.with_inline([body for _, body in carried])

        await self.lease.update_log(append)
        self.metrics.shipped(sum(len(built.body) for built in batch), len(batch))
        for built in batch:
            self._unpublished.popleft()
            self._remember(built.key, built.body)
        for key, _ in chain[:start]:
            del self._uploads[key]  # uploaded, and named by lock.json from now on
        self._carried = deque(carried)
        self._move_to(last.read.end)
        self._hashes = last.hashes
        self._restart_expected = False
        self._backlog = last.read.frames >= MAX_FRAMES_PER_SEGMENT

    # -- compaction ----------------------------------------------------------------------

    async def _compact(self) -> None:
        """Merge log objects as ``compaction.next_merge`` plans: a restore stays short.

        Runs beside shipping, not under the shipper's lock: the merge's CAS applies to the
        log as it is by then, segments appended meanwhile included.
        """
        while self._hashes is not None and not self._needs_snapshot:
            span = next_merge(self._log())
            if span is None:
                return
            await self._merge(*span)

    async def _merge(self, first: int, last: int) -> None:
        """Replace the log objects from ``first`` to ``last`` by one with their newest pages."""
        record = self.lease.record
        if record is None:
            raise LeaseLostError("the lease is not held", tenant=self.lease.tenant)
        tenant, generation = self.lease.tenant, record.generation
        chunks = _chunks_within(self._log(), first, last)
        keys = [chunk_key(self.prefix, tenant, chunk) for chunk in chunks]
        bodies = await asyncio.gather(*(self._log_object(key) for key in keys))
        body = await asyncio.to_thread(
            merge_segments, list(zip(keys, bodies, strict=True)), chunks, tenant, generation
        )
        merged = LogChunk(first, last, generation, merged=True)
        merged_key = chunk_key(self.prefix, tenant, merged)
        await self._put_once(merged_key, body)

        def replace_chunks(log: LogPointer | None) -> LogPointer:
            if log is not None and merged in log.chunks():
                return log  # our own write of it landed unheard, and was adopted
            if log is None or _chunks_within(log, first, last) != chunks:
                raise ReplicationError(f"the log changed under the merge of {first}..{last}")
            return log.with_merged(first, last, generation)

        await self.lease.update_log(replace_chunks)
        for key in keys:
            self._recent_bytes -= len(self._recent.pop(key, b""))
        self._remember(merged_key, body)
        self._garbage_made()

    async def _log_object(self, key: str) -> bytes:
        """A log object's bytes: kept from when this holder wrote it, else downloaded."""
        body = self._recent.get(key)
        if body is None:
            body = (await self.lease.bucket.get(key)).body
        return body

    def _remember(self, key: str, body: bytes) -> None:
        """Keep a published log object's bytes for the merge that will read it."""
        self._recent[key] = body
        self._recent_bytes += len(body)
        while self._recent_bytes > RECENT_BYTES:
            self._recent_bytes -= len(self._recent.pop(next(iter(self._recent))))

    async def collect_garbage_when_due(self, interval: float) -> None:
        """Look every ``interval`` seconds whether garbage is due, collect it, until fenced.

        A loop of its own, apart from ``run``: deleting is safe to retry, so its failure
        restarts it (see supervisor.py) while shipping goes on.
        """
        while self.lease.status == "held":
            await asyncio.sleep(interval)
            if self._next_collection is None or clock.monotonic() < self._next_collection:
                continue
            try:
                await self.collect_garbage()
            except LeaseLostError:
                return
            except (TenantDBError, OSError) as exc:
                log.warning(
                    "tenant %s: garbage collection failed, will retry: %s", self.lease.tenant, exc
                )

    async def collect_garbage(self) -> list[str]:
        """Delete the objects no restore within the retention needs; return their keys.

        A merge or a snapshot replaces objects, a fenced holder leaves uploads no restore
        reads: ``History.expendable`` decides, keeping whatever a point-in-time restore to
        any moment within ``retention`` uses and everything lock.json names.
        """
        async with self._lock:  # an object uploaded but not yet named is not garbage
            garbage = await self._find_garbage()
        # Deleting takes a request per object: outside the lock, writes keep shipping.
        for key in garbage:
            await self.lease.bucket.delete(key)
        return garbage

    async def _find_garbage(self) -> list[str]:
        if self.lease.record is None or self.lease.status != "held":
            return []
        history = await read_history(self.lease.bucket, self.lease.tenant, prefix=self.prefix)
        cutoff = clock.now() - timedelta(seconds=self.retention)
        # Planning is linear in the objects listed, which may be many: off the event loop.
        expendable = await asyncio.to_thread(
            history.expendable, cutoff, keep_snapshots=self.snapshot_retention
        )
        garbage = [
            key
            for key in expendable
            if key not in self._uploads  # being uploaded, to be named by a CAS
        ]
        self._next_collection = None
        settled = history.named() | set(garbage)
        objects: list[SnapshotEntry | SegmentEntry] = [*history.snapshots, *history.segments]
        waiting = [o.last_modified for o in objects if o.key not in settled]
        if waiting:  # look again once the oldest of them is past the retention
            due = (min(waiting) - cutoff).total_seconds()
            self._next_collection = clock.monotonic() + max(due, GC_INTERVAL)
        return garbage

    def _garbage_made(self) -> None:
        """A merge or a snapshot replaced objects: collect them once the retention is past."""
        due = clock.monotonic() + max(self.retention, GC_INTERVAL)
        if self._next_collection is None or due < self._next_collection:
            self._next_collection = due

    # -- checkpoints and snapshots -------------------------------------------------------

    async def _checkpoint_if_large(self) -> None:
        """Checkpoint once the WAL holds CHECKPOINT_WAL_BYTES; hold writes off if need be.

        The checkpoint that blocks no writer needs a moment with every commit shipped; under
        a steady stream of writes that moment may never come, and the WAL would grow without
        end. Past ``CHECKPOINT_STALL_FACTOR`` times the size, writes are held off for the
        one publication that ships the rest, and the checkpoint runs then.
        """
        size = await asyncio.to_thread(self._wal_bytes)
        if size < CHECKPOINT_WAL_BYTES:
            return
        async with self._lock:
            await asyncio.to_thread(self._checkpoint)
            if size >= CHECKPOINT_WAL_BYTES * CHECKPOINT_STALL_FACTOR:
                await self._checkpoint_holding_writes()

    def _wal_bytes(self) -> int:
        """How many bytes of frames the current WAL holds (its file may be larger)."""
        start = wal_start(self.wal_path)
        frames = wal_index_frames(self.shm_path, start.salts) if start else None
        return 0 if start is None or frames is None else frames * (start.page_size + 24)

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
            _busy, frames, done = await asyncio.to_thread(
                lambda: reader.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            )
            self._restart_expected = frames == done
        finally:
            await asyncio.to_thread(writer.execute, "ROLLBACK")

    def _checkpoint(self) -> None:
        """Fold shipped frames into the database file, blocking no writer.

        The checkpoint runs while the shipper's reader holds a read transaction begun when
        every committed frame was shipped: SQLite backfills no frame past a reader's
        snapshot, and restarts the WAL only once every frame is backfilled. So a restart
        can never drop a frame that was not shipped, and writers go on meanwhile.
        """
        reader, checkpointer = self._reader, self._writer
        if reader is None or checkpointer is None or self._unpublished or self._needs_snapshot:
            return
        start = self._position or wal_start(self.wal_path)
        if start is None:
            return
        reader.execute("BEGIN")
        try:
            reader.execute("SELECT count(*) FROM sqlite_master").fetchone()  # pins a snapshot
            # Read after pinning: the snapshot holds at most this many frames.
            committed = wal_index_frames(self.shm_path, start.salts)
            shipped = start.frames
            if committed is None or committed > shipped:
                return  # a commit landed since the last sync (or the index is unsure)
            _busy, frames, done = checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            self._restart_expected = frames == done <= shipped
        finally:
            reader.execute("ROLLBACK")

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
        uploaded = await self._upload_carried()
        copy = temp_snapshot_path(self.work_dir)
        try:
            position, hashes, at_end = await asyncio.to_thread(self._copy, copy)
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
        for key in uploaded:
            self._uploads.pop(key, None)  # in the bucket, and carried no more
        self._carried = deque()  # the snapshot replaced the log that carried them
        self._needs_snapshot, self._restart_expected = False, at_end
        self._snapshot_at = clock.monotonic()
        self.snapshots += 1
        self._garbage_made()

    def _copy(self, dest: Path) -> tuple[WALPosition | None, PageHashes, bool]:
        """Copy the database consistently; return the WAL end it matches.

        Usually under a pinned read snapshot, so that writers go on: the copy is then the
        state at the wal-index's committed frame count, read unchanged before and after
        pinning. If that cannot be established, the copy is made holding the write lock.
        The flag says whether the position is the WAL's end under the write lock.
        """
        pinned = self._copy_pinned(dest)
        if pinned is not None:
            return (*pinned, False)
        writer = self._writer
        if writer is None:
            raise ReplicationError(f"{self!r} is not open")
        writer.execute("BEGIN IMMEDIATE")
        try:
            copy_database(self.source, dest)
            # No writer can commit meanwhile: the copy is the state at the end of the WAL.
            position = self._read_to(wal_start(self.wal_path), None)
        finally:
            writer.execute("ROLLBACK")
        return position, PageHashes.of_file(dest, database_page_size(dest)), True

    def _copy_pinned(self, dest: Path) -> tuple[WALPosition | None, PageHashes] | None:
        """The copy under a pinned read snapshot, or None if its WAL end is not certain."""
        reader = self.source
        for _ in range(5):
            start = wal_start(self.wal_path)
            if start is None:
                return None
            salts = start.salts
            before = wal_index_frames(self.shm_path, salts)
            reader.execute("BEGIN")
            try:
                reader.execute("SELECT count(*) FROM sqlite_master").fetchone()
                if before is None or wal_index_frames(self.shm_path, salts) != before:
                    continue  # a commit landed while pinning: the snapshot's end is unknown
                copy_database(reader, dest)
            finally:
                reader.execute("ROLLBACK")
            position = self._read_to(start, before)
            return position, PageHashes.of_file(dest, database_page_size(dest))
        return None

    def _read_to(self, position: WALPosition | None, frames: int | None) -> WALPosition | None:
        """The position after the last commit of the WAL, or after ``frames`` frames of it."""
        while position is not None:
            read = read_committed(
                self.wal_path,
                position,
                max_frames=MAX_FRAMES_PER_SEGMENT,
                committed_frames=frames
                if frames is not None
                else wal_index_frames(self.shm_path, position.salts),
            )
            if read.end == position:
                break
            position = read.end
        return position
