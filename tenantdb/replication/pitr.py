"""Point-in-time restore: the tenant's database as it was at a given moment, verified.

A restore at moment T starts from the newest published snapshot made at or before T (or
from an empty database while segment 1 is kept: see ``History.bases``) and applies the
published segments that follow it, in order, while each one's last commit was read at or
before T. Merged objects stand in for runs of segments when they were written before T
(then every commit in them is older). The walk stops at the first segment past T, at
lock.json's log tail, or exactly where a later published snapshot's log starts; a missing
index is never taken for the end (a published segment can be lost): it is an error naming
it, never a silently older database. Every segment is
checked as a restore checks it (its hash, its place in the log, the state chain), and
the result passes ``quick_check`` before the atomic rename onto the destination.

Its precision is the segment: commits shipped together are restored together, and a
segment counts from when its last commit was read from the WAL (within a sync interval
of the commit; in ``bucket`` durability, before the write was answered).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tenantdb import clock
from tenantdb.errors import PointInTimeError, ReplicationError
from tenantdb.protocol.lease import read_lock
from tenantdb.protocol.lockfile import LogChunk
from tenantdb.protocol.snapshot import check_download, install_database, temp_restore_path
from tenantdb.replication.checksum import PageHashes, format_state
from tenantdb.replication.history import Base, History, SegmentEntry, read_history
from tenantdb.replication.log_objects import LogObjects
from tenantdb.replication.restore import (
    apply_segment,
    fetch_segment,
    hash_file,
    restore_database,
)
from tenantdb.replication.segment import Segment, chunk_key
from tenantdb.storage.base import Bucket

__all__ = ["Progress", "RestoredPoint", "restore_at"]

# (bytes done, bytes expected in all): called as objects arrive.
Progress = Callable[[int, int], None]

# Segments fetched ahead of the one being applied.
PREFETCH = 8
# How often the size of a snapshot being downloaded is reported.
_PROGRESS_INTERVAL = 0.1


@dataclass(frozen=True)
class RestoredPoint:
    """What a restore produced: the moment it reflects and the database's state."""

    # When the newest commit it holds was read (None: the empty database of a new tenant).
    at: datetime | None
    # The last log index it includes.
    index: int
    state: str
    db_pages: int
    snapshot: str | None


async def restore_at(
    bucket: Bucket,
    tenant: str,
    dest: Path,
    *,
    prefix: str,
    at: datetime | None = None,
    progress: Progress | None = None,
) -> RestoredPoint:
    """Write the tenant's database as of ``at`` (None: as lock.json names it now) to ``dest``.

    Reads only; ``dest`` is replaced atomically once the result is verified, and left as
    it was on any error.
    """
    if at is None:
        return await _restore_current(bucket, tenant, dest, prefix=prefix, progress=progress)
    if at.tzinfo is None:
        raise ValueError("the moment to restore must be timezone-aware")
    history = await read_history(bucket, tenant, prefix=prefix)
    snapshot = history.record.snapshot if history.record else None
    if snapshot is not None and snapshot.key in history.unlisted():
        # A base older than lock.json's snapshot, and a walk that ends where its log
        # starts: silently older. (A log object missing is a gap the walk names.)
        raise history.behind(snapshot.key)
    newest = _bucket_now(history)
    if at > newest:
        # What the database will hold then is not written yet: answering with today's
        # state would be a guess presented as a fact.
        raise PointInTimeError(
            f"tenant {tenant} cannot be restored as of {at.isoformat(timespec='seconds')}: "
            "that is in the future; the newest moment it can be restored as of is now, "
            f"{newest.isoformat(timespec='seconds')} on the bucket's clock (omit the time "
            "for the newest state)",
            at=at,
            earliest=history.restorable_from(),
        )
    base = history.base_at(at)
    if base is None:
        earliest = history.restorable_from()
        reason = (
            f"its history starts at {earliest.isoformat(timespec='seconds')}"
            if earliest
            else "the bucket holds no restorable history of it"
        )
        raise PointInTimeError(
            f"tenant {tenant} cannot be restored as of {at.isoformat(timespec='seconds')}: "
            f"{reason}",
            at=at,
            earliest=earliest,
        )
    return await _Walk(bucket, history, base, at, progress).run(dest)


def _bucket_now(history: History) -> datetime:
    """The present on the bucket's clock, read with lock.json (its Date, and time since).

    An HTTP date names a whole second: the present is taken as that second's end, so a
    moment the bucket has reached is never refused as future.
    """
    lock = history.lock
    if lock is None or lock.info.server_date is None:
        return clock.now()  # an embedded bucket: this machine's clock is its clock
    since = clock.monotonic() - lock.read_at
    return lock.info.server_date + timedelta(seconds=1 + since)


async def _restore_current(
    bucket: Bucket, tenant: str, dest: Path, *, prefix: str, progress: Progress | None
) -> RestoredPoint:
    key = f"{prefix}{tenant}/lock.json"
    observed = await read_lock(bucket, tenant, key)
    if observed is None:
        raise ReplicationError(f"tenant {tenant} has no {key}: nothing to restore", key=key)
    record = observed.record
    expected = record.snapshot.size if record.snapshot else 0

    # restore_database assembles the file under a random temporary name beside ``dest``.
    def downloaded() -> int:
        temps = dest.parent.glob(f".{dest.name}.restore-*")
        return max((path.stat().st_size for path in temps), default=0)

    with _watching(downloaded, expected, progress):
        hashes = await restore_database(bucket, record, dest, prefix=prefix)
    if progress is not None:
        progress(expected, expected)
    log = record.log
    updated = log.updated_at if log else (record.snapshot.published_at if record.snapshot else "")
    return RestoredPoint(
        at=datetime.fromisoformat(updated) if updated else None,
        index=log.tail if log else 0,
        state=format_state(hashes.state),
        db_pages=hashes.db_pages,
        snapshot=record.snapshot.key if record.snapshot else None,
    )


@contextlib.contextmanager
def _watching(
    size_now: Callable[[], int], expected: int, progress: Progress | None
) -> Iterator[None]:
    """Report ``size_now()`` (a download's bytes so far) to ``progress`` until the block ends."""
    if progress is None:
        yield
        return

    async def watch() -> None:
        while True:
            with contextlib.suppress(OSError):
                progress(min(size_now(), expected), expected)
            await asyncio.sleep(_PROGRESS_INTERVAL)

    task = asyncio.get_running_loop().create_task(watch())
    try:
        yield
    finally:
        task.cancel()


@dataclass(frozen=True)
class _Step:
    """One object to apply next: where it goes in the log, its key, and its bytes if inline."""

    chunk: LogChunk
    key: str
    inline: bytes | None
    size: int


class _Walk:
    """One point-in-time restore: plan the objects after the base, fetch ahead, apply."""

    def __init__(
        self, bucket: Bucket, history: History, base: Base, at: datetime, progress: Progress | None
    ) -> None:
        self.bucket = bucket
        self.history = history
        self.base = base
        self.at = at
        self.progress = progress
        self.tenant = history.tenant
        self._done = 0
        self._expected = (base.snapshot.size if base.snapshot else 0) + sum(
            e.size
            for e in history.segments
            if e.published and not e.merged and e.first >= base.index and e.last_modified <= at
        )

    async def run(self, dest: Path) -> RestoredPoint:
        tmp = temp_restore_path(dest)
        try:
            snapshot = self.base.snapshot
            if snapshot is not None:
                await self._download(snapshot.key, snapshot.size, tmp)
            else:
                tmp.touch()
            hashes = await asyncio.to_thread(hash_file, tmp)
            hashes, index, last_at = await self._apply_log(tmp, hashes)
            what = f"{snapshot.key if snapshot else 'an empty database'} + segments to {index}"
            await asyncio.to_thread(install_database, tmp, dest, key=what)
        finally:
            tmp.unlink(missing_ok=True)
        if self.progress is not None:
            self.progress(self._expected, self._expected)
        return RestoredPoint(
            at=last_at,
            index=index,
            state=format_state(hashes.state),
            db_pages=hashes.db_pages,
            snapshot=snapshot.key if snapshot else None,
        )

    async def _download(self, key: str, size: int, tmp: Path) -> None:
        with _watching(lambda: tmp.stat().st_size, self._expected, self.progress):
            info = await self.bucket.download_file(key, tmp, max_size=size)
        if info.size != size or tmp.stat().st_size != size:
            raise ReplicationError(f"snapshot {key} changed size while being read", key=key)
        record = self.history.record
        if record is not None and record.snapshot is not None and record.snapshot.key == key:
            # Only lock.json records a sha256, of its current snapshot; the pages of any
            # snapshot are checked by the first segment's prev_state and by quick_check.
            await asyncio.to_thread(check_download, record.snapshot, tmp)
        self._advance(size)

    def _advance(self, size: int) -> None:
        self._done += size
        self._expected = max(self._expected, self._done)
        if self.progress is not None:
            self.progress(self._done, self._expected)

    async def _apply_log(
        self, tmp: Path, hashes: PageHashes
    ) -> tuple[PageHashes, int, datetime | None]:
        at_ms = self.at.timestamp() * 1000
        index = self.base.index
        last_at = self.base.taken_at if self.base.snapshot else None
        # Merged objects found to hold a commit past the moment after all (the bucket's
        # clock is not the writers'): planned again without them, from where they start.
        avoid: set[str] = set()
        while True:
            replan = False
            plan = self._plan(index, frozenset(avoid))
            async with _fetching_ahead(self.bucket, self.tenant, plan) as steps:
                async for step, segment in steps:
                    header = segment.header
                    if header.timestamp_ms > at_ms:
                        replan = step.chunk.merged
                        avoid.add(step.key)
                        break  # else: the first segment past the moment
                    hashes = await asyncio.to_thread(
                        apply_segment, segment, step.key, tmp, hashes, self.tenant, step.chunk
                    )
                    index = step.chunk.last + 1
                    last_at = datetime.fromtimestamp(header.timestamp_ms / 1000, UTC)
                    self._advance(step.size)
            if not replan:
                return hashes, index - 1, last_at

    def _plan(self, index: int, avoid: frozenset[str]) -> Iterator[_Step]:
        """The objects to apply from ``index`` on, to the end of the log (see History.pick)."""
        record = self.history.record
        pointer = record.log if record else None
        while True:
            entry = self.history.pick(index, self.at, avoid=avoid)
            inline = pointer.inline_segment(index) if pointer else None
            if entry is not None and entry.packed:
                # One segment of the pack at a time (each keeps its own time), to its end:
                # the walk reads what retention keeps for it (History._path), never an
                # object at a single key inside the pack's range.
                for single in range(index, entry.last + 1):
                    chunk = LogChunk(
                        single, single, entry.generation, False, (entry.first, entry.last)
                    )
                    yield _Step(chunk, entry.key, None, entry.size if single == entry.last else 0)
                index = entry.last + 1
            elif entry is not None:
                chunk = LogChunk(entry.first, entry.last, entry.generation, entry.merged)
                yield _Step(chunk, entry.key, None, entry.size)
                index = entry.last + 1
            elif inline is not None and pointer is not None:
                # Published by lock.json alone so far: its object may not exist yet.
                chunk = LogChunk(index, index, pointer.generation_of(index), merged=False)
                key = chunk_key(self.history.prefix, self.tenant, chunk)
                yield _Step(chunk, key, inline, len(inline))
                index += 1
            else:
                self._check_end(index, avoid)
                return

    def _check_end(self, index: int, avoid: frozenset[str]) -> None:
        """No object starts at ``index``: prove it is where the log ended, or fail naming it.

        Absence proves nothing (an object can be lost, or a segment carried in lock.json
        dropped unuploaded), so only two records end a walk: lock.json's log tail (the
        walk reached the end of the current log), or a published snapshot whose log starts
        exactly at ``index`` (everything before it was applied). Anything else is a segment
        that may have been published and cannot be read: an error naming it.
        """
        for entry in self.history.segments:
            if entry.first == index and entry.key in avoid:
                raise self._inside_merge(entry)
        record = self.history.record
        pointer = record.log if record else None
        if pointer is not None and pointer.base <= index == pointer.tail + 1:
            return  # the end of the log as lock.json has it
        # Later in the log than the base: an earlier snapshot starting at the same index
        # (one a rollback's base replaced) says nothing of where this walk's log ends.
        start = self.base.snapshot
        after = (start.generation, start.seq) if start else (0, 0)
        if any(
            s.published and s.base == index and (s.generation, s.seq) > after
            for s in self.history.snapshots
        ):
            return  # a later snapshot takes over where the applied segments end
        key = f"{self.history.prefix}{self.tenant}/log/*/{index:012d}.seg"
        later = [e.first for e in self.history.segments if e.published and e.first > index]
        where = f"a gap in the log before segment {min(later)}" if later else "not in the bucket"
        raise PointInTimeError(
            f"tenant {self.tenant}: segment {index} ({key}) is missing ({where}) and no "
            "record shows the log ended before it: the database as of "
            f"{self.at.isoformat(timespec='seconds')} cannot be restored exactly",
            at=self.at,
            earliest=self.history.restorable_from(),
            key=key,
        )

    def _inside_merge(self, entry: SegmentEntry) -> PointInTimeError:
        return PointInTimeError(
            f"tenant {self.tenant}: {self.at.isoformat(timespec='seconds')} falls inside the "
            f"merged segments {entry.first}..{entry.last} ({entry.key}), whose single "
            "segments retention has deleted; restore a moment before or after them",
            at=self.at,
            earliest=self.history.restorable_from(),
            key=entry.key,
        )


@contextlib.asynccontextmanager
async def _fetching_ahead(
    bucket: Bucket, tenant: str, plan: Iterator[_Step]
) -> AsyncIterator[AsyncIterator[tuple[_Step, Segment]]]:
    """The planned steps with their segments, up to PREFETCH fetched ahead of the consumer."""
    pending: list[tuple[_Step, asyncio.Task[Segment]]] = []
    objects = LogObjects(bucket, tenant)

    def top_up() -> None:
        while len(pending) < PREFETCH:
            step = next(plan, None)
            if step is None:
                return
            fetch = fetch_segment(objects, step.key, step.chunk, step.inline)
            pending.append((step, asyncio.ensure_future(fetch)))

    async def steps() -> AsyncIterator[tuple[_Step, Segment]]:
        top_up()
        while pending:
            step, task = pending.pop(0)
            segment = await task
            top_up()
            yield step, segment

    try:
        yield steps()
    finally:
        for _, task in pending:
            task.cancel()
        await asyncio.gather(*(task for _, task in pending), return_exceptions=True)
        objects.close()
