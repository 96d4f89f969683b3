"""Compaction of the log: which objects to merge next, and the merge itself.

Single segments (one per sync) are merged into one object once ``MERGE_SINGLES`` follow
the merged ones; merged objects of one level become one of the next level once
``MERGE_FANOUT`` of them are in a row (a size-tiered scheme, as in LSM trees). A restore
then reads the snapshot and at most about ``MERGE_SINGLES + (MERGE_FANOUT - 1) x levels``
objects, and each merge uploads only the distinct pages of what it replaces.
"""

from __future__ import annotations

from tenantdb.errors import ReplicationError
from tenantdb.protocol.lockfile import LogChunk, LogPointer
from tenantdb.replication.segment import Segment, SegmentHeader, decode_segment, encode_segment

__all__ = ["MERGE_FANOUT", "MERGE_SINGLES", "merge_segments", "next_merge"]

# Single segments are merged into one object once this many follow the merged ones.
MERGE_SINGLES = 16
# Merged objects of one level become one of the next level once this many are in a row.
MERGE_FANOUT = 4


def next_merge(pointer: LogPointer) -> tuple[int, int] | None:
    """The ``(first, last)`` range to merge next, or None when the log is compact enough.

    Segments lock.json carries inline are left out: their objects may not exist yet.
    """
    last = pointer.inline_from - 1
    if last - pointer.first_single + 1 >= MERGE_SINGLES:
        return pointer.first_single, last
    group = pointer.merged[-MERGE_FANOUT:]
    if len(group) == MERGE_FANOUT and len({_level(first, last) for first, last, _ in group}) == 1:
        return group[0][0], group[-1][1]
    return None


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
