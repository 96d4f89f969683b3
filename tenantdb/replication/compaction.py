"""Compaction of the log: which objects to merge next, and the merge itself.

Single segments (one per sync) are merged into one object once ``MERGE_SINGLES`` follow
the merged ones; merged objects of one level become one of the next level once
``MERGE_FANOUT`` of them are in a row (a size-tiered scheme, as in LSM trees). A restore
then reads the snapshot and at most about ``MERGE_SINGLES + (MERGE_FANOUT - 1) x levels``
objects, and each merge uploads only the distinct pages of what it replaces.

What a merge costs must follow what changed, never the database's size. As in
Litestream's levels (each level's file holds only the changes of its own window, and the
whole database is only ever rewritten by a snapshot), a merged object that holds a large
share of the database (``HEAVY_SHARE``: a tenant grown through its log, a bulk load) is
sealed: no later merge reads it again, since a new base would hold those pages anyway.
The shipper takes that new base, a snapshot, once the log a restore reads outweighs the
database (``log_outgrew``), which costs at most the log's own bytes once more.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection

from tenantdb.errors import LeaseLostError, ReplicationError
from tenantdb.protocol.lease import Lease
from tenantdb.protocol.lockfile import LogChunk, LogPointer
from tenantdb.replication.segment import (
    SEGMENT_MAX_BYTES,
    Segment,
    SegmentHeader,
    chunk_key,
    decode_segment,
    encode_segment,
)
from tenantdb.replication.uploads import put_log_object

__all__ = [
    "HEAVY_SHARE",
    "MERGE_FANOUT",
    "MERGE_SINGLES",
    "REBASE_SHARE",
    "Compactor",
    "merge_group",
    "merge_segments",
    "next_merge",
]

# Single segments are merged into one object once this many follow the merged ones.
MERGE_SINGLES = 16
# Merged objects of one level become one of the next level once this many are in a row.
MERGE_FANOUT = 4
# A merged object of at least this share of the database's bytes (and HEAVY_MIN_BYTES) is
# never merged again.
HEAVY_SHARE = 1 / 16
HEAVY_MIN_BYTES = 256 << 10
# A snapshot replaces the log once the log's objects weigh this many times the database
# (and REBASE_MIN_BYTES: a small database's log is cheap to merge, its snapshots frequent).
REBASE_SHARE = 1.0
REBASE_MIN_BYTES = 1 << 20
# Bytes of the log objects this holder wrote kept in memory, so that merges need not
# download them (a segment is at most MAX_FRAMES_PER_SEGMENT pages).
RECENT_BYTES = 16 << 20


def next_merge(pointer: LogPointer, *, heavy: Collection[int] = ()) -> tuple[int, int] | None:
    """The ``(first, last)`` range to merge next, or None when the log is compact enough.

    Segments lock.json carries inline are left out: their objects may not exist yet.
    ``heavy`` names (by first index) the merged objects that are sealed (see the module's
    docstring): a group holding one is not merged. Each single segment is merged once.
    """
    last = pointer.inline_from - 1
    if last - pointer.first_single + 1 >= MERGE_SINGLES:
        return pointer.first_single, last
    group = merge_group(pointer)
    if group and not any(first in heavy for first, _, _ in group):
        return group[0][0], group[-1][1]
    return None


def merge_group(pointer: LogPointer) -> tuple[tuple[int, int, int], ...]:
    """The newest ``MERGE_FANOUT`` merged objects when they are of one level, else ()."""
    group = pointer.merged[-MERGE_FANOUT:]
    if len(group) == MERGE_FANOUT and len({_level(first, last) for first, last, _ in group}) == 1:
        return group
    return ()


def _level(first: int, last: int) -> int:
    """A merged object's level: 0 for about MERGE_SINGLES segments, +1 per MERGE_FANOUT x."""
    span, level = (last - first + 1) // MERGE_SINGLES, 0
    while span >= MERGE_FANOUT:
        span //= MERGE_FANOUT
        level += 1
    return level


def merge_segments(
    objects: list[tuple[str, bytes]], chunks: list[LogChunk], tenant: str, generation: int
) -> bytes:
    """Decode and check consecutive log objects, and encode their merge (blocking)."""
    pages: dict[int, bytes] = {}
    segments = [decode_segment(body, key=key) for key, body in objects]
    for (key, _), chunk, segment, previous in zip(
        objects, chunks, segments, [None, *segments[:-1]], strict=True
    ):
        header = segment.header
        if (header.tenant, header.generation, header.index) != (
            tenant,
            chunk.generation,
            chunk.last,
        ):
            raise ReplicationError(f"{key} is not the log object lock.json names", key=key)
        if previous is not None and header.prev_state != previous.header.state:
            raise ReplicationError(f"{key} does not follow the object before it", key=key)
        pages.update(segment.pages)
        # Replayed in order, a truncation drops pages past the end even if written earlier.
        for pgno in [p for p in pages if p > header.db_pages]:
            del pages[pgno]
    head, tail = segments[0].header, segments[-1].header
    header = SegmentHeader(
        tenant=tenant,
        generation=generation,
        index=tail.index,
        page_size=tail.page_size,
        db_pages=tail.db_pages,
        timestamp_ms=tail.timestamp_ms,
        prev_state=head.prev_state,
        state=tail.state,
        commits=sum(s.header.commits for s in segments),
    )
    return encode_segment(Segment(header, tuple(sorted(pages.items()))))


def chunks_within(log: LogPointer, first: int, last: int) -> list[LogChunk]:
    """The log's objects from index ``first`` to ``last``."""
    return [c for c in log.chunks() if first <= c.first and c.last <= last]


class Compactor:
    """Runs one holder's merges, keeping the bytes of the log objects it wrote recently."""

    def __init__(self, lease: Lease, *, prefix: str) -> None:
        self.lease = lease
        self.prefix = prefix
        self._recent: dict[str, bytes] = {}  # see remember
        self._recent_bytes = 0
        # The sizes of log objects, as written or as a HEAD found them.
        self._sizes: dict[str, int] = {}

    def remember(self, key: str, body: bytes) -> None:
        """Keep a published log object's bytes for the merge that will read it."""
        self._recent[key] = body
        self._recent_bytes += len(body)
        self._sizes[key] = len(body)
        while self._recent_bytes > RECENT_BYTES:
            self._recent_bytes -= len(self._recent.pop(next(iter(self._recent))))

    def log_outgrew(self, log: LogPointer, db_bytes: int) -> bool:
        """Whether the log's objects whose size is known outweigh ``REBASE_SHARE`` x the
        database: a snapshot then costs no more than the log did (sizes unknown, as those a
        predecessor wrote, count nothing: a new holder rebases later, never more often)."""
        keys = {chunk_key(self.prefix, self.lease.tenant, chunk) for chunk in log.chunks()}
        for key in [key for key in self._sizes if key not in keys]:
            del self._sizes[key]  # replaced by a merge or a snapshot
        return sum(self._sizes.values()) >= max(db_bytes * REBASE_SHARE, REBASE_MIN_BYTES)

    async def merge_next(self, log: LogPointer, db_bytes: int) -> bool:
        """Merge the range ``next_merge`` plans for ``log``; False when there is none.

        Runs beside shipping, not under the shipper's lock: the merge's CAS applies to the
        log as it is by then, segments appended meanwhile included.
        """
        heavy = [
            first
            for first, last, generation in merge_group(log)
            if await self._size(LogChunk(first, last, generation, merged=True))
            >= max(db_bytes * HEAVY_SHARE, HEAVY_MIN_BYTES)
        ]
        span = next_merge(log, heavy=heavy)
        if span is None:
            return False
        await self._merge(log, *span)
        return True

    async def _size(self, chunk: LogChunk) -> int:
        """A log object's size: known since it was written, else one HEAD (then known)."""
        key = chunk_key(self.prefix, self.lease.tenant, chunk)
        if key not in self._sizes:
            self._sizes[key] = (await self.lease.bucket.head(key)).size
        return self._sizes[key]

    async def _merge(self, log: LogPointer, first: int, last: int) -> None:
        """Replace the log objects from ``first`` to ``last`` by one with their newest pages."""
        record = self.lease.record
        if record is None:
            raise LeaseLostError("the lease is not held", tenant=self.lease.tenant)
        tenant, generation = self.lease.tenant, record.generation
        chunks = chunks_within(log, first, last)
        keys = [chunk_key(self.prefix, tenant, chunk) for chunk in chunks]
        bodies = await asyncio.gather(*(self._log_object(key) for key in keys))
        body = await asyncio.to_thread(
            merge_segments, list(zip(keys, bodies, strict=True)), chunks, tenant, generation
        )
        merged = LogChunk(first, last, generation, merged=True)
        merged_key = chunk_key(self.prefix, tenant, merged)
        await put_log_object(self.lease.bucket, merged_key, body)

        def replace_chunks(log: LogPointer | None) -> LogPointer:
            if log is not None and merged in log.chunks():
                return log  # our own write of it landed unheard, and was adopted
            if log is None or chunks_within(log, first, last) != chunks:
                raise ReplicationError(f"the log changed under the merge of {first}..{last}")
            return log.with_merged(first, last, generation)

        await self.lease.update_log(replace_chunks)
        for key in keys:
            self._recent_bytes -= len(self._recent.pop(key, b""))
        self.remember(merged_key, body)

    async def _log_object(self, key: str) -> bytes:
        """A log object's bytes: kept from when this holder wrote it, else downloaded."""
        body = self._recent.get(key)
        if body is None:
            # Capped as a restore caps it: an object's own size never sets this memory.
            body = (await self.lease.bucket.get(key, max_size=SEGMENT_MAX_BYTES)).body
        return body
